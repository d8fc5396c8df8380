"""The documentation (README.md and docs/*.md) against the code and the benchmarks.

- every flag of every `hpa-*` command (setup.py's COMMANDS) appears in the pages; the flags are read from the
  parser each command's `main` builds, caught when it parses (so a module without `build_parser` is covered
  too, and Beam's pass-through options, which no parser of ours declares, are left out);
- every relative link resolves to a file, and its `#anchor` to a heading of that file;
- every markdown table of figures (a number with a decimal point or a unit, outside `code`) names, within a
  few lines, the command that prints it (`bench/NAME.py` that exists, or a `make` target of the Makefile) or
  says it comes from ../shared/FACTS.md. Constants written as `code` are not figures.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
from unittest import mock

import pytest

from tests.test_cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FACTS = "../shared/FACTS.md"
NEAR = 6  # lines before a table's first line or after its last in which its source must be named


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line index, line) of the lines outside fenced code blocks."""
    kept, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            kept.append((i, line))
    return kept


class _Parsed(BaseException):
    """Raised by the patched parse_known_args: carries the parser, ends `main` before any work."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def _catch(parser, *args, **kwargs):
    raise _Parsed(parser)


def _flags(target: str) -> set[str]:
    """The option strings of the parser that `target`'s main parses its arguments with (without --help)."""
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    # parse_args calls parse_known_args; a BaseException passes the commands' `except Exception` wrapper.
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", _catch):
        try:
            main(["--help"])
        except _Parsed as parsed:
            actions = parsed.parser._actions
        else:
            raise AssertionError(f"{target} returned without parsing its arguments")
    return {o for a in actions for o in a.option_strings if o.startswith("--")} - {"--help"}


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return {path: open(path, encoding="utf-8").read() for path in PAGES}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_of_every_command_is_documented(name, pages):
    flags = _flags(COMMANDS[name])
    assert flags, f"{name}: no flags found"
    text = "\n".join(pages.values())
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
    assert not missing, f"{name}: flags in no page of README.md or docs/: {missing}"
    named = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", pages[PAGES[0]])
    assert named, f"README.md never names {name}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _outside_fences(text):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _broken_links(pages: dict[str, str]) -> list[str]:
    """`page:line: target (why)` for every relative link of `pages` without its file or heading."""
    broken = []
    for path, text in pages.items():
        for i, line in _outside_fences(text):
            for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
                where = f"{_rel(path)}:{i + 1}: {target}"
                if not os.path.exists(dest):
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.endswith(".md"):
                    if anchor not in _anchors(open(dest, encoding="utf-8").read()):
                        broken.append(f"{where} (no such heading)")
    return broken


def test_every_relative_link_resolves(pages):
    broken = _broken_links(pages)
    assert not broken, "broken links:\n" + "\n".join(broken)


FIGURE = re.compile(
    r"\d\.\d|(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|min|h|%|x|kB|MB|GB|MiB|GiB|samples/s|requests/s)(?![\w/])"
)


def _tables(text: str) -> list[tuple[int, int, list[str]]]:
    """(first line, last line, data rows) of every markdown table outside code fences."""
    found, rows, start = [], [], None
    lines = dict(_outside_fences(text))
    for i in range(len(text.splitlines()) + 1):
        line = lines.get(i, "")
        if line.lstrip().startswith("|"):
            if start is None:
                start, rows = i, []
            rows.append(line)
        elif start is not None:
            found.append((start, i - 1, rows[2:]))  # header and separator rows left out
            start = None
    return found


def _sources(lines: list[str], makefile_targets: set[str]) -> list[str]:
    named = [m for line in lines for m in re.findall(r"bench/(\w+)\.py", line)]
    sources = [f"bench/{n}.py" for n in named if os.path.exists(os.path.join(ROOT, "bench", f"{n}.py"))]
    made = [t for line in lines for t in re.findall(r"make (\w+)", line)]
    sources += [f"make {t}" for t in made if t in makefile_targets]
    sources += [FACTS for line in lines if FACTS in line]
    return sources


def _figure_tables(text: str) -> list[tuple[int, int, str]]:
    """(first line, last line, the first figure) of every table with a figure outside code spans."""
    out = []
    for first, last, rows in _tables(text):
        figures = [m.group(0) for row in rows for m in FIGURE.finditer(re.sub(r"`[^`]*`", "", row))]
        if figures:
            out.append((first, last, figures[0]))
    return out


def test_every_table_of_figures_names_the_command_that_prints_it(pages):
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    unsourced = []
    for path, text in pages.items():
        lines = text.splitlines()
        for first, last, figure in _figure_tables(text):
            near = lines[max(0, first - NEAR) : first] + lines[last + 1 : last + 1 + NEAR]
            if not _sources(near, targets):
                unsourced.append(f"{_rel(path)}:{first + 1} (e.g. {figure!r})")
    assert not unsourced, (
        f"tables of figures with no bench/*.py, make target or {FACTS} named within {NEAR} lines:\n"
        + "\n".join(unsourced)
    )


def test_the_figure_check_sees_figures_and_sources():
    """The checks above on made-up pages: they can fail."""
    table = "| run | time |\n| --- | --- |\n| a | 4.4 s |\n"
    assert _figure_tables(table) == [(0, 2, "4.4")]
    assert _figure_tables("| a | b |\n| --- | --- |\n| `x/255` | exit 2, 0..27 |\n") == []
    assert _sources(["Printed by: `.venv/bin/python bench/scale.py`"], set()) == ["bench/scale.py"]
    assert _sources(["Printed by: `.venv/bin/python bench/no_such_bench.py`"], set()) == []
    assert set(_sources(["(from ../shared/FACTS.md)", "make demo"], {"demo"})) == {FACTS, "make demo"}
    assert _anchors("# A page\n## bench/scale.py\n```\n# not a heading\n```\n## A page\n") == {
        "a-page",
        "benchscalepy",
        "a-page-1",
    }


def test_the_link_check_finds_missing_files_and_headings(tmp_path):
    page = tmp_path / "a.md"
    text = "# Top\n[ok](a.md#top) [web](https://x.org/y) `[code](nowhere.md)`\n[gone](b.md) [bad](#nothing)\n"
    page.write_text(text)
    assert [b.split(": ", 1)[1] for b in _broken_links({str(page): text})] == [
        "b.md (no such file)",
        "#nothing (no such heading)",
    ]

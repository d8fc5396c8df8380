"""Scores a submission file against the answers: macro F1 (the competition's metric), micro F1, per class.

    python -m model.score --submission submission.csv --answers test_labels.csv [--out score.json]

The submission is `Id,Predicted` and the answers `Id,Target` (space-separated class indices each). Both must
name the same Ids, each once (the order may differ): a missing, extra or repeated Id, or a class index out
of range, is an error rather than a silently lower score. Per-class F1 is 0 for a class with neither
positives nor predictions, as scikit-learn's `f1_score(average="macro", zero_division=0)` counts it.
Local paths and gs:// (through `model.fileio`) both work.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Sequence

import numpy as np

import schemas
from model import fileio
from model import thresholds as thr
from schemas import cli

PROG = "hpa-score"

__all__ = ["ScoreError", "main", "read_label_table", "render_table", "score_files", "score_tables"]


class ScoreError(ValueError):
    """A submission or answer file that cannot be scored; the message says why."""


def _read_text(path: str) -> str:
    try:
        return fileio.read_text(path)
    except FileNotFoundError:
        raise ScoreError(f"{path}: no such file") from None


def read_label_table(path: str, column: str) -> dict[str, np.ndarray]:
    """Id -> multi-hot vector from a CSV with columns `Id` and `column` (Target or Predicted).

    Raises:
      ScoreError: missing columns, repeated Ids, malformed or out-of-range class indices.
    """
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    missing = {schemas.CSV_ID, column} - set(reader.fieldnames or [])
    if missing:
        raise ScoreError(f"{path}: missing column(s) {sorted(missing)} (header: {reader.fieldnames})")
    table: dict[str, np.ndarray] = {}
    for line, row in enumerate(reader, start=2):
        sid = (row[schemas.CSV_ID] or "").strip()
        if not sid:
            raise ScoreError(f"{path}, line {line}: empty Id")
        if sid in table:
            raise ScoreError(f"{path}, line {line}: Id {sid!r} repeated")
        try:
            table[sid] = schemas.labels_to_multi_hot(int(t) for t in (row[column] or "").split())
        except ValueError as e:
            raise ScoreError(f"{path}, line {line}: bad {column} {row[column]!r} ({e})") from None
    if not table:
        raise ScoreError(f"{path} holds no rows")
    return table


def score_tables(predicted: dict[str, np.ndarray], answers: dict[str, np.ndarray]) -> dict:
    """Scores predictions against answers over the same Ids.

    Args:
      predicted: Id -> multi-hot predictions.
      answers: Id -> multi-hot labels.

    Returns:
      A JSON-ready dict: num_samples, macro_f1, micro_f1, and per class name, support, predicted,
      precision, recall, f1.

    Raises:
      ScoreError: the two tables do not name the same Ids.
    """
    missing = sorted(set(answers) - set(predicted))
    extra = sorted(set(predicted) - set(answers))
    if missing or extra:
        raise ScoreError(
            f"the submission and the answers differ in Ids: {len(missing)} answer Id(s) without a prediction "
            f"(e.g. {missing[:3]}), {len(extra)} predicted Id(s) without an answer (e.g. {extra[:3]})"
        )
    ids = sorted(answers)
    y_true = np.stack([answers[i] for i in ids])
    y_pred = np.stack([predicted[i] for i in ids])
    s = thr.score_predictions(y_true, y_pred)
    return {
        "num_samples": len(ids),
        "macro_f1": s.macro_f1,
        "micro_f1": s.micro_f1,
        "classes": [
            {
                "index": c,
                "name": name,
                "support": int(s.support[c]),
                "predicted": int(s.predicted[c]),
                "precision": float(s.precision[c]),
                "recall": float(s.recall[c]),
                "f1": float(s.f1[c]),
            }
            for c, name in enumerate(schemas.CLASS_NAMES)
        ],
    }


def score_files(submission: str, answers: str) -> dict:
    """Reads a submission (`Id,Predicted`) and answers (`Id,Target`) and scores them (see `score_tables`)."""
    result = score_tables(
        read_label_table(submission, schemas.CSV_PREDICTED), read_label_table(answers, schemas.CSV_TARGET)
    )
    result.update(submission=submission, answers=answers)
    return result


def render_table(result: dict) -> str:
    """Per-class Markdown table followed by the macro and micro F1 lines."""
    lines = [
        "| # | class | support | predicted | precision | recall | F1 |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["classes"]:
        lines.append(
            f"| {r['index']} | {r['name']} | {r['support']} | {r['predicted']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['f1']:.3f} |"
        )
    lines += [
        "",
        f"macro F1 {result['macro_f1']:.4f}   micro F1 {result['micro_f1']:.4f}   "
        f"({result['num_samples']} samples)",
    ]
    return "\n".join(lines)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m model.score`; returns the exit status (2 on bad input)."""
    p = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Score a submission file (Id,Predicted) against answers (Id,Target): macro F1 and per class."
        ),
    )
    p.add_argument("--submission", required=True, help="the submission CSV (Id,Predicted)")
    p.add_argument("--answers", required=True, help="the answers CSV (Id,Target), e.g. test_labels.csv")
    p.add_argument("--out", default=None, help="also write the scores as JSON here")
    p.add_argument("--quiet", action="store_true", help="print only the macro F1 line, not the class table")
    args = p.parse_args(argv)
    try:
        result = score_files(args.submission, args.answers)
    except ScoreError as e:
        return cli.bad_input(PROG, e)
    table = render_table(result)
    print(table.splitlines()[-1] if args.quiet else table, flush=True)
    if args.out:
        text = json.dumps(result, indent=2) + "\n"
        fileio.write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

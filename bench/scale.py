"""The preprocessing job at the competition's size: wall time, samples/s, peak memory, bytes out / in.

    python bench/scale.py --data_dir /work/benchdata/distinct [--num_samples 31072] [--fractions 0.1,1] \
        [--modes off,group] [--cache cold|warm|as-is] [--repeats 2] [--image_size N]

The data are distinct fields made from the real four-stain samples (bench._common.build_distinct_dataset:
each sample a rotated, rolled real field mixed with another, written as its own files), so near-duplicate
grouping has real work to do and the page cache cannot hold one file for many samples. The smaller sizes are
the first samples of the same set (their files linked into a folder of their own, each file once).

For each size and `--duplicates` mode the job runs as its own process (`python -m pipelines.preprocess`,
DirectRunner on every core); from outside, every 0.5 s, the bench sums the resident memory (RSS) and the
proportional set size (PSS: shared pages split between the processes sharing them) of the job's whole
process tree. It prints wall time, samples/s, the peaks, bytes written / bytes read, the duplicate groups
found, the load average before and after, and how much of the input was in the page cache before the run
(`fincore` on a sample of the files).

Equal terms for the modes (arms): each arm starts from the same page-cache state, `--cache cold` (the
default) evicts the input files' pages before every arm (posix_fadvise DONTNEED: only clean pages of these
files, nothing else on the machine), `--cache warm` reads them all first; and with `--repeats R` the arms
alternate in order (off, group, then group, off, ...), so neither always runs second. The summary takes
each arm's median over the repeats; the throughput ratio is of those medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

import schemas  # noqa: E402
from bench._common import _ROOT, build_distinct_dataset, cached_share, evict, print_table, warm  # noqa: E402


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over the process tree of pid."""
    rss = pss = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.interval):
            rss, pss = _memory(self.pid)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)


def _subset(data_dir: str, image_dir: str, n: int, total: int) -> tuple[str, str]:
    """A folder holding the first n samples (links to the same files, each once) and their label file."""
    if len(os.listdir(image_dir)) == n * len(schemas.STAINS):
        return os.path.join(data_dir, "train.csv"), image_dir
    root = f"{data_dir.rstrip('/')}-first{n}"
    sub = os.path.join(root, "train")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(data_dir, "train.csv")) as f:
        lines = f.read().splitlines()[: n + 1]
    have = set(os.listdir(sub))
    for line in lines[1:]:
        sid = line.split(",")[0]
        for stain in schemas.STAINS:
            name = f"{sid}_{stain}.png"
            if name not in have:
                os.link(os.path.join(image_dir, name), os.path.join(sub, name))
    csv_path = os.path.join(root, "train.csv")
    with open(csv_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, sub


def _files(image_dir: str) -> list[str]:
    return [os.path.join(image_dir, n) for n in os.listdir(image_dir)]


def run_job(csv_path, image_dir, out_dir, mode, image_size, workers, extra) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pipelines.preprocess",
        "--labels_csv",
        csv_path,
        "--input_dir",
        image_dir,
        "--output_dir",
        out_dir,
        "--duplicates",
        mode,
        "--overwrite",
        "--progress_seconds",
        "30",
        "--direct_num_workers",
        str(workers),
        *(["--image_size", str(image_size)] if image_size else []),
        *extra,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    sampler = _Sampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"the job failed ({proc.returncode}):\n{err[-3000:]}")
    manifest = json.load(open(os.path.join(out_dir, schemas.MANIFEST_FILE)))
    tf_dir = os.path.join(out_dir, schemas.TFRECORD_DIR)
    shard_sizes = sorted(os.path.getsize(os.path.join(tf_dir, n)) for n in os.listdir(tf_dir))
    return {
        "wall": wall,
        "peak_rss": sampler.peak_rss,
        "peak_pss": sampler.peak_pss,
        "manifest": manifest,
        "shard_sizes": shard_sizes,
        "log_tail": err.strip().splitlines()[-1] if err.strip() else "",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", required=True, help="where the distinct-fields set is (or is made)")
    parser.add_argument(
        "--num_samples", type=int, default=31072, help="N (default: the competition's 31,072)"
    )
    parser.add_argument(
        "--fractions", default="0.1,1", help="sizes to run, as fractions of N (default 0.1,1)"
    )
    parser.add_argument(
        "--modes", default="off,group", help="--duplicates modes to compare (default off,group)"
    )
    parser.add_argument(
        "--cache",
        choices=("cold", "warm", "as-is"),
        default="cold",
        help="page cache of the input before every arm: cold (evicted), warm (read first) or as-is (the "
        "previous arm's leftovers: unequal terms, for comparison only)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each arm, alternating the arms' order (default 2)"
    )
    parser.add_argument("--image_size", type=int, default=None, help="pass --image_size to the job")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="--direct_num_workers")
    parser.add_argument("--out_root", default=None, help="outputs (default: DATA_DIR-out)")
    parser.add_argument("--gen_workers", type=int, default=os.cpu_count(), help="processes making the data")
    args, extra = parser.parse_known_args(argv)

    n_total = args.num_samples
    _, image_dir = build_distinct_dataset(args.data_dir, n_total, workers=args.gen_workers)
    out_root = args.out_root or f"{args.data_dir.rstrip('/')}-out"
    rows = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        n = max(1, round(n_total * frac))
        csv_path, sub_dir = _subset(args.data_dir, image_dir, n, n_total)
        paths = _files(sub_dir)
        bytes_in = sum(os.path.getsize(p) for p in paths)
        modes = args.modes.split(",")
        schedule = [
            (rep, mode) for rep in range(args.repeats) for mode in (modes if rep % 2 == 0 else modes[::-1])
        ]
        for rep, mode in schedule:
            if args.cache == "cold":
                evict(paths)
            elif args.cache == "warm":
                warm(paths)
            cached = cached_share(paths)
            load_before = os.getloadavg()
            r = run_job(
                csv_path,
                sub_dir,
                os.path.join(out_root, f"{n}-{mode}"),  # the same output dir for every repeat
                mode,
                args.image_size,
                args.workers,
                extra,
            )
            load_after = os.getloadavg()
            m = r["manifest"]
            bytes_out = sum(r["shard_sizes"])
            d = m.get("duplicates") or {}
            row = {
                "n": n,
                "mode": mode,
                "repeat": rep,
                "wall_s": round(r["wall"], 1),
                "samples_per_s": round(n / r["wall"], 1),
                "peak_rss_gb": round(r["peak_rss"] / 1e9, 2),
                "peak_pss_gb": round(r["peak_pss"] / 1e9, 2),
                "bytes_out_over_in": round(bytes_out / bytes_in, 3),
                "written": m["written"],
                "rejected": m["rejected"],
                "groups": d.get("groups"),
                "samples_in_groups": d.get("samples_in_groups"),
                "shards": len(r["shard_sizes"]),
                "shard_mb_min_med_max": [
                    round(r["shard_sizes"][0] / 1e6, 1),
                    round(r["shard_sizes"][len(r["shard_sizes"]) // 2] / 1e6, 1),
                    round(r["shard_sizes"][-1] / 1e6, 1),
                ],
                "cached_before": None if cached is None else round(cached, 2),
                "load_before": [round(v, 2) for v in load_before],
                "load_after": [round(v, 2) for v in load_after],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(
        ["n", "mode", "repeat", "wall s", "samples/s", "peak RSS GB", "peak PSS GB", "out/in", "groups"]
        + ["cached before", "load"],
        [
            [r["n"], r["mode"], r["repeat"], r["wall_s"], r["samples_per_s"], r["peak_rss_gb"]]
            + [r["peak_pss_gb"], r["bytes_out_over_in"], r["groups"], r["cached_before"], r["load_before"][0]]
            for r in rows
        ],
        title=f"The preprocessing job, {args.workers} workers, page cache before each arm: {args.cache}; "
        "runs in the order run",
    )
    summary = summarise(rows)
    print_table(
        ["n", "mode", "runs", "median wall s", "median samples/s", "max peak RSS GB", "max peak PSS GB"],
        [
            [a["n"], a["mode"], a["runs"], a["wall_s"], a["samples_per_s"], a["peak_rss_gb"]]
            + [a["peak_pss_gb"]]
            for a in summary.values()
        ],
        title="Per arm: medians over the repeats",
    )
    sizes = sorted({r["n"] for r in rows})
    modes = args.modes.split(",")
    if len(sizes) > 1:
        for mode in modes:
            small, big = summary[(sizes[0], mode)], summary[(sizes[-1], mode)]
            rss = big["peak_rss_gb"] / small["peak_rss_gb"]
            pss = big["peak_pss_gb"] / small["peak_pss_gb"]
            print(
                f"memory at {big['n']} / at {small['n']} ({mode}): RSS {rss:.2f}x, PSS {pss:.2f}x "
                "(target <= 1.5x)"
            )
    if "off" in modes and "group" in modes:
        for n in sizes:
            ratio = summary[(n, "group")]["samples_per_s"] / summary[(n, "off")]["samples_per_s"]
            print(
                f"throughput with group / off at {n}: {ratio:.2f} (medians of {args.repeats} alternating "
                f"runs, page cache {args.cache} before each; target >= 0.8)"
            )


def summarise(rows: list[dict]) -> dict[tuple[int, str], dict]:
    """Per (size, mode): the runs, the median wall time and samples/s, the largest memory peaks."""
    out: dict[tuple[int, str], dict] = {}
    for key in dict.fromkeys((r["n"], r["mode"]) for r in rows):
        runs = [r for r in rows if (r["n"], r["mode"]) == key]
        out[key] = {
            "n": key[0],
            "mode": key[1],
            "runs": len(runs),
            "wall_s": round(statistics.median(r["wall_s"] for r in runs), 1),
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 1),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "peak_pss_gb": max(r["peak_pss_gb"] for r in runs),
        }
    return out


if __name__ == "__main__":
    main()

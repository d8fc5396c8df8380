"""Benchmark: the size of the Beam jobs' pipeline protos against the number of label rows.

    python bench/graph_size.py [--rows 31072 105678 1000000] [--baseline_repo /path/to/old/checkout]

Dataflow refuses a job request whose JSON is over 20 MB; the request carries the pipeline proto, so a job
that embeds its label rows in the graph (`beam.Create(rows)`) cannot be submitted past a few hundred thousand
rows. For each row count this builds the preprocessing job's and the download job's pipelines (and batch
prediction's with --ids_csv) exactly as their launchers do, without running them, and prints
`len(p.to_runner_api().SerializeToString())`.

Row counts: 31,072 is the competition's train.csv and 105,678 is train.csv + HPAv18RBGY_wodpl.csv (both read
from ../shared/data/hpa-labels when there; generated rows of the same shape otherwise); other counts are
generated (`{uuid}` Ids with 1-3 labels). `--baseline_repo` measures another checkout of the project (e.g.
`git archive main | tar -x -C /tmp/base`) in a subprocess with the same label files, and prints its figures
beside this tree's, with the ratio.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import uuid

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED_LABELS = os.environ.get(
    "GRAPH_SIZE_LABELS", os.path.join(_ROOT, "..", "shared", "data", "hpa-labels")
)
_COMPETITION = 31072
_WITH_HPAV18 = 105678


def _write_generated(path: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("Id,Target\n")
        for _ in range(n):
            labels = sorted(rng.sample(range(28), rng.choice((1, 1, 2, 3))))
            f.write(f"{uuid.UUID(int=rng.getrandbits(128))},{' '.join(map(str, labels))}\n")


def _label_files(n: int, tmp: str) -> tuple[list[str], str]:
    """Label files holding n rows in all (the real ones when n is their size and they are here)."""
    train = os.path.join(_SHARED_LABELS, "train.csv")
    hpav18 = os.path.join(_SHARED_LABELS, "HPAv18RBGY_wodpl.csv")
    if n == _COMPETITION and os.path.exists(train):
        return [train], "train.csv (real)"
    if n == _WITH_HPAV18 and os.path.exists(train) and os.path.exists(hpav18):
        return [train, hpav18], "train.csv + HPAv18RBGY_wodpl.csv (real)"
    path = os.path.join(tmp, f"generated-{n}.csv")
    if not os.path.exists(path):
        _write_generated(path, n, seed=n)
    return [path], "generated"


def _proto_bytes(p) -> int:
    return len(p.to_runner_api().SerializeToString())


def _measure_preprocess(paths: list[str], tmp: str) -> int:
    import apache_beam as beam

    from pipelines import preprocess
    from schemas import labels as labels_lib

    argv = []
    for k, path in enumerate(paths):
        argv += ["--labels_csv", path, "--input_dir", tmp, "--source", f"s{k}"]
    cfg, _ = preprocess.parse_args([*argv, "--output_dir", os.path.join(tmp, "out")])
    p = beam.Pipeline()
    params = inspect.signature(preprocess.build_pipeline).parameters
    if "rows_by_source" in params:  # the old launcher: rows read here and embedded in the graph
        rows_by_source = []
        for source, input_dir, path in zip(cfg.sources, cfg.input_dir, cfg.labels_csv):
            with open(path, encoding="utf-8-sig") as f:
                rows = labels_lib.parse_label_table(f.read(), source, input_dir, path)
            rows_by_source.append((source, input_dir, rows))
        preprocess.build_pipeline(p, cfg, rows_by_source, None, tmp, tmp, None)
    else:
        preprocess.build_pipeline(p, cfg, tmp, tmp, None)
    return _proto_bytes(p)


def _measure_download(paths: list[str], tmp: str) -> int:
    import apache_beam as beam

    from pipelines import download

    cfg, _ = download.parse_args(["--labels_csv", paths[-1], "--output_dir", os.path.join(tmp, "dl")])
    p = beam.Pipeline()
    params = inspect.signature(download.build_pipeline).parameters
    if "ids" in params:  # the old launcher: Ids embedded
        ids, _ = download.read_ids(cfg.labels_csv, cfg.limit)
        download.build_pipeline(p, cfg, ids, os.path.join(tmp, "partial"), None)
    else:
        download.build_pipeline(p, cfg, os.path.join(tmp, "partial"), None)
    return _proto_bytes(p)


def _measure_batch_predict(paths: list[str], tmp: str) -> int | None:
    """Batch prediction over an image folder with --ids_csv (the model's export is not loaded to build)."""
    import apache_beam as beam
    import numpy as np

    import schemas
    from pipelines import batch_predict as bp

    ids_csv = os.path.join(tmp, f"ids-{os.path.basename(paths[-1])}")
    if not os.path.exists(ids_csv):
        with open(paths[-1]) as f_in, open(ids_csv, "w") as f_out:
            f_out.write(f"{schemas.CSV_ID},{schemas.CSV_PREDICTED}\n")
            next(f_in)
            for line in f_in:
                f_out.write(line.split(",", 1)[0] + ",\n")
    wanted = None
    cfg = bp.JobConfig(
        data_dir=None,
        model_dirs=(os.path.join(tmp, "model"),),
        out=os.path.join(tmp, "pred", "submission.csv"),
        input_dir=tmp,
        ids_csv=ids_csv,
    )
    from model.submission import read_id_list

    fields = {f.name for f in __import__("dataclasses").fields(bp.Inputs)}
    kwargs = dict(
        image_size=16,
        num_records=0,
        thresholds=np.full(schemas.NUM_CLASSES, 0.5),
        thresholds_source="fixed",
        transforms=(0,),
        exports=(os.path.join(tmp, "model", "export"),),
    )
    if "wanted" in fields:
        wanted = read_id_list(ids_csv)
        kwargs["wanted"] = wanted
    p = beam.Pipeline()
    bp.build_pipeline(p, cfg, bp.Inputs(**kwargs), os.path.join(tmp, "work"))
    return _proto_bytes(p)


_JOBS = {
    "preprocess": _measure_preprocess,
    "download": _measure_download,
    "batch_predict": _measure_batch_predict,
}


def _measure(rows: list[int], tmp: str) -> dict:
    out = {}
    for n in rows:
        paths, what = _label_files(n, tmp)
        out[str(n)] = {"labels": what, **{job: fn(paths, tmp) for job, fn in _JOBS.items()}}
    return out


def _measure_in(repo: str, rows: list[int], tmp: str) -> dict:
    """The same measurement with another checkout's packages (a subprocess, that repo first on the path)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]);"
        "import graph_size_impl as g; print(json.dumps(g._measure(json.loads(sys.argv[3]), sys.argv[4])))"
    )
    shim = os.path.join(tmp, "shim")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "graph_size_impl.py"), "w") as f, open(__file__) as src:
        f.write(src.read())
    env = {**os.environ, "PYTHONPATH": repo, "GRAPH_SIZE_LABELS": os.path.abspath(_SHARED_LABELS)}
    res = subprocess.run(
        [sys.executable, "-c", code, os.path.abspath(repo), shim, json.dumps(rows), tmp],
        env=env,
        capture_output=True,
        text=True,
        cwd=repo,
    )
    lines = res.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        sys.exit(f"measurement in {repo} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[_COMPETITION, _WITH_HPAV18, 1_000_000])
    ap.add_argument("--baseline_repo", default=None, help="another checkout of the project to compare with")
    args = ap.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    with tempfile.TemporaryDirectory(prefix="graph-size-") as tmp:
        new = _measure_in(_ROOT, args.rows, tmp)
        old = _measure_in(args.baseline_repo, args.rows, tmp) if args.baseline_repo else None
    print(f"pipeline proto bytes (p.to_runner_api().SerializeToString()); load average {' '.join(load)}")
    head = f"{'rows':>9}  {'labels':<42} {'job':<14} {'this tree':>12}"
    print(head + (f" {'baseline':>12} {'baseline/this':>14}" if old else ""))
    for n in args.rows:
        for job in _JOBS:
            line = f"{n:>9}  {new[str(n)]['labels']:<42} {job:<14} {new[str(n)][job]:>12,}"
            if old:
                line += f" {old[str(n)][job]:>12,} {old[str(n)][job] / new[str(n)][job]:>14.1f}"
            print(line)


if __name__ == "__main__":
    main()

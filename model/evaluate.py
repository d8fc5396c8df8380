"""Tunes per-class thresholds on validation predictions and writes an honest evaluation report.

    python -m model.evaluate --model_dir runs/fold0 [runs/fold1 ...] [--out runs/eval]

Each model dir holds the training job's `val_predictions.npz` (`ids` [n] str, `labels` [n, 28] 0/1,
`scores` [n, 28] probabilities). Several dirs (one per fold) are pooled into out-of-fold predictions; an Id
found in two dirs is an error, since pooled predictions must be out-of-fold.

Outputs:
  * `thresholds.json` (model.thresholds.save_thresholds), tuned on all pooled predictions, written into
    every given model dir, so the prediction job finds them next to each model, and into --out;
  * `report.json`, `report.md` and `per_class_f1.png` in --out (default: the model dir when only one is
    given; required with several).

Figures, side by side: F1 at one 0.5 threshold; F1 at tuned thresholds cross-fitted (the pooled predictions
are cut into stratified splits and each split is thresholded with values tuned on the other splits, so no
sample helps tune its own threshold), the honest figure; and F1 at thresholds tuned and scored on the same
predictions, the optimistic in-sample figure. Per-class precision and recall are the cross-fitted ones.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from typing import Sequence

import numpy as np

import schemas
from model import fileio
from model import thresholds as thr
from model.config import THRESHOLDS_FILE, VAL_IDS, VAL_LABELS, VAL_PREDICTIONS_FILE, VAL_SCORES
from schemas import cli

__all__ = [
    "F1_PLOT_FILE",
    "REPORT_JSON_FILE",
    "REPORT_MD_FILE",
    "EvalConfig",
    "ValPredictions",
    "evaluate_predictions",
    "load_val_predictions",
    "main",
    "plot_per_class_f1",
    "pool_predictions",
    "render_markdown",
    "run",
]

PROG = "hpa-evaluate"
# The files this job writes (what it reads is named in model.config).
REPORT_JSON_FILE = "report.json"
REPORT_MD_FILE = "report.md"
F1_PLOT_FILE = "per_class_f1.png"

_SETTINGS = ("base_threshold", "tuned_cross_fitted", "tuned_in_sample")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Options of the evaluation.

    Attributes:
      thresholds: how thresholds are tuned (model.thresholds.ThresholdConfig).
      cv_splits: splits of the pooled predictions for the cross-fitted figures.
      seed: seed of those splits.
      base_threshold: the single threshold reported for comparison.
    """

    thresholds: thr.ThresholdConfig = thr.ThresholdConfig()
    cv_splits: int = 5
    seed: int = 0
    base_threshold: float = 0.5

    def __post_init__(self):
        if self.cv_splits < 2:
            raise ValueError(f"cv_splits must be at least 2, got {self.cv_splits}")
        if not 0.0 <= self.base_threshold <= 1.0:
            raise ValueError(f"base_threshold must be in [0, 1], got {self.base_threshold}")


@dataclasses.dataclass(frozen=True)
class ValPredictions:
    """Validation predictions of one or more model dirs.

    Attributes:
      ids: str [n] sample Ids.
      labels: int8 [n, NUM_CLASSES] 0/1 labels.
      scores: float64 [n, NUM_CLASSES] probabilities.
      sources: the files they were read from.
    """

    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    sources: tuple[str, ...]


# --- reading and pooling ---------------------------------------------------------------------------------


def load_val_predictions(path: str) -> ValPredictions:
    """Reads and checks one `val_predictions.npz` (given as the file or as its model dir; local or gs://).

    Raises:
      FileNotFoundError: no predictions file.
      ValueError: missing arrays, wrong shapes, labels other than 0/1, scores outside [0, 1], repeated Ids.
    """
    file = path if path.endswith(".npz") else fileio.join(path, VAL_PREDICTIONS_FILE)
    if not fileio.exists(file):
        raise FileNotFoundError(
            f"{file} not found: {path!r} is not the model dir of a finished training run "
            f"(the training job writes {VAL_PREDICTIONS_FILE} there)"
        )
    try:
        with np.load(io.BytesIO(fileio.read_bytes(file)), allow_pickle=False) as npz:
            missing = [k for k in (VAL_IDS, VAL_LABELS, VAL_SCORES) if k not in npz.files]
            if missing:
                raise ValueError(f"{file} lacks the arrays {missing} (it has {sorted(npz.files)})")
            ids, labels, scores = npz[VAL_IDS], npz[VAL_LABELS], npz[VAL_SCORES]
    except (OSError, EOFError) as e:  # zipfile.BadZipFile is an OSError subclass in numpy's wrapping
        raise ValueError(f"{file} is not a readable .npz file: {e}") from None
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{file}: {VAL_IDS!r} must be a str array, not Python objects") from None
        raise
    if ids.dtype.kind == "S":
        ids = np.char.decode(ids, "utf-8")
    if ids.dtype.kind != "U" or ids.ndim != 1:
        raise ValueError(f"{file}: {VAL_IDS!r} must be a 1-D str array, got {ids.dtype} of shape {ids.shape}")
    n = len(ids)
    want = (n, schemas.NUM_CLASSES)
    for key, arr in ((VAL_LABELS, labels), (VAL_SCORES, scores)):
        if arr.shape != want:
            raise ValueError(f"{file}: {key!r} has shape {arr.shape}, expected {want} ({n} Ids x classes)")
    if n == 0:
        raise ValueError(f"{file} holds no predictions")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{file}: {VAL_LABELS!r} must hold only 0 and 1")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all() or scores.min() < 0.0 or scores.max() > 1.0:
        raise ValueError(
            f"{file}: {VAL_SCORES!r} must be probabilities in [0, 1] (got min {np.nanmin(scores):.4g}, "
            f"max {np.nanmax(scores):.4g}; logits must go through a sigmoid first)"
        )
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{file}: repeated Ids, e.g. {uniq[counts > 1][:3].tolist()}")
    return ValPredictions(ids=ids, labels=labels.astype(np.int8), scores=scores, sources=(file,))


def pool_predictions(parts: Sequence[ValPredictions]) -> ValPredictions:
    """Concatenates the predictions of several folds into pooled out-of-fold predictions.

    Raises:
      ValueError: no parts, or an Id in more than one part (predictions would not be out-of-fold).
    """
    if not parts:
        raise ValueError("no predictions to pool")
    ids = np.concatenate([p.ids for p in parts])
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][:3].tolist()
        where = [p.sources[0] for p in parts if np.isin(dup[0], p.ids)]
        raise ValueError(
            f"Id {dup[0]!r} (and {int((counts > 1).sum()) - 1} more) is in several prediction files {where}: "
            "pooled predictions must be out-of-fold, one fold per model dir"
        )
    return ValPredictions(
        ids=ids,
        labels=np.concatenate([p.labels for p in parts]),
        scores=np.concatenate([p.scores for p in parts]),
        sources=tuple(s for p in parts for s in p.sources),
    )


# --- the evaluation --------------------------------------------------------------------------------------


def _summary(scores: thr.Scores) -> dict:
    return {"macro_f1": scores.macro_f1, "micro_f1": scores.micro_f1}


def evaluate_predictions(
    labels: np.ndarray, scores: np.ndarray, config: EvalConfig = EvalConfig()
) -> tuple[dict, thr.ThresholdFit]:
    """Tunes thresholds on all predictions and measures F1 three ways.

    Args:
      labels: [n, NUM_CLASSES] 0/1 labels.
      scores: [n, NUM_CLASSES] probabilities.
      config: evaluation options.

    Returns:
      (report, fit): the report as a JSON-ready dict (`summary` per setting, `classes` per class,
      `config`), and the thresholds tuned on all predictions (the ones to save).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != schemas.NUM_CLASSES:
        raise ValueError(f"labels must have shape [n, {schemas.NUM_CLASSES}], got {labels.shape}")
    fit = thr.fit_thresholds(labels, scores, config.thresholds)
    base = thr.score_predictions(
        labels, thr.apply_thresholds(scores, np.full(labels.shape[1], config.base_threshold))
    )
    in_sample = thr.score_predictions(labels, thr.apply_thresholds(scores, fit.values))
    crossed = thr.cross_fit(labels, scores, config.thresholds, n_splits=config.cv_splits, seed=config.seed)
    honest = crossed.scores
    classes = []
    for c, name in enumerate(schemas.CLASS_NAMES):
        classes.append(
            {
                "index": c,
                "name": name,
                "support": int(honest.support[c]),
                "threshold": float(fit.values[c]),
                "rule": fit.rules[c],
                "precision": float(honest.precision[c]),
                "recall": float(honest.recall[c]),
                "f1": float(honest.f1[c]),
                "f1_base_threshold": float(base.f1[c]),
                "f1_in_sample": float(in_sample.f1[c]),
            }
        )
    report = {
        "num_samples": int(labels.shape[0]),
        "summary": {
            "base_threshold": _summary(base),
            "tuned_cross_fitted": _summary(honest),
            "tuned_in_sample": _summary(in_sample),
        },
        "classes": classes,
        "classes_without_support": [schemas.CLASS_NAMES[c] for c in np.flatnonzero(honest.support == 0)],
        "config": dataclasses.asdict(config),
    }
    return report, fit


def render_markdown(report: dict) -> str:
    """The report as Markdown: the three summary figures, then one row per class."""
    cfg = report["config"]
    base_t = cfg["base_threshold"]
    names = {
        "base_threshold": f"one threshold {base_t:g}",
        "tuned_cross_fitted": f"tuned per class, cross-fitted ({cfg['cv_splits']} splits)",
        "tuned_in_sample": "tuned per class, in-sample (optimistic)",
    }
    t = cfg["thresholds"]
    lines = [
        "# Evaluation report",
        "",
        f"{report['num_samples']} validation predictions from:",
        "",
        *[f"- `{s}`" for s in report.get("sources", [])],
        "",
        "| thresholds | macro F1 | micro F1 |",
        "| --- | ---: | ---: |",
        *[
            f"| {names[k]} | {s['macro_f1']:.4f} | {s['micro_f1']:.4f} |"
            for k, s in ((k, report["summary"][k]) for k in _SETTINGS)
        ],
        "",
        "The cross-fitted row is the honest one: each split of the predictions is thresholded with values",
        "tuned on the other splits. The in-sample row tunes and scores on the same predictions.",
        f"Thresholds: exact F1 search per class; classes with fewer than {t['min_positives']} positives "
        f"use the `{t['rare_rule']}` rule.",
        "",
        "| # | class | support | threshold | rule | precision | recall | F1 | F1 at one t. | F1 in-sample |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["classes"]:
        lines.append(
            f"| {r['index']} | {r['name']} | {r['support']} | {r['threshold']:.4f} | {r['rule']} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['f1_base_threshold']:.3f} | "
            f"{r['f1_in_sample']:.3f} |"
        )
    if report["classes_without_support"]:
        lines += ["", f"No positives (F1 counted as 0): {', '.join(report['classes_without_support'])}."]
    lines += ["", f"![per-class F1]({F1_PLOT_FILE})", ""]
    return "\n".join(lines)


def plot_per_class_f1(report: dict) -> bytes:
    """Horizontal bars of cross-fitted F1 per class, the other two settings as markers; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["classes"]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh(y, [r["f1"] for r in rows], color="tab:blue", label="tuned, cross-fitted")
    ax.plot([r["f1_in_sample"] for r in rows], y, "k|", markersize=10, label="tuned, in-sample")
    ax.plot(
        [r["f1_base_threshold"] for r in rows],
        y,
        "o",
        color="tab:orange",
        markersize=4,
        label=f"threshold {report['config']['base_threshold']:g}",
    )
    ax.set_yticks(y, [f"{r['index']} {r['name']} ({r['support']})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    macro = report["summary"]["tuned_cross_fitted"]["macro_f1"]
    ax.set_title(f"Per-class F1 (support in brackets); cross-fitted macro F1 {macro:.3f}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(
    model_dirs: Sequence[str],
    out_dir: str | None = None,
    config: EvalConfig = EvalConfig(),
    write_model_dirs: bool = True,
) -> dict:
    """Pools the model dirs' validation predictions, tunes thresholds, writes them and the report.

    Args:
      model_dirs: training output dirs (or their `val_predictions.npz` files), one per fold.
      out_dir: where the report goes; default the single model dir (required with several).
      config: evaluation options.
      write_model_dirs: also write `thresholds.json` into every model dir (for the prediction job).

    Returns:
      The report dict (also written as report.json).
    """
    model_dirs = list(model_dirs)
    if not model_dirs:
        raise ValueError("give at least one model dir")
    if out_dir is None:
        if len(model_dirs) > 1:
            raise ValueError("several model dirs are pooled: give --out for the pooled report")
        out_dir = model_dirs[0]
        if out_dir.endswith(".npz"):
            out_dir = os.path.dirname(out_dir) or "."
    parts = []
    for d in model_dirs:
        parts.append(load_val_predictions(d))
        print(f"read {len(parts[-1].ids)} predictions from {parts[-1].sources[0]}", flush=True)
    pooled = pool_predictions(parts)
    print(
        f"tuning thresholds on {len(pooled.ids)} pooled predictions, "
        f"cross-fitting in {config.cv_splits} splits"
    )
    report, fit = evaluate_predictions(pooled.labels, pooled.scores, config)
    report["sources"] = list(pooled.sources)

    fileio.makedirs(out_dir)
    extra = {"sources": list(pooled.sources)}
    targets = [fileio.join(out_dir, THRESHOLDS_FILE)]
    if write_model_dirs:
        targets += [fileio.join(d, THRESHOLDS_FILE) for d in model_dirs if not d.endswith(".npz")]
    for path in dict.fromkeys(targets):
        thr.save_thresholds(path, fit, **extra)
        print(f"wrote {path}")
    outputs = {
        REPORT_JSON_FILE: (json.dumps(report, indent=2) + "\n").encode(),
        REPORT_MD_FILE: render_markdown(report).encode(),
        F1_PLOT_FILE: plot_per_class_f1(report),
    }
    for name, data in outputs.items():
        fileio.write_bytes(fileio.join(out_dir, name), data)
        print(f"wrote {fileio.join(out_dir, name)}")
    for key in _SETTINGS:
        s = report["summary"][key]
        print(f"{key:>20}: macro F1 {s['macro_f1']:.4f}  micro F1 {s['micro_f1']:.4f}")
    return report


def _parse_args(argv):
    d = EvalConfig()
    p = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Pool the validation predictions of one or more model dirs (one per fold), tune a threshold per "
            f"class, write {THRESHOLDS_FILE} into each model dir and --out, and write {REPORT_JSON_FILE}, "
            f"{REPORT_MD_FILE} and {F1_PLOT_FILE} into --out."
        ),
    )
    p.add_argument(
        "--model_dir", nargs="+", required=True, metavar="DIR", help=f"dirs holding {VAL_PREDICTIONS_FILE}"
    )
    p.add_argument("--out", default=None, help="report dir (default: the model dir; required with several)")
    p.add_argument(
        "--min_positives",
        type=int,
        default=d.thresholds.min_positives,
        help="classes with fewer positives use --rare_rule (default %(default)s)",
    )
    p.add_argument(
        "--rare_rule",
        choices=thr.RARE_RULES,
        default=d.thresholds.rare_rule,
        help="rate: match the class's share; shrink: toward a global threshold; fit: none "
        "(default %(default)s)",
    )
    p.add_argument(
        "--global_threshold",
        type=float,
        default=None,
        help="global threshold of the shrink rule (default: fitted on all classes pooled)",
    )
    p.add_argument(
        "--cv_splits", type=int, default=d.cv_splits, help="splits for cross-fitting (%(default)s)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the splits (%(default)s)")
    p.add_argument(
        "--base_threshold", type=float, default=d.base_threshold, help="single threshold shown for comparison"
    )
    p.add_argument(
        "--no_model_dir_thresholds",
        action="store_true",
        help=f"write {THRESHOLDS_FILE} only into --out, not into the model dirs",
    )
    return p.parse_args(argv)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m model.evaluate`; returns the exit status."""
    args = _parse_args(argv)
    try:
        config = EvalConfig(
            thresholds=thr.ThresholdConfig(
                min_positives=args.min_positives,
                rare_rule=args.rare_rule,
                global_threshold=args.global_threshold,
            ),
            cv_splits=args.cv_splits,
            seed=args.seed,
            base_threshold=args.base_threshold,
        )
        run(args.model_dir, args.out, config, write_model_dirs=not args.no_model_dir_thresholds)
    except (FileNotFoundError, ValueError) as e:
        return cli.bad_input(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

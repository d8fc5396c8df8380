"""One page per run for a biologist: `report.html`, written by `hpa-inspect` beside its PNG sheets.

A single static file (no server, no internet, no external script or font): the run's settings and data, the
training curves of every model, per class a precision-recall curve with the chosen threshold marked, the
class's precision, recall and F1 with its support (undefined figures shown as "–"), thumbnails of its top hits
and worst misses (inline images), a stain legend and the Grad-CAM colour bar, and a table whose columns sort
on a click. Curves are inline SVG drawn here from numpy arrays; images are PNG data URIs.

`build_html(ReportData)` is pure (no TensorFlow): the tests and the browser test build pages from small
arrays.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from typing import Mapping, Sequence

import numpy as np

import schemas
from model import fileio
from model.config import CONFIG_FILE

REPORT_FILE = "report.html"
UNDEFINED = "–"  # an en dash: a ratio with a zero denominator
STAIN_LEGEND = (
    ("red", "#e03030", "microtubules"),
    ("green", "#30b030", "the protein of interest (antibody)"),
    ("blue", "#3050e0", "nucleus"),
    ("yellow", "#d0c020", "endoplasmic reticulum (ER); added to red and green in the composite"),
)
GRAD_CAM_SENTENCE = (
    "Grad-CAM shows where in the image the model found the evidence for the class: bright (yellow) regions "
    "raised the class's score most, dark ones not at all; it is drawn over the green (protein) stain."
)
HISTORY_SERIES = (("loss", "#1f77b4"), ("val_loss", "#ff7f0e"), ("f1", "#2ca02c"), ("val_f1", "#d62728"))


@dataclasses.dataclass(frozen=True)
class Thumb:
    """One sample shown for a class: its composite and Grad-CAM overlay (uint8 RGB) and caption lines."""

    composite: np.ndarray
    overlay: np.ndarray
    caption: Sequence[str]
    kind: str  # "hit", "false positive", "false negative", "top score"


@dataclasses.dataclass(frozen=True)
class ReportData:
    """What the page shows.

    Attributes:
      title: the page's heading.
      settings: (name, value) rows of the run's settings and data.
      notes: sentences under the settings (how the scores and thresholds came about).
      histories: model dir -> rows of its history.csv (may be empty).
      thresholds: [C] per-class thresholds.
      scores: [n, C] probabilities; labels: [n, C] 0/1, or None when the samples are unlabeled.
      thumbs: class index -> thumbnails; sheets: class index -> the PNG sheet's file name (absent: none).
      colormap: [256, 3] uint8 colours of the Grad-CAM scale, low to high.
    """

    title: str
    settings: Sequence[tuple[str, str]]
    notes: Sequence[str]
    histories: Mapping[str, Sequence[Mapping[str, str]]]
    thresholds: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    thumbs: Mapping[int, Sequence[Thumb]]
    sheets: Mapping[int, str]
    colormap: np.ndarray


# --- figures ---------------------------------------------------------------------------------------------


def class_figures(labels: np.ndarray, predicted: np.ndarray) -> list[dict]:
    """Per class: support, predicted, precision, recall, F1 (None where the ratio is undefined)."""
    y, p = np.asarray(labels, bool), np.asarray(predicted, bool)
    out = []
    for c in range(y.shape[1]):
        tp = int((y[:, c] & p[:, c]).sum())
        support, pred = int(y[:, c].sum()), int(p[:, c].sum())
        out.append(
            {
                "support": support,
                "predicted": pred,
                "precision": tp / pred if pred else None,
                "recall": tp / support if support else None,
                "f1": 2 * tp / (support + pred) if support + pred else None,
            }
        )
    return out


def pr_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, threshold) at each distinct score, highest threshold first (no positive: empty)."""
    y = np.asarray(y, bool)
    if not y.any():
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]  # the last index of each score
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    return tp / y.sum(), tp / (tp + fp), s_sorted[last]


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure, or "–" when undefined."""
    return (
        UNDEFINED
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


# --- SVG -------------------------------------------------------------------------------------------------


def _polyline(xs, ys, colour: str, width: float = 1.5, dash: str = "") -> str:
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{colour}" stroke-width="{width}"{extra} points="{points}"/>'


def pr_svg(y: np.ndarray, s: np.ndarray, threshold: float, size: tuple[int, int] = (200, 150)) -> str:
    """A precision-recall curve with the point at `threshold` marked (an empty frame without positives)."""
    w, h, m = size[0], size[1], 28
    pw, ph = w - m - 8, h - m - 8

    def px(r):
        return m + r * pw

    def py(p):
        return 8 + (1 - p) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        f'aria-label="precision-recall curve">',
        f'<rect x="{m}" y="8" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
        f'<text x="{m + pw / 2}" y="{h - 4}" font-size="10" text-anchor="middle">recall</text>',
        f'<text x="10" y="{8 + ph / 2}" font-size="10" text-anchor="middle" '
        f'transform="rotate(-90 10 {8 + ph / 2})">precision</text>',
        f'<text x="{m - 3}" y="12" font-size="9" text-anchor="end">1</text>',
        f'<text x="{m - 3}" y="{8 + ph}" font-size="9" text-anchor="end">0</text>',
        f'<text x="{m + pw}" y="{8 + ph + 10}" font-size="9" text-anchor="end">1</text>',
    ]
    recall, precision, thr = pr_curve(y, s)
    if len(recall):
        xs = np.r_[0.0, recall]
        ys = np.r_[precision[0], precision]
        parts.append(_polyline(px(xs), py(ys), "#1f77b4"))
        at = (
            int(np.searchsorted(-thr, -threshold, side="right")) - 1
        )  # the last point with score >= threshold
        if at >= 0:
            parts.append(
                f'<circle cx="{px(recall[at]):.1f}" cy="{py(precision[at]):.1f}" r="4" fill="#d62728">'
                f"<title>threshold {threshold:.3f}: precision {precision[at]:.3f}, recall {recall[at]:.3f}"
                "</title></circle>"
            )
    else:
        parts.append(
            f'<text x="{m + pw / 2}" y="{8 + ph / 2}" font-size="10" text-anchor="middle">no positives</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def history_svg(rows: Sequence[Mapping[str, str]], size: tuple[int, int] = (520, 220)) -> str:
    """Training curves: loss and F1, training and validation, per epoch (two panels side by side)."""
    w, h, m = size[0], size[1], 32
    panel = (w - 3 * m) / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        'aria-label="training curves">'
    ]
    epochs = np.arange(1, len(rows) + 1)
    for k, (metric, title) in enumerate((("loss", "loss"), ("f1", "F1 (threshold 0.5)"))):
        x0 = m + k * (panel + m)
        series = {
            name: np.array([float(r[name]) for r in rows if r.get(name, "") not in ("", None)])
            for name, _ in HISTORY_SERIES
            if name.endswith(metric)
        }
        values = np.concatenate([v for v in series.values() if len(v)] or [np.zeros(1)])
        lo, hi = (0.0, max(1e-9, float(values.max()))) if metric == "loss" else (0.0, 1.0)
        parts += [
            f'<rect x="{x0}" y="16" width="{panel}" height="{h - 48}" fill="#fafafa" stroke="#999"/>',
            f'<text x="{x0 + panel / 2}" y="12" font-size="11" text-anchor="middle">{title}</text>',
            f'<text x="{x0 + panel / 2}" y="{h - 6}" font-size="10" text-anchor="middle">epoch</text>',
            f'<text x="{x0 - 3}" y="22" font-size="9" text-anchor="end">{hi:.2g}</text>',
            f'<text x="{x0 - 3}" y="{h - 32}" font-size="9" text-anchor="end">{lo:.2g}</text>',
        ]
        for name, colour in HISTORY_SERIES:
            v = series.get(name)
            if v is None or len(v) == 0:
                continue
            xs = x0 + (epochs[: len(v)] - 1) / max(1, len(rows) - 1) * panel
            ys = 16 + (1 - (v - lo) / (hi - lo)) * (h - 48)
            parts.append(_polyline(xs, ys, colour, dash="" if name.startswith("val_") else "4 2"))
    parts.append("</svg>")
    return "".join(parts)


# --- what hpa-inspect shows ---


def notes(cfg, summary: dict, labeled: bool) -> list[str]:
    """What the figures are, in plain words (index.html and report.html); cfg: an InspectConfig."""
    notes = [
        f"Data: {cfg.data_dir}, {summary['subset']}, {summary['records']} samples.",
        f"Models ({len(cfg.model_dirs)}, their probabilities averaged): {', '.join(cfg.model_dirs)}.",
        (
            f"Scores from {cfg.probabilities}. "
            if cfg.probabilities
            else f"Scores averaged over {cfg.tta} test-time transform(s). "
        )
        + f"Grad-CAM of the untransformed image from {cfg.model_dirs[0]}"
        + (" (the first model only)." if len(cfg.model_dirs) > 1 else "."),
        f"Thresholds: {summary['thresholds']}.",
    ]
    if labeled and cfg.answers:
        notes.append(
            f"Macro F1 {summary['macro_f1']:.4f}, micro F1 {summary['micro_f1']:.4f} on held-out samples "
            f"(their labels from {cfg.answers}; the thresholds were tuned on validation data). Here a class "
            "counts as predicted when its score reaches its threshold. The submission (hpa-predict) also "
            "gives each sample with no class above its threshold its single most likely class, so "
            "hpa-score's figures for the submission can differ slightly."
        )
    elif labeled:
        notes.append(
            f"Macro F1 {summary['macro_f1']:.4f}, micro F1 {summary['micro_f1']:.4f} at these thresholds, on "
            "the fold they were tuned on: an optimistic figure; hpa-evaluate's report.md has the honest, "
            "cross-fitted one."
        )
    return notes


def settings_rows(cfg, summary: dict, score_note: str) -> list[tuple[str, str]]:
    """The run's settings and data, as (name, value) rows of report.html."""
    import json

    rows = [
        ("data", f"{cfg.data_dir} ({summary['subset']}, {summary['records']} samples)"),
        ("labels", cfg.answers or ("from the records" if not cfg.test else "none (unlabeled test samples)")),
        ("scores", score_note),
        ("thresholds", str(summary["thresholds"])),
    ]
    for d in cfg.model_dirs:
        path = fileio.join(d, CONFIG_FILE)
        try:
            conf = json.loads(fileio.read_text(path)) if fileio.exists(path) else {}
        except ValueError:
            conf = {}
        model, train = conf.get("model", {}), conf
        data = conf.get("data", {})
        parts = [
            f"backbone {model.get('backbone', '?')} (weights {model.get('weights', '?')})",
            f"{data.get('image_size', '?')} px",
            f"{train.get('epochs', '?')} epochs max, batch {data.get('batch_size', '?')}",
            f"loss {train.get('loss', '?')}, learning rate {train.get('learning_rate', '?')} "
            f"({train.get('lr_schedule', '?')})",
            f"validation fold {train.get('val_fold', '?')}, TTA {train.get('val_tta', '?')}",
        ]
        rows.append((f"model {d}", "; ".join(parts)))
    return rows


def index_html(cfg, summary: dict, table: Sequence[dict], labeled: bool) -> str:
    """A plain index of the sheets (report.html beside it is the page to read)."""
    esc = html.escape
    head = ["#", "class", "sheet", "threshold"]
    head += ["support", "predicted", "precision", "recall", "F1"] if labeled else ["predicted"]
    rows = []
    for r in table:
        sheet = f'<a href="{esc(r["sheet"])}">{esc(r["sheet"])}</a>' if r["sheet"] else UNDEFINED
        cells = [str(r["index"]), esc(r["name"]), sheet, f"{r['threshold']:.3f}"]
        if labeled:
            cells += [str(r["support"]), str(r["predicted"])]
            cells += [fmt(r[k]) for k in ("precision", "recall", "f1")]
        else:
            cells.append(str(r["predicted"]))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines = notes(cfg, summary, labeled)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>HPA gallery</title>\n"
        "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:right} "
        "td:nth-child(2),th:nth-child(2),td:nth-child(3),th:nth-child(3){text-align:left}</style></head>"
        f'<body>\n<h1>Gallery</h1>\n<p>The run\'s report: <a href="{REPORT_FILE}">'
        f"{REPORT_FILE}</a></p>\n<ul>"
        + "".join(f"<li>{esc(n)}</li>" for n in lines)
        + "</ul>\n<table>\n<tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>\n"
        + "\n".join(rows)
        + "\n</table>\n</body></html>\n"
    )


# --- images ----------------------------------------------------------------------------------------------


def png_data_uri(rgb: np.ndarray) -> str:
    """A uint8 RGB array as a `data:image/png;base64,...` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colour_bar_uri(colormap: np.ndarray, width: int = 256, height: int = 12) -> str:
    """The Grad-CAM colour scale as an image, low (left) to high (right)."""
    idx = np.linspace(0, len(colormap) - 1, width).round().astype(int)
    return png_data_uri(np.repeat(np.asarray(colormap, np.uint8)[idx][None], height, axis=0))


# --- the page --------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1320px;
 padding:0 16px 40px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:.6em 0 .2em} h2{font-size:1.2em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}
th,td{padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f3f3f3;text-align:left;position:sticky;top:0}
th.num,td.num{text-align:right}
th.sortable{cursor:pointer;white-space:nowrap} th.sortable::after{content:" \\2195";color:#999}
.settings td:first-child{color:#555;white-space:nowrap}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center;margin:.4em 0}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #888;vertical-align:middle;
 margin-right:4px}
.cls{border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:10px 0}
.cls h3{margin:0 0 4px;font-size:1.05em}
.cls .row{display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:200px;font-size:.75em}
figure img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}
figure .kind{font-weight:bold}
figure.miss .kind{color:#b02020} figure.hit .kind{color:#207020}
.muted{color:#777}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th.sortable').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-order') !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
      th.setAttribute('data-order', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        if (x === '' && y !== '') { return 1; }
        if (y === '' && x !== '') { return -1; }
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _cell(text: str, value, numeric: bool) -> str:
    """A table cell with its sort key (`data-v`; '' for an undefined figure, which sorts last)."""
    v = "" if value is None else html.escape(str(value))
    return f'<td class="{"num" if numeric else ""}" data-v="{v}">{text}</td>'


def _legend(colormap: np.ndarray) -> str:
    stains = "".join(
        f'<span><span class="swatch" style="background:{colour}"></span><b>{name}</b>: '
        f"{html.escape(what)}</span>"
        for name, colour, what in STAIN_LEGEND
    )
    bar = (
        f'<span>Grad-CAM: low <img src="{colour_bar_uri(colormap)}" alt="Grad-CAM colour scale, low to high" '
        'width="160" height="12" style="vertical-align:middle;border:1px solid #888"> high</span>'
    )
    return (
        f'<div class="legend">Stains in the composite (left image of each pair): {stains}</div>'
        f'<div class="legend">{bar}</div><p class="muted">{html.escape(GRAD_CAM_SENTENCE)}</p>'
    )


def _thumb(t: Thumb) -> str:
    kind_class = "hit" if t.kind in ("hit", "top score") else "miss"
    caption = "<br>".join(html.escape(line) for line in t.caption)
    return (
        f'<figure class="{kind_class}"><img src="{png_data_uri(t.composite)}" alt="composite">'
        f'<img src="{png_data_uri(t.overlay)}" alt="Grad-CAM over the green stain">'
        f'<figcaption><span class="kind">{html.escape(t.kind)}</span><br>{caption}</figcaption></figure>'
    )


def build_html(data: ReportData) -> str:
    """The report page (a complete HTML document)."""
    esc = html.escape
    labeled = data.labels is not None
    predicted = data.scores >= data.thresholds[None, :]
    figures = class_figures(data.labels, predicted) if labeled else None
    names = schemas.CLASS_NAMES
    out = [
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(data.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(data.title)}</h1>",
        "<h2>Run settings and data</h2><table class='settings'><tbody>",
        *(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in data.settings),
        "</tbody></table>",
        *(f"<p>{esc(n)}</p>" for n in data.notes),
        "<h2>Training curves</h2>",
    ]
    if not any(data.histories.values()):
        out.append("<p class='muted'>no history.csv in the model dirs</p>")
    for model_dir, rows in data.histories.items():
        if rows:
            key = " ".join(
                f'<span><span class="swatch" style="background:{c}"></span>{n}</span>'
                for n, c in HISTORY_SERIES
            )
            out.append(
                f"<p>{esc(model_dir)}: {len(rows)} epochs <span class='legend'>{key} (dashed: training, "
                f"solid: validation)</span></p>{history_svg(rows)}"
            )
    # The per-class table.
    head = [("#", True), ("class", False), ("threshold", True)]
    if labeled:
        head += [("support", True), ("predicted", True), ("precision", True), ("recall", True), ("F1", True)]
    else:
        head += [("predicted", True)]
    head += [("sheet", False)]
    out.append("<h2>Classes</h2>")
    if labeled:
        out.append(
            "<p>Per class at its threshold: <b>support</b> is the number of samples that truly have the "
            "class, <b>predicted</b> the number given it; precision = right among predicted, recall = found "
            f"among true; “{UNDEFINED}” where a figure is undefined (nothing predicted, or no true sample). "
            "Click a column heading to sort.</p>"
        )
    out.append("<table class='sortable classes'><thead><tr>")
    out += [f'<th class="sortable{" num" if num else ""}">{h}</th>' for h, num in head]
    out.append("</tr></thead><tbody>")
    for c, name in enumerate(names):
        sheet = data.sheets.get(c)
        cells = [
            _cell(str(c), c, True),
            _cell(f'<a href="#class-{c}">{esc(name)}</a>', name, False),
            _cell(f"{data.thresholds[c]:.3f}", f"{data.thresholds[c]:.6f}", True),
        ]
        if labeled:
            f = figures[c]
            cells += [
                _cell(str(f["support"]), f["support"], True),
                _cell(str(f["predicted"]), f["predicted"], True),
            ]
            cells += [_cell(fmt(f[k]), f[k], True) for k in ("precision", "recall", "f1")]
        else:
            cells.append(_cell(str(int(predicted[:, c].sum())), int(predicted[:, c].sum()), True))
        link = f'<a href="{esc(sheet)}">{esc(sheet)}</a>' if sheet else UNDEFINED
        cells.append(_cell(link, sheet or "", False))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    # Per class: curve, figures, thumbnails.
    out.append("<h2>Class by class</h2>")
    out.append(_legend(data.colormap))
    out.append(
        "<p>Each pair: left the sample as the atlas shows it, right the green stain under the Grad-CAM of "
        "the class. The precision-recall curve runs over every threshold; the red dot is the threshold in "
        "use.</p>"
    )
    for c, name in enumerate(names):
        line = f"threshold {data.thresholds[c]:.3f}"
        if labeled:
            f = figures[c]
            line += (
                f"; support {f['support']}, predicted {f['predicted']}, precision {fmt(f['precision'])}, "
                f"recall {fmt(f['recall'])}, F1 {fmt(f['f1'])}"
            )
        thumbs = data.thumbs.get(c, ())
        body = "".join(_thumb(t) for t in thumbs) or "<p class='muted'>no sample to show</p>"
        curve = pr_svg(data.labels[:, c], data.scores[:, c], float(data.thresholds[c])) if labeled else ""
        out.append(
            f"<div class='cls' id='class-{c}'><h3>{c}: {esc(name)}</h3><div class='muted'>{esc(line)}</div>"
            f"<div class='row'>{curve}<div class='thumbs'>{body}</div></div></div>"
        )
    out.append(f"<script>{_SORT_JS}</script></body></html>\n")
    return "\n".join(out)

"""Image galleries with class activation maps: what the model gets right and wrong, class by class.

    python -m model.inspect --model_dir runs/fold0 [runs/fold1 ...] --data_dir out \\
        [--fold K | --test [--answers test_labels.csv]] --out gallery [--per_class 6] \\
        [--tta 1 | --probabilities test_probabilities.npz]

Scores one fold (default: the models' validation fold) or the test shards with the models (their
probabilities averaged over `--tta` transforms and then over the models, as `model.predict` does), and writes
for every class a PNG sheet `class_{index:02d}.png` with three rows:

  * true positives with the highest scores,
  * the worst false positives (negatives with the highest scores),
  * the worst false negatives (positives with the lowest scores),

where positive means score >= the class's threshold (thresholds.json of the model dirs where present, else
0.5). With `--test` (no labels) the sheet holds the highest-scoring samples only, unless `--answers` gives
the test part's labels (`Id,Target`, as `model.score` reads them): then its rows and F1 table are those of
held-out samples. `--probabilities` takes the scores `model.predict --probabilities` wrote for these records
instead of scoring them again (so the gallery shows exactly the submission's scores, and costs only the
Grad-CAM and drawing). Each tile shows the sample as the atlas shows it (RGB composite: red microtubules,
green protein, blue nucleus, yellow ER added to red and green) beside the green stain with the Grad-CAM heat
map of the sheet's class over it, and under them the Id, the class's score, the true labels and the
predicted labels with their scores. `index.html` links the sheets with the per-class F1 table
(`model.thresholds.score_predictions`).

Grad-CAM (`grad_cam`): the gradient of the class's logit with respect to the backbone's output feature map,
averaged over the map to weigh its channels, the weighted sum through a ReLU, upsampled to the image size.
It is computed only for the tiles shown, on the untransformed image, and with an ensemble from the first
model only (the sheets say so).

Two passes over the data: the first scores every record, the second decodes only the records shown, so
memory does not grow with the fold. Bad input (a model dir without model.keras or config.json, a fold absent
from the data, models or data of different image sizes, dirs holding different thresholds) stops the job
with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import time
import weakref
from typing import Callable, Sequence

import numpy as np

import schemas
from model import fileio
from model import report as report_lib
from model import thresholds as thr
from model.config import HISTORY_FILE, THRESHOLDS_FILE, TTA_CHOICES
from model.rundir import read_history
from schemas import cli

__all__ = [
    "DEFAULT_THRESHOLD",
    "INDEX_FILE",
    "InspectConfig",
    "InspectError",
    "Selection",
    "atlas_composite",
    "grad_cam",
    "heat_overlay",
    "main",
    "run",
    "select_tiles",
    "sheet_name",
]

PROG = "hpa-inspect"
DEFAULT_THRESHOLD = 0.5
INDEX_FILE = "index.html"
ROW_TITLES = {
    "tp": "true positives, highest scores",
    "fp": "worst false positives (negatives, highest scores)",
    "fn": "worst false negatives (positives, lowest scores)",
    "top": "highest scores (no labels)",
}
CAM_COLORMAP = "inferno"
REPORT_PER_ROW = 3  # thumbnails per row kind in report.html
STAIN_NOTE = "stains: red microtubules, green protein, blue nucleus, yellow ER (added to red and green)"
_IN_SETTINGS = ("Data:", "Models (", "Thresholds:")  # notes that report.html's settings table already shows
_THUMB_KIND = {"tp": "hit", "fp": "false positive", "fn": "false negative", "top": "top score"}
_TILE = 160  # display side of one image panel, px
_LINE = 13
_PAD = 6
_FONT_SIZE = 11


class InspectError(ValueError):
    """Bad flags or inputs; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class InspectConfig:
    """One gallery run.

    Attributes:
      model_dirs: training output dirs; their probabilities are averaged, Grad-CAM uses the first.
      data_dir: the preprocessing job's output (local or gs://).
      out: the gallery directory to write (local or gs://).
      fold: the labeled fold to show; None with `test` False: the models' validation fold.
      test: show the unlabeled test shards instead of a fold.
      answers: with `test`, a CSV (`Id,Target`) of the test part's labels (e.g. the synthetic dataset's
        test_labels.csv): the gallery then has the three rows and the F1 table, on held-out samples.
      probabilities: an npz of `model.predict --probabilities` (ids, scores) to show instead of scoring the
        records (None: score them); its Ids must be records of the subset shown.
      per_class: tiles per row of a sheet.
      tta: transforms averaged per model for the scores (one of TTA_CHOICES).
      batch_size: records per batch.
    """

    model_dirs: tuple[str, ...]
    data_dir: str
    out: str
    fold: int | None = None
    test: bool = False
    answers: str | None = None
    probabilities: str | None = None
    per_class: int = 6
    tta: int = 1
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.model_dirs:
            raise InspectError("give at least one --model_dir")
        if len(set(self.model_dirs)) != len(self.model_dirs):
            raise InspectError(f"a model dir is given twice: {list(self.model_dirs)}")
        if self.test and self.fold is not None:
            raise InspectError("give --fold or --test, not both")
        if self.answers is not None and not self.test:
            raise InspectError("--answers gives the labels of the test shards: use it with --test")
        if self.fold is not None and self.fold < 0:
            raise InspectError(f"--fold must be >= 0, got {self.fold} (use --test for the test shards)")
        if self.per_class < 1:
            raise InspectError(f"--per_class must be >= 1, got {self.per_class}")
        if self.tta not in TTA_CHOICES:
            raise InspectError(f"--tta must be one of {TTA_CHOICES}, got {self.tta}")
        if self.batch_size < 1:
            raise InspectError(f"--batch_size must be >= 1, got {self.batch_size}")


# --- pure numpy cores ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    """The rows of one class's sheet: row kind (ROW_TITLES key) -> indices into the scored records."""

    class_index: int
    rows: dict[str, np.ndarray]


def select_tiles(
    labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, per_class: int, labeled: bool = True
) -> list[Selection]:
    """Per class, the samples to show: top true positives, worst false positives, worst false negatives.

    Args:
      labels: [n, C] 0/1 labels (ignored when not `labeled`).
      scores: [n, C] probabilities.
      thresholds: [C] per-class thresholds; positive means score >= threshold.
      per_class: at most this many samples per row.
      labeled: False for unlabeled data: one row `top`, the highest scores.

    Returns:
      One Selection per class, rows ordered worst (or best, for true positives) first; ties by index.
    """
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    out = []
    for c in range(scores.shape[1]):
        s = scores[:, c]
        desc = np.lexsort((np.arange(len(s)), -s))  # highest first, stable
        if not labeled:
            out.append(Selection(c, {"top": desc[:per_class]}))
            continue
        y = np.asarray(labels)[:, c] > 0
        pos = s >= thresholds[c]
        asc = desc[::-1]
        asc = asc[np.lexsort((asc, s[asc]))]  # lowest first, ties by index
        rows = {
            "tp": desc[(y & pos)[desc]][:per_class],
            "fp": desc[(~y & pos)[desc]][:per_class],
            "fn": asc[(y & ~pos)[asc]][:per_class],
        }
        out.append(Selection(c, rows))
    return out


def atlas_composite(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, NUM_STAINS] stains -> uint8 [H, W, 3] RGB as the atlas shows them.

    Red, green and blue stains go to their channels; yellow is added to red and green (clipped at 255).
    """
    st = {s: image[..., k].astype(np.int32) for k, s in enumerate(schemas.STAINS)}
    rgb = np.stack([st["red"] + st["yellow"], st["green"] + st["yellow"], st["blue"]], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def heat_overlay(green: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The green stain (grey) with a heat map blended over it: uint8 [H, W] + [H, W] in 0..1 -> uint8 RGB."""
    from matplotlib import colormaps

    heat = colormaps[CAM_COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]
    grey = np.repeat((green.astype(np.float64) / 255.0)[..., None], 3, axis=-1)
    return np.clip(255.0 * ((1 - alpha) * grey + alpha * heat), 0, 255).astype(np.uint8)


def sheet_name(class_index: int) -> str:
    """The file name of one class's sheet."""
    return f"class_{class_index:02d}.png"


# --- Grad-CAM --------------------------------------------------------------------------------------------


def _head_layers(model):
    """The model's layers as a chain (input layer dropped) and the backbone's position in it.

    Raises:
      InspectError: no backbone layer, or a model that is not a plain chain around it.
    """
    from model.model import BACKBONE_NAME

    chain = [layer for layer in model.layers if layer.__class__.__name__ != "InputLayer"]
    names = [layer.name for layer in chain]
    if BACKBONE_NAME not in names:
        raise InspectError(
            f"model {model.name} has no layer named {BACKBONE_NAME!r}: cannot compute Grad-CAM"
        )
    return chain, names.index(BACKBONE_NAME)


_CAM_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled Grad-CAM


def _cam_fn(model):
    """A tf.function (images, classes) -> (raw maps [B, H, W], logits [B, C]) for one model, built once."""
    import keras
    import tensorflow as tf

    if model in _CAM_FNS:
        return _CAM_FNS[model]
    chain, b = _head_layers(model)
    last = chain[-1]
    if not isinstance(last, keras.layers.Dense):
        raise InspectError(f"the model's last layer {last.name} is not Dense: cannot take its logit")

    @tf.function(reduce_retracing=True)
    def cam_fn(images, classes):
        x = images
        for layer in chain[: b + 1]:
            x = layer(x, training=False)
        features = tf.cast(x, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(features)
            h = features
            for layer in chain[b + 1 : -1]:
                h = layer(h, training=False)
            h = tf.cast(h, tf.float32)
            logits = tf.matmul(h, tf.cast(last.kernel, tf.float32)) + tf.cast(last.bias, tf.float32)
            total = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))  # samples independent
        weights = tf.reduce_mean(tape.gradient(total, features), axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
        return tf.image.resize(cam, tf.shape(images)[1:3], method="bilinear")[..., 0], logits

    _CAM_FNS[model] = cam_fn
    return cam_fn


def grad_cam(model, images, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heat maps of one class per image, at the image size.

    The model is run as the chain of its layers (checked once per model against `model(images)`): the
    layers up to and including the backbone give the feature map A [B, h, w, K]; the gradient of the
    class's logit (the last Dense layer without its sigmoid) with respect to A, averaged over h and w,
    weighs the K channels; relu(sum_k weight_k A_k) is upsampled bilinearly to [H, W] and divided by its
    maximum (all zero when the map is zero everywhere).

    Args:
      model: a classifier of this project (nested backbone named model.model.BACKBONE_NAME).
      images: uint8 [B, H, W, NUM_STAINS].
      classes: [B] class index per image.

    Returns:
      (heat maps float32 [B, H, W] in 0..1, the raw maps' maxima float32 [B]).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    classes = np.asarray(classes, dtype=np.int64)
    if images.shape[0] != len(classes):
        raise ValueError(f"{images.shape[0]} images but {len(classes)} classes")
    if len(classes) == 0:
        return np.zeros((0, *images.shape[1:3]), np.float32), np.zeros((0,), np.float32)
    checked = model in _CAM_FNS
    try:
        cam, logits = _cam_fn(model)(images, tf.constant(classes))
    except ValueError as e:  # e.g. a backbone without a 4-D output
        raise InspectError(f"cannot compute Grad-CAM of model {model.name}: {str(e).splitlines()[0]}") from e
    if not checked:  # the chain must compute what the model does
        probs = np.asarray(model(images, training=False), np.float64)
        mine = 1.0 / (1.0 + np.exp(-logits.numpy().astype(np.float64)))
        if not np.allclose(mine, probs, atol=1e-3):
            _CAM_FNS.pop(model, None)
            raise InspectError(
                f"model {model.name} is not a chain of layers around its backbone with a sigmoid Dense head: "
                "cannot compute Grad-CAM"
            )
    cam = cam.numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)
    scaled = np.divide(cam, peak[:, None, None], out=np.zeros_like(cam), where=peak[:, None, None] > 0)
    return scaled.astype(np.float32), peak.astype(np.float32)


# --- drawing ---------------------------------------------------------------------------------------------


def _font(size: int | None = None):
    """Pillow's own fonts: the bitmap one (fast: tiles have four lines each) or the scalable one at `size`."""
    from PIL import ImageFont

    if size is None and hasattr(ImageFont, "load_default_imagefont"):
        return ImageFont.load_default_imagefont()
    try:
        return ImageFont.load_default(size=size or _FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has the bitmap font only
        return ImageFont.load_default()


def _wrap(text: str, width_chars: int) -> list[str]:
    """Lines of at most `width_chars` (broken at spaces), in Latin-1 (what Pillow's bitmap font draws)."""
    import textwrap

    text = text.encode("latin-1", "replace").decode("latin-1")
    return textwrap.wrap(text, width_chars, subsequent_indent="  ") or [""]


def _label_text(indices, scores=None) -> str:
    if len(indices) == 0:
        return "-"
    if scores is None:
        return ", ".join(schemas.CLASS_NAMES[i] for i in indices)
    return ", ".join(f"{schemas.CLASS_NAMES[i]} {scores[i]:.2f}" for i in indices)


def _tile(image: np.ndarray, cam: np.ndarray, lines: Sequence[str]):
    """One tile: composite and heat map side by side, text lines under them, wrapped, never cut (PIL)."""
    from PIL import Image, ImageDraw

    side = _TILE
    composite = Image.fromarray(atlas_composite(image)).resize((side, side), Image.NEAREST)
    green = image[..., schemas.STAINS.index("green")]
    overlay = Image.fromarray(heat_overlay(green, cam)).resize((side, side), Image.NEAREST)
    chars = (2 * side + _PAD) // 6
    wrapped = [part for line in lines for part in _wrap(line, chars)]
    tile = Image.new("RGB", (2 * side + _PAD, side + len(wrapped) * _LINE + _PAD), "white")
    tile.paste(composite, (0, 0))
    tile.paste(overlay, (side + _PAD, 0))
    draw = ImageDraw.Draw(tile)
    font = _font()
    for k, line in enumerate(wrapped):
        draw.text((1, side + 2 + k * _LINE), line, fill="black", font=font)
    return tile


def _sheet(title: Sequence[str], rows: Sequence[tuple[str, list]], per_class: int) -> bytes:
    """A sheet sized to its content: title lines (wrapped), a colour bar, then per row a caption and its
    tiles (an empty row is its caption line only); PNG bytes."""
    from PIL import Image, ImageDraw

    tile_w = 2 * _TILE + _PAD
    most = max((len(tiles) for _, tiles in rows), default=0)
    width = max(most * (tile_w + 2 * _PAD), 2 * (tile_w + 2 * _PAD))
    chars = (width - 2 * _PAD) // 7
    title_lines = [(k == 0, part) for k, line in enumerate(title) for part in _wrap(line, chars)]
    bar_h = _LINE + 4
    head = len(title_lines) * (_LINE + 3) + bar_h + 2 * _PAD
    caption = _LINE + 6
    heights = [max((t.size[1] for t in tiles), default=0) for _, tiles in rows]
    height = head + sum(caption + (h + _PAD if h else 0) for h in heights)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    big, font = _font(_FONT_SIZE + 3), _font(_FONT_SIZE)
    y = _PAD
    for first, line in title_lines:
        draw.text((_PAD, y), line, fill="black", font=big if first else font)
        y += _LINE + 3
    _colour_bar(sheet, draw, (_PAD, y + 2), font)
    y = head
    for (name, tiles), h in zip(rows, heights):
        draw.text((_PAD, y + 2), name if tiles else f"{name}: none", fill=(60, 60, 160), font=font)
        y += caption
        for i, tile in enumerate(tiles):
            sheet.paste(tile, (_PAD + i * (tile_w + 2 * _PAD), y))
        y += h + _PAD if h else 0
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", compress_level=1)  # fast: level 6 took as long as the drawing
    return buf.getvalue()


def _colour_bar(sheet, draw, at: tuple[int, int], font) -> None:
    """`Grad-CAM: low [scale] high` drawn at `at`."""
    from PIL import Image

    x, y = at
    draw.text((x, y), "Grad-CAM:  low", fill="black", font=font)
    x += 90
    bar = Image.fromarray(np.repeat(cam_colours()[None], _LINE - 2, axis=0)).resize((160, _LINE - 2))
    sheet.paste(bar, (x, y + 1))
    draw.text((x + 166, y), "high  (where the model saw the class)", fill="black", font=font)


def cam_colours(n: int = 256) -> np.ndarray:
    """[n, 3] uint8: the Grad-CAM colour scale of `heat_overlay`, low to high."""
    from matplotlib import colormaps

    return (255 * colormaps[CAM_COLORMAP](np.linspace(0.0, 1.0, n))[:, :3]).round().astype(np.uint8)


def _fig(value: float | None) -> str:
    """A ratio for a sheet ('-' where undefined; the sheets' bitmap font has no en dash)."""
    return "-" if value is None else f"{value:.3f}"


# --- the job ---------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, flush=True)


def _resolve_thresholds(model_dirs: Sequence[str], log) -> tuple[np.ndarray, str]:
    from model.predict import PredictError, resolve_thresholds

    present = [fileio.exists(fileio.join(d, THRESHOLDS_FILE)) for d in model_dirs]
    if not all(present):
        missing = [d for d, p in zip(model_dirs, present) if not p]
        log(f"warning: no {THRESHOLDS_FILE} in {', '.join(missing)}: every class at {DEFAULT_THRESHOLD}")
        return np.full(schemas.NUM_CLASSES, DEFAULT_THRESHOLD), f"{DEFAULT_THRESHOLD} for every class"
    try:
        return resolve_thresholds(model_dirs)
    except PredictError as e:
        raise InspectError(str(e)) from None


def _gather_images(dataset, wanted: set[str]) -> dict[str, np.ndarray]:
    """Second pass: the images of the wanted Ids only."""
    found: dict[str, np.ndarray] = {}
    for images, _, batch_ids in dataset:
        ids = [i.decode("utf-8") for i in batch_ids.numpy()]
        keep = [k for k, sid in enumerate(ids) if sid in wanted]
        if keep:
            arr = images.numpy()
            for k in keep:
                found[ids[k]] = arr[k]
        if len(found) == len(wanted):
            break
    return found


def run(cfg: InspectConfig, log: Callable[[str], None] = _log) -> dict:
    """Writes the gallery; returns a summary (paths, counts, seconds).

    Raises:
      InspectError: bad inputs.
    """
    from model import data as data_lib
    from model.config import ConfigError, DataConfig
    from model.predict import (
        PredictError,
        _inspect_model_dir,
        common_image_size,
        load_model_dir,
        predict_scores,
        tta_transforms,
    )

    start = time.perf_counter()
    try:
        dirs = [_inspect_model_dir(d) for d in cfg.model_dirs]
        image_size = common_image_size(dirs)
    except PredictError as e:
        raise InspectError(str(e)) from None
    try:
        manifest = schemas.read_manifest(cfg.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise InspectError(str(e).splitlines()[0]) from None
    height, width = (int(v) for v in manifest[schemas.MANIFEST_IMAGE_SIZE])
    if (height, width) != (image_size, image_size):
        raise InspectError(
            f"{cfg.data_dir} holds {height}x{width} images but the models were trained on "
            f"{image_size}x{image_size}"
        )
    fold = schemas.UNLABELED_FOLD if cfg.test else cfg.fold
    if fold is None:
        fold = _validation_fold(cfg.model_dirs)
    answers = _read_answers(cfg.answers) if cfg.answers else None
    labeled = fold != schemas.UNLABELED_FOLD or answers is not None
    subset = f"fold {fold}" if fold != schemas.UNLABELED_FOLD else "test shards"
    thresholds, thresholds_source = _resolve_thresholds(cfg.model_dirs, log)
    dcfg = DataConfig(image_size=image_size, batch_size=cfg.batch_size)
    try:
        data_lib.list_shards(cfg.data_dir, [fold])
    except ConfigError as e:
        raise InspectError(str(e)) from None

    def dataset():
        return data_lib.make_eval_dataset(cfg.data_dir, [fold], dcfg, with_ids=True)

    given = _read_probabilities(cfg.probabilities) if cfg.probabilities else None
    loaded = cfg.model_dirs if given is None else cfg.model_dirs[:1]  # given scores: Grad-CAM's model only
    log(f"loading {len(loaded)} model(s): {', '.join(loaded)}")
    try:
        models = [load_model_dir(d) for d in loaded]
    except PredictError as e:
        raise InspectError(str(e).splitlines()[0]) from None
    if given is not None:
        ids, scores = given
        log(f"scores of {len(ids)} records from {cfg.probabilities}")
        score_note = f"from {cfg.probabilities}"
    else:
        log(f"scoring {subset} of {cfg.data_dir} ({image_size} px), {cfg.tta} transform(s) per model")
        try:
            ids, scores = predict_scores(models, dataset(), tta_transforms(cfg.tta), log=log)
        except PredictError as e:
            raise InspectError(str(e)) from None
        score_note = f"mean of {len(models)} model(s) x {cfg.tta} transform(s)"
    if len(ids) == 0:
        raise InspectError(f"{subset} of {cfg.data_dir} holds no records")
    if answers is not None:
        labels = _answers_for(answers, ids, cfg.answers)
    elif labeled:
        labels = _labels_by_id(cfg.data_dir, fold, ids)
    else:
        labels = np.zeros_like(scores, dtype=np.int8)
    scored = time.perf_counter()
    predicted = thr.apply_thresholds(scores, thresholds)
    selections = select_tiles(labels, scores, thresholds, cfg.per_class, labeled)
    wanted = sorted({ids[i] for sel in selections for idx in sel.rows.values() for i in idx})
    images = _gather_images(dataset(), set(wanted))
    missing = sorted(set(wanted) - set(images))
    if missing and given is not None:
        raise InspectError(
            f"--probabilities {cfg.probabilities} names Ids not in {subset}, e.g. {missing[:3]}"
        )
    if missing:
        raise InspectError(f"records vanished between the two passes over the data, e.g. {missing[:3]}")

    # Grad-CAM for every tile shown, batched over (image, class) pairs.
    pairs = [(int(i), sel.class_index) for sel in selections for idx in sel.rows.values() for i in idx]
    cams: dict[tuple[int, int], np.ndarray] = {}
    for lo in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[lo : lo + cfg.batch_size]
        batch = np.stack([images[ids[i]] for i, _ in chunk])
        maps, _ = grad_cam(models[0], batch, [c for _, c in chunk])
        cams.update({p: m for p, m in zip(chunk, maps)})
    cammed = time.perf_counter()

    fileio.makedirs(cfg.out)
    metrics = thr.score_predictions(labels, predicted) if labeled else None
    figures = report_lib.class_figures(labels, predicted) if labeled else None
    table, thumbs, sheets = [], {}, {}
    for sel in selections:
        c = sel.class_index
        name = schemas.CLASS_NAMES[c]
        rows = []
        for kind, idx in sel.rows.items():
            tiles = []
            for rank, i in enumerate(idx):
                true = np.flatnonzero(labels[i]) if labeled else []
                pred = np.flatnonzero(predicted[i])
                pred = pred[np.argsort(-scores[i, pred], kind="stable")]
                lines = [
                    f"{name}: {scores[i, c]:.3f} (threshold {thresholds[c]:.3f})",
                    str(ids[i]),
                    f"true: {_label_text(true)}" if labeled else "true: unknown",
                    f"pred: {_label_text(pred, scores[i])}",
                ]
                image, cam = images[ids[i]], cams[(int(i), c)]
                tiles.append(_tile(image, cam, lines))
                if rank < REPORT_PER_ROW:
                    green = image[..., schemas.STAINS.index("green")]
                    thumbs.setdefault(c, []).append(
                        report_lib.Thumb(
                            atlas_composite(image), heat_overlay(green, cam), lines, _THUMB_KIND[kind]
                        )
                    )
            rows.append((ROW_TITLES[kind], tiles))
        row = {"index": c, "name": name, "sheet": None, "threshold": float(thresholds[c])}
        row["predicted"] = int(predicted[:, c].sum())
        if labeled:
            f = figures[c]
            row.update(support=f["support"], precision=f["precision"], recall=f["recall"], f1=f["f1"])
        table.append(row)
        if not any(tiles for _, tiles in rows):
            continue  # no sample to show: no blank sheet
        title = [f"{c}: {name}   (threshold {thresholds[c]:.3f})"]
        if labeled:
            f = figures[c]
            title.append(
                f"{subset}: F1 {_fig(f['f1'])}, precision {_fig(f['precision'])}, recall "
                f"{_fig(f['recall'])}, {f['support']} positives, {f['predicted']} predicted"
            )
        title.append(
            f"each tile: left the atlas composite ({STAIN_NOTE}), right the green stain under the Grad-CAM "
            f"of {name}; scores: {score_note}; "
            "Grad-CAM: " + ("first model, " if len(cfg.model_dirs) > 1 else "") + "untransformed image"
        )
        fileio.write_bytes(fileio.join(cfg.out, sheet_name(c)), _sheet(title, rows, cfg.per_class))
        row["sheet"] = sheets[c] = sheet_name(c)
    summary = {
        "out": cfg.out,
        "index": fileio.join(cfg.out, INDEX_FILE),
        "subset": subset,
        "records": int(len(ids)),
        "tiles": len(pairs),
        "thresholds": thresholds_source,
        "macro_f1": float(metrics.macro_f1) if labeled else None,
        "micro_f1": float(metrics.micro_f1) if labeled else None,
    }
    fileio.write_text(summary["index"], report_lib.index_html(cfg, summary, table, labeled))
    summary["report"] = fileio.join(cfg.out, report_lib.REPORT_FILE)
    page = report_lib.ReportData(
        title=f"HPA run report: {subset}, {len(ids)} samples",
        settings=report_lib.settings_rows(cfg, summary, score_note),
        notes=[n for n in report_lib.notes(cfg, summary, labeled) if not n.startswith(_IN_SETTINGS)],
        histories={d: read_history(fileio.join(d, HISTORY_FILE)) for d in cfg.model_dirs},
        thresholds=np.asarray(thresholds, np.float64),
        scores=scores,
        labels=labels if labeled else None,
        thumbs=thumbs,
        sheets=sheets,
        colormap=cam_colours(),
    )
    fileio.write_text(summary["report"], report_lib.build_html(page))
    end = time.perf_counter()
    summary.update(
        seconds=end - start,
        score_seconds=scored - start,
        cam_seconds=cammed - scored,
        draw_seconds=end - cammed,
    )
    log(
        f"wrote {len(sheets)} sheets ({len(pairs)} tiles from {len(ids)} records), {summary['report']} and "
        f"{summary['index']} in "
        f"{summary['seconds']:.1f} s (scoring {summary['score_seconds']:.1f} s, Grad-CAM "
        f"{summary['cam_seconds']:.1f} s, drawing {summary['draw_seconds']:.1f} s)"
    )
    return summary


def _read_probabilities(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], scores [n, C]) of an npz written by `model.predict --probabilities`."""
    from model.predict import PROB_CLASS_NAMES, PROB_IDS, PROB_SCORES

    try:
        with np.load(io.BytesIO(fileio.read_bytes(path))) as z:
            ids, scores = z[PROB_IDS].astype(str), z[PROB_SCORES].astype(np.float64)
            names = z[PROB_CLASS_NAMES].tolist() if PROB_CLASS_NAMES in z else list(schemas.CLASS_NAMES)
    except FileNotFoundError:
        raise InspectError(f"--probabilities {path}: no such file") from None
    except (OSError, ValueError, KeyError) as e:
        raise InspectError(
            f"--probabilities {path}: not an npz of model.predict --probabilities "
            f"({' '.join(str(e).split())})"
        ) from None
    if scores.shape != (len(ids), schemas.NUM_CLASSES) or names != list(schemas.CLASS_NAMES):
        raise InspectError(
            f"--probabilities {path}: scores of shape {scores.shape} for {len(ids)} Ids, expected "
            f"({len(ids)}, {schemas.NUM_CLASSES}) in this project's class order"
        )
    if len(set(ids.tolist())) != len(ids):
        raise InspectError(f"--probabilities {path}: an Id is repeated")
    return ids, scores


def _read_answers(path: str) -> dict[str, np.ndarray]:
    """Id -> multi-hot labels of an `Id,Target` file (read before the models load: bad input stops early)."""
    from model.score import ScoreError, read_label_table

    try:
        return read_label_table(path, schemas.CSV_TARGET)
    except ScoreError as e:
        raise InspectError(f"--answers {e}") from None


def _answers_for(answers: dict[str, np.ndarray], ids: np.ndarray, path: str) -> np.ndarray:
    """The labels [len(ids), C] of the scored test Ids; every one must have an answer."""
    missing = [str(i) for i in ids if str(i) not in answers]
    if missing:
        raise InspectError(
            f"--answers {path} has no row for {len(missing)} of the {len(ids)} test Id(s), e.g. {missing[:3]}"
        )
    return np.stack([answers[str(i)] for i in ids]).astype(np.int8)


def _labels_by_id(data_dir: str, fold: int, ids: np.ndarray) -> np.ndarray:
    """The labels [len(ids), C] of the records of a fold, read without decoding the images."""
    import tensorflow as tf

    from model import data as data_lib

    spec = {k: schemas.feature_spec()[k] for k in (schemas.ID_KEY, schemas.LABELS_KEY)}
    ds = tf.data.TFRecordDataset(data_lib.list_shards(data_dir, [fold])).batch(1024)
    found: dict[str, np.ndarray] = {}
    for batch in ds.map(lambda s: tf.io.parse_example(s, spec)):
        for sid, y in zip(batch[schemas.ID_KEY].numpy(), batch[schemas.LABELS_KEY].numpy()):
            found[sid.decode("utf-8")] = y
    missing = [str(i) for i in ids if str(i) not in found]
    if missing:
        raise InspectError(f"records vanished between two passes over the data, e.g. {missing[:3]}")
    return np.stack([found[str(i)] for i in ids]).astype(np.int8)


def _validation_fold(model_dirs: Sequence[str]) -> int:
    import json

    from model.config import CONFIG_FILE, config_from_dict

    folds = {
        config_from_dict(json.loads(fileio.read_text(fileio.join(d, CONFIG_FILE)))).val_fold
        for d in model_dirs
    }
    if len(folds) != 1:
        raise InspectError(
            f"the models were validated on different folds {sorted(folds)}: choose one with --fold K"
        )
    return folds.pop()


def build_parser() -> argparse.ArgumentParser:
    """The job's flags."""
    d = InspectConfig(model_dirs=("x",), data_dir="", out="")
    p = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Write image galleries: per class, the top true positives, worst false positives and worst "
            "false negatives, each with its Grad-CAM heat map, and index.html with the per-class F1 table."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model_dir", nargs="+", required=True, metavar="DIR", help="training run dir(s); several = ensemble"
    )
    p.add_argument("--data_dir", required=True, help="preprocessing output (or gs://)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--fold", type=int, default=None, help="labeled fold to show (None: the models' validation fold)"
    )
    which.add_argument("--test", action="store_true", help="show the unlabeled test shards")
    p.add_argument(
        "--answers",
        default=None,
        metavar="CSV",
        help="with --test: the test part's labels (Id,Target, e.g. test_labels.csv), for the three rows "
        "and the F1 table on held-out samples",
    )
    p.add_argument("--out", required=True, help="gallery directory to write (or gs://)")
    p.add_argument(
        "--probabilities",
        default=None,
        metavar="NPZ",
        help="show these scores (an npz of model.predict --probabilities) instead of scoring the records: "
        "the submission's own scores, and only Grad-CAM's cost (--tta is then not used)",
    )
    p.add_argument("--per_class", type=int, default=d.per_class, help="tiles per row of a sheet")
    p.add_argument(
        "--tta", type=int, choices=TTA_CHOICES, default=d.tta, help="transforms averaged for the scores"
    )
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="records per batch")
    return p


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m model.inspect`; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = InspectConfig(
            model_dirs=tuple(d.rstrip("/") for d in args.model_dir),
            data_dir=args.data_dir.rstrip("/"),
            out=args.out.rstrip("/"),
            fold=args.fold,
            test=args.test,
            answers=args.answers,
            probabilities=args.probabilities,
            per_class=args.per_class,
            tta=args.tta,
            batch_size=args.batch_size,
        )
        run(cfg)
    except InspectError as e:
        return cli.bad_input(PROG, e)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())

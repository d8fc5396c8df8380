"""Rendering of one synthetic sample: a field of cells (`cells`), its landmark stains and the labels' green
patterns (`patterns`), intensities, camera noise and 8-bit quantisation.

`render_sample(seed, labels, image_size)` is the pure core: the same seed and labels give the same bytes.
Each sample's randomness comes from child streams of its own SeedSequence (`sample_seed`), so a dataset's
bytes never depend on the number of processes that render it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

import schemas
from pipelines.synthetic import cells as sc
from pipelines.synthetic import patterns as sp

MIN_IMAGE_SIZE = 32

# Child streams of a sample's SeedSequence: the layout, landmarks and noise never depend on the labels' own
# streams, so a sample rendered with and without a label differs only by that label's pattern.
_STREAM_LAYOUT, _STREAM_LANDMARKS, _STREAM_INTENSITY, _STREAM_NOISE, _STREAM_PATTERNS = range(5)
_SPLIT_TRAIN, _SPLIT_TEST = 0, 1
_NORMAL_TABLE = np.random.default_rng(20180101).standard_normal(65536).astype(np.float32)
_CLASSES_NEEDING_LAYOUT = {"force_daughters": 16, "force_mitotic": 17, "force_contact": 22}


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Difficulty and realism knobs of one rendered sample.

    Attributes:
      green_peak_range: range (log-uniform) of the green stain's peak in 8-bit counts, per image: dim to
        saturated, as in the atlas.
      landmark_peak_range: range (uniform) of each landmark stain's peak in counts, per image.
      label_amplitude_range: relative amplitude of each label's pattern within a sample.
      cell_expression_range: per-cell expression multiplier (single-cell variability).
      green_haze: faint unspecific green in every cell (relative to the green peak).
      background_range: camera offset in counts (uniform per image and stain).
      read_noise: additive Gaussian noise in counts.
      shot_gain: variance of shot noise per count of signal.
      division_rate: probability that a field shows a mitotic cell, and (independently) a pair of daughters.
      min_cell_radius: typical cell radius in pixels that small images keep by showing a magnified part of
        the field (fewer, larger cells; see `cells.make_layout`). A 512 px field has cells of
        ~70 px radius and is not magnified; at 128 px or less the default keeps dots, rims and filaments
        several pixels wide instead of shrinking them below one pixel.
    """

    green_peak_range: tuple[float, float] = (90.0, 360.0)
    landmark_peak_range: tuple[float, float] = (110.0, 240.0)
    label_amplitude_range: tuple[float, float] = (0.6, 1.0)
    cell_expression_range: tuple[float, float] = (0.55, 1.25)
    green_haze: float = 0.04
    background_range: tuple[float, float] = (0.0, 3.0)
    read_noise: float = 1.2
    shot_gain: float = 0.8
    division_rate: float = 0.25
    min_cell_radius: float = 32.0


@dataclasses.dataclass
class RenderedSample:
    """One rendered sample.

    Attributes:
      stains: uint8 [S, S] image per stain name (schemas.STAINS).
      masks: boolean [S, S] region masks of the field (see `cells.Layout.masks`).
      green_signal: the noise-free green signal in counts before quantisation.
      layout: the cell field.
    """

    stains: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    green_signal: np.ndarray
    layout: sc.Layout


def _seed_sequence(seed) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    return np.random.SeedSequence(int(seed))


def _child(ss: np.random.SeedSequence, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + key))


def sample_seed(seed: int, index: int, test: bool = False) -> np.random.SeedSequence:
    """The SeedSequence of one sample of a dataset (train or test split), independent of process count."""
    return np.random.SeedSequence(seed, spawn_key=(_SPLIT_TEST if test else _SPLIT_TRAIN, index))


def render_sample(
    seed: int | np.random.SeedSequence,
    labels: Sequence[int],
    image_size: int,
    config: RenderConfig = RenderConfig(),
    draw_patterns: bool = True,
    with_masks: bool = True,
) -> RenderedSample:
    """Renders one sample: four 8-bit stains of a field of cells whose green stain shows the labels' patterns.

    Args:
      seed: integer seed or SeedSequence of the sample.
      labels: class indices (0..NUM_CLASSES-1) whose patterns the green stain sums.
      image_size: side in pixels.
      config: difficulty knobs.
      draw_patterns: False renders the same field, landmarks, intensities and noise without the labels'
        green patterns (for checking where a pattern puts its signal).
      with_masks: False leaves `masks` empty (saves time when only the images are needed).

    Returns:
      The stains, region masks, noise-free green signal and layout.

    Raises:
      ValueError: a class index out of range or an image size below MIN_IMAGE_SIZE.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    labels = sorted({int(c) for c in labels})
    if any(c < 0 or c >= schemas.NUM_CLASSES for c in labels):
        raise ValueError(f"class index out of range 0..{schemas.NUM_CLASSES - 1}: {labels}")
    ss = _seed_sequence(seed)
    force = {k: c in labels for k, c in _CLASSES_NEEDING_LAYOUT.items()}
    layout = sc.make_layout(
        _child(ss, _STREAM_LAYOUT),
        image_size,
        division_rate=config.division_rate,
        min_cell_radius=config.min_cell_radius,
        **force,
    )
    scene = sp.Scene(layout, _child(ss, _STREAM_LANDMARKS))
    irng = _child(ss, _STREAM_INTENSITY)

    peaks = {stain: irng.uniform(*config.landmark_peak_range) for stain in sp.LANDMARKS}
    lo, hi = np.log(config.green_peak_range)
    green_peak = float(np.exp(irng.uniform(lo, hi)))
    expression = irng.uniform(*config.cell_expression_range, max(len(layout.cells), 1))
    amplitudes = irng.uniform(*config.label_amplitude_range, schemas.NUM_CLASSES)
    background = irng.uniform(*config.background_range, schemas.NUM_STAINS)

    signals = {
        stain: fn(scene, _child(ss, _STREAM_LANDMARKS, k)) * peaks[stain]
        for k, (stain, fn) in enumerate(sp.LANDMARKS.items())
    }
    green = np.float32(config.green_haze) * (scene.soft_cytoplasm + 0.5 * scene.soft_nucleus)
    if draw_patterns:
        for c in labels:
            green = green + amplitudes[c] * sp.GREEN_PATTERNS[c](scene, _child(ss, _STREAM_PATTERNS, c))
    green = green * layout.per_cell(expression[: len(layout.cells)]) * np.float32(green_peak)
    signals["green"] = green.astype(np.float32)

    # One standard-normal field (by table lookup: cheaper than drawing normals), seen flipped differently by
    # each stain, so the four noise fields are pixel-wise independent.
    draws = _child(ss, _STREAM_NOISE).integers(
        0, _NORMAL_TABLE.size, (image_size, image_size), dtype=np.uint16
    )
    normal = _NORMAL_TABLE[draws]
    views = (normal, normal[::-1], normal[:, ::-1], normal[::-1, ::-1])
    stains = {}
    for k, stain in enumerate(schemas.STAINS):
        sig = np.maximum(signals[stain], 0.0) + np.float32(background[k])
        std = np.sqrt(sig * np.float32(config.shot_gain) + np.float32(config.read_noise**2))
        noisy = sig + std * views[k]
        stains[stain] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return RenderedSample(
        stains=stains,
        masks=layout.masks() if with_masks else {},
        green_signal=signals["green"],
        layout=layout,
    )


def render_stains(
    seed, labels: Sequence[int], image_size: int, config: RenderConfig = RenderConfig()
) -> dict:
    """Like `render_sample` but returns only the uint8 stains (skips computing the masks)."""
    return render_sample(seed, labels, image_size, config, with_masks=False).stains

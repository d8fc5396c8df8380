"""Validation of one sample's four stain images: pure PIL/numpy, no Beam or TF.

`validate_stains` takes the raw bytes of the four stain files of one sample and either returns what the
record needs (bytes to store, size, pixel statistics) or raises `Rejected` with a reason code that ends up
in rejected.csv and the manifest.

Policy:
- PNG and JPEG streams of 8-bit single-channel images are stored untouched (no re-encode: smallest and
  cheapest, see FACTS.md) unless a resize is asked for.
- Other modes are converted to 8-bit single channel unless `strict_modes`: RGB/RGBA take the per-pixel
  maximum over colour channels (lossless for gray stored as RGB and for the atlas' colour-coded single-stain
  downloads), 16-bit and 32-bit integer images are scaled to 0..255 (x / 257), palette images are expanded.
  Converted or resized stains are re-encoded as PNG. TIFF is always re-encoded as PNG (TensorFlow cannot
  decode TIFF). Every conversion is counted by the caller.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import warnings
import zlib

import numpy as np
from PIL import Image

import schemas

# Reason codes of rejected samples (rejected.csv `reason` column).
MISSING_STAIN = "missing_stain"
EMPTY_IMAGE = "empty_image"
CORRUPT_IMAGE = "corrupt_image"
SIZE_MISMATCH = "size_mismatch"
UNSUPPORTED_MODE = "unsupported_mode"
TOO_SMALL = "image_too_small"

# Stain file extensions, in order of preference when one stain exists in several formats (e.g. a PNG and
# the full-size TIFF).
EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# Formats stored as they are (TensorFlow's decode_image reads them).
_KEEP_FORMATS = {"PNG", "JPEG"}
_MIN_SIDE = 8


class Rejected(Exception):
    """A sample that cannot be written; `reason` is a short code, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ValidStains:
    """What a record needs from one sample's stains.

    Attributes:
      images: bytes to store per stain (the source stream or a PNG re-encoding).
      height, width: pixel size of the stored images.
      mean, sq_mean: per-stain mean and mean of squares of the stored pixels, in schemas.STAINS order.
      conversions: per-stain notes of what was converted (`"rgb"`, `"16bit"`, `"tiff"`, `"resized"`, ...).
    """

    images: dict[str, bytes]
    height: int
    width: int
    mean: tuple[float, ...]
    sq_mean: tuple[float, ...]
    conversions: tuple[str, ...]


def _decode(stain: str, data: bytes) -> tuple[Image.Image, str]:
    if not data:
        raise Rejected(EMPTY_IMAGE, f"{stain} stain file is empty")
    try:
        # PIL warns above ~89 MP and refuses above ~179 MP (decompression bombs); full-size HPA images are
        # 2048x2048 or 3072x3072, far below: treat the warning as an error too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # forces a full decode: truncated or corrupt streams fail here
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise Rejected(CORRUPT_IMAGE, f"{stain} stain cannot be decoded: {e}") from None
    return img, img.format or "?"


def _to_gray8(stain: str, img: Image.Image, strict: bool) -> tuple[np.ndarray, str]:
    """Returns the 8-bit single-channel pixels and a conversion note ('' when none was needed)."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8), ""
    if strict:
        raise Rejected(UNSUPPORTED_MODE, f"{stain} stain has mode {mode}, expected 8-bit grayscale (L)")
    if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "P", "PA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        # channel by channel: the same maximum as rgb.max(axis=2), ~25x faster on a 2048 px stain
        gray = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
        return gray, "rgb" if mode != "P" else "palette"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise Rejected(UNSUPPORTED_MODE, f"{stain} stain has {mode} values outside 0..65535")
        return ((arr * 255 + 32767) // 65535).astype(np.uint8), "16bit"
    if mode == "1":
        return (np.asarray(img, dtype=np.uint8) * 255).astype(np.uint8), "1bit"
    raise Rejected(UNSUPPORTED_MODE, f"{stain} stain has unsupported mode {mode}")


_LEVELS = np.arange(256, dtype=np.float64)


def _moments(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and mean of squares of 8-bit pixels, exact, from a histogram (faster than float arithmetic)."""
    hist = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    n = pixels.size
    return float(hist @ _LEVELS) / n, float(hist @ (_LEVELS * _LEVELS)) / n


def encode_png(pixels: np.ndarray) -> bytes:
    """Encodes 8-bit grayscale pixels as PNG (deterministic for the same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


_PNG_OVERHEAD = 70  # signature, IHDR, IDAT and IEND framing, per-row filter bytes aside


def estimate_png_bytes(pixels: np.ndarray) -> int:
    """About how many bytes `encode_png(pixels)` takes, at a small part of its cost.

    Deflate level 1 over the horizontally differenced rows (PNG's Sub filter): PNG's level 6 with adaptive
    filters compresses somewhat better, so this errs on the large side (bench/scale.py reports how far).
    """
    diff = np.diff(pixels, axis=1, prepend=np.zeros((pixels.shape[0], 1), pixels.dtype))
    return len(zlib.compress(diff.tobytes(), 1)) + pixels.shape[0] + _PNG_OVERHEAD


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resizes 8-bit grayscale pixels to size x size with area averaging (box filter) when shrinking."""
    img = Image.fromarray(pixels, mode="L")
    method = Image.Resampling.BOX if size < max(pixels.shape) else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size, size), method), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class InspectedStains:
    """One sample's stains decoded, checked and (if asked) resized, before any encoding.

    Attributes:
      pixels: 8-bit single-channel pixels per stain, at the output size.
      height, width: output size.
      mean, sq_mean: per-stain mean and mean of squares of `pixels`, in schemas.STAINS order.
      conversions: per-stain notes (`""` when the source stream can be stored as it is).
    """

    pixels: dict[str, np.ndarray]
    height: int
    width: int
    mean: tuple[float, ...]
    sq_mean: tuple[float, ...]
    conversions: tuple[str, ...]


def inspect_stains(
    data: dict[str, bytes], image_size: int | None = None, strict_modes: bool = False
) -> InspectedStains:
    """Decodes, checks and resizes the four stains of one sample without encoding anything.

    Args:
      data: raw file bytes per stain name (all of schemas.STAINS).
      image_size: if set, resize every stain to image_size x image_size.
      strict_modes: reject instead of converting stains that are not 8-bit single channel.

    Raises:
      Rejected: a stain is missing, empty, corrupt, of an unsupported mode, or the stains differ in size.
    """
    missing = [s for s in schemas.STAINS if s not in data]
    if missing:
        raise Rejected(MISSING_STAIN, f"no file for stain(s) {', '.join(missing)}")
    decoded = {}
    for stain in schemas.STAINS:
        img, fmt = _decode(stain, data[stain])
        pixels, note = _to_gray8(stain, img, strict_modes)
        if fmt not in _KEEP_FORMATS:
            note = note or fmt.lower()
        decoded[stain] = (pixels, note)
    sizes = {s: p.shape for s, (p, _) in decoded.items()}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{s} {w}x{h}" for s, (h, w) in sizes.items())
        raise Rejected(SIZE_MISMATCH, f"stains differ in size: {detail}")
    height, width = next(iter(sizes.values()))
    if min(height, width) < _MIN_SIDE:
        raise Rejected(TOO_SMALL, f"stains are {width}x{height}, smaller than {_MIN_SIDE}x{_MIN_SIDE}")

    out, means, sq_means, notes = {}, [], [], []
    for stain in schemas.STAINS:
        pixels, note = decoded[stain]
        if image_size is not None and (height, width) != (image_size, image_size):
            pixels = resize(pixels, image_size)
            note = "+".join(filter(None, [note, "resized"]))
        out[stain] = pixels
        mean, sq_mean = _moments(pixels)
        means.append(mean)
        sq_means.append(sq_mean)
        notes.append(note)
    out_h, out_w = (image_size, image_size) if image_size is not None else (height, width)
    return InspectedStains(out, out_h, out_w, tuple(means), tuple(sq_means), tuple(notes))


def validate_stains(
    data: dict[str, bytes], image_size: int | None = None, strict_modes: bool = False
) -> ValidStains:
    """Checks and prepares the four stains of one sample (`inspect_stains`, then the bytes to store).

    Args:
      data: raw file bytes per stain name (all of schemas.STAINS).
      image_size: if set, resize every stain to image_size x image_size (re-encoded as PNG).
      strict_modes: reject instead of converting stains that are not 8-bit single channel.

    Returns:
      ValidStains.

    Raises:
      Rejected: a stain is missing, empty, corrupt, of an unsupported mode, or the stains differ in size.
    """
    seen = inspect_stains(data, image_size, strict_modes)
    images = {
        stain: encode_png(seen.pixels[stain]) if note else data[stain]
        for stain, note in zip(schemas.STAINS, seen.conversions)
    }
    return ValidStains(images, seen.height, seen.width, seen.mean, seen.sq_mean, seen.conversions)


HEADER_BYTES = 1 << 16  # PNG's IHDR and JPEG's SOF lie well within the first 64 KiB of a file


def header_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) from the first bytes of an image file (PNG IHDR, JPEG SOF, TIFF tags), or None.

    Pillow's `Image.open` parses only the header; None means the header could not be read from these bytes
    (a corrupt file, or a TIFF whose tags lie further on): the full decode later decides.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(head))
            width, height = img.size
    except Exception:  # noqa: BLE001 (any parser failure means "unknown here")
        return None
    return int(height), int(width)


def decode_gray8(stain: str, data: bytes, strict_modes: bool = False) -> tuple[np.ndarray, str, str]:
    """Fully decodes one stain file into 8-bit grayscale with the conversion rules of `validate_stains`.

    Returns:
      (pixels, source format such as `"JPEG"`, conversion note or `""`).

    Raises:
      Rejected: an empty, truncated or undecodable stream, or an unsupported mode.
    """
    img, fmt = _decode(stain, data)
    pixels, note = _to_gray8(stain, img, strict_modes)
    return pixels, fmt, note


def stain_of(path: str) -> tuple[str, str, str] | None:
    """`dir/{Id}_{stain}.{ext}` -> (Id, stain, ext), or None for a file that is not a stain image."""
    stem, ext = posixpath.splitext(posixpath.basename(path))
    ext = ext.lower()
    if ext not in EXTENSIONS or "_" not in stem:
        return None
    sample_id, stain = stem.rsplit("_", 1)
    if stain not in schemas.STAINS or not sample_id:
        return None
    return sample_id, stain, ext


def choose_file(files: list[tuple[str, str]]) -> str:
    """The path to read among one stain's (ext, path) files: the preferred format, then the first path."""
    return min(files, key=lambda f: (EXTENSIONS.index(f[0]), f[1]))[1]

"""Prediction input straight from a folder of `{Id}_{stain}.{png,jpg,jpeg,tif,tiff}` files, no Beam run.

The rules are the preprocessing job's, from the same pure functions: file names parsed and the preferred
format chosen by `schemas.stains` (`stain_of`, `choose_file`), Ids checked by `schemas.labels.check_id`,
and each sample decoded, converted to 8-bit single channel (colour-coded stains take the maximum over the
colour channels, 16-bit is scaled, TIFF is read by Pillow), size-checked and resized with the box filter by
`schemas.stains.inspect_stains`. A sample's four stains become one uint8 [S, S, NUM_STAINS] array in
`schemas.STAINS` order: what the shard path decodes from the records the preprocessing job writes with
`--image_size S`. Converted or resized stains are stored as PNG there (lossless), so Pillow's pixels are
those; a JPEG stored as it is is decoded by TensorFlow there, whose default IDCT differs from Pillow's by a
few levels, so such a stain is decoded by TensorFlow here too (`decode_stored`).

Every Id is either read or rejected with the preprocessing job's reason codes (`missing_stain`,
`size_mismatch`, `corrupt_image`, `bad_id`, ...). Listing, matching and reading are plain Python/numpy/PIL
(no TensorFlow import; gs:// goes through `model.fileio`); only `make_dataset` builds a tf.data pipeline.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np

import schemas
from model import fileio
from schemas import folders
from schemas import labels as labels_lib
from schemas import stains as stains_lib

__all__ = [
    "FolderError",
    "FolderPlan",
    "FolderSample",
    "decode_stored",
    "list_stain_files",
    "make_dataset",
    "plan_folder",
    "read_sample",
    "read_samples",
]

READ_WORKERS = 4  # decoding threads (Pillow releases the GIL while it decodes)
_JPEG_MAGIC = b"\xff\xd8\xff"


class FolderError(ValueError):
    """A folder that cannot be used at all (not there, or without a single stain image)."""


@dataclasses.dataclass(frozen=True)
class FolderSample:
    """One Id whose four stain files exist: the paths to read, in schemas.STAINS order."""

    id: str
    paths: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FolderPlan:
    """What a folder holds for an Id list.

    Attributes:
      samples: the Ids with all four stain files, in the order of the Id list.
      rejected: (Id, reason, detail) of the Ids that cannot be read (a missing stain, a bad Id).
      unlisted: Ids with stain files that the Id list does not name (not predicted), sorted.
    """

    samples: tuple[FolderSample, ...]
    rejected: tuple[tuple[str, str, str], ...]
    unlisted: tuple[str, ...]


def list_stain_files(input_dir: str) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Id -> stain -> [(ext, path)] of the stain image files directly in a folder (local or gs://).

    Raises:
      FolderError: no such folder.
    """
    if not fileio.isdir(input_dir):
        raise FolderError(f"--input_dir {input_dir}: no such folder")
    found: dict[str, dict[str, list[tuple[str, str]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for name in fileio.listdir(input_dir):
        parsed = stains_lib.stain_of(name)
        if parsed is not None:
            sample_id, stain, ext = parsed
            found[sample_id][stain].append((ext, fileio.join(input_dir, name)))
    return {sid: dict(by_stain) for sid, by_stain in found.items()}


def plan_folder(
    files: dict[str, dict[str, list[tuple[str, str]]]], input_dir: str, ids: Sequence[str] | None = None
) -> FolderPlan:
    """Matches an Id list with a folder's stain files (`list_stain_files`).

    Args:
      files: the folder's stain files by Id and stain.
      input_dir: the folder, named in the rejection details.
      ids: the Ids to read, in order; None: every Id with at least one stain file, sorted.

    Raises:
      FolderError: the folder holds no stain image at all.
    """
    if not files:
        hint = folders.hint_for_input_dir(input_dir)
        raise FolderError(
            f"--input_dir {input_dir} holds no stain images "
            f"({{Id}}_{{{','.join(schemas.STAINS)}}}.{{{','.join(e[1:] for e in stains_lib.EXTENSIONS)}}})"
            + (f": {hint}" if hint else "")
        )
    listed = sorted(files) if ids is None else list(ids)
    samples, rejected = [], []
    for sid in listed:
        try:
            labels_lib.check_id(sid)
        except labels_lib.RowRejected as e:
            rejected.append((sid, e.reason, e.detail))
            continue
        by_stain = files.get(sid, {})
        missing = [s for s in schemas.STAINS if s not in by_stain]
        if missing:
            what = "image" if len(missing) == len(schemas.STAINS) else ", ".join(missing)
            rejected.append((sid, stains_lib.MISSING_STAIN, f"no {what} file for Id {sid!r} in {input_dir}"))
            continue
        samples.append(FolderSample(sid, tuple(stains_lib.choose_file(by_stain[s]) for s in schemas.STAINS)))
    unlisted = sorted(set(files) - set(listed))
    return FolderPlan(tuple(samples), tuple(rejected), tuple(unlisted))


def decode_stored(data: bytes) -> np.ndarray:
    """A stain stream that the preprocessing job stores as it is, decoded as the shard path decodes it."""
    import tensorflow as tf

    return tf.io.decode_image(data, channels=1, expand_animations=False).numpy()[:, :, 0]


def read_sample(
    sample: FolderSample,
    image_size: int,
    read: Callable[[str], bytes] = fileio.read_bytes,
    decode_jpeg: Callable[[bytes], np.ndarray] = decode_stored,
) -> np.ndarray:
    """One sample's stains as uint8 [image_size, image_size, NUM_STAINS], by the preprocessing job's rules.

    `read` reads a file's bytes; `decode_jpeg` decodes a JPEG stain that needs no conversion nor resizing
    (the one case where Pillow's pixels are not the shard path's).

    Raises:
      schemas.stains.Rejected: a file that cannot be read (`missing_stain`, as the preprocessing job
        says), an empty, corrupt or unsupported image, stains of different sizes.
    """
    data = {}
    for stain, path in zip(schemas.STAINS, sample.paths, strict=True):
        try:
            data[stain] = read(path)
        except Exception as e:  # noqa: BLE001 (listed but unreadable: deleted, permissions, a network error)
            raise stains_lib.Rejected(stains_lib.MISSING_STAIN, f"cannot read {path}: {e}") from None
    seen = stains_lib.inspect_stains(data, image_size)
    return np.stack(
        [
            decode_jpeg(data[s]) if not note and data[s].startswith(_JPEG_MAGIC) else seen.pixels[s]
            for s, note in zip(schemas.STAINS, seen.conversions, strict=True)
        ],
        axis=-1,
    )


def read_samples(
    samples: Sequence[FolderSample],
    image_size: int,
    workers: int = READ_WORKERS,
    read: Callable[[str], bytes] = fileio.read_bytes,
) -> Iterator[tuple[FolderSample, np.ndarray | stains_lib.Rejected]]:
    """(sample, image or the Rejected it raised) in the order of `samples`, decoded by a pool of threads.

    At most 2 x workers samples are in flight, so memory stays bounded on a folder of any size.
    """
    window: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for sample in samples:
            window.append((sample, pool.submit(read_sample, sample, image_size, read)))
            if len(window) >= 2 * max(1, workers):
                yield _result(*window.popleft())
        while window:
            yield _result(*window.popleft())


def _result(sample: FolderSample, future) -> tuple[FolderSample, np.ndarray | stains_lib.Rejected]:
    try:
        return sample, future.result()
    except stains_lib.Rejected as e:
        return sample, e


def make_dataset(
    samples: Sequence[FolderSample],
    image_size: int,
    batch_size: int,
    rejected: list[tuple[str, str, str]],
    workers: int = READ_WORKERS,
):
    """A tf.data pipeline of (uint8 images [B, S, S, NUM_STAINS], zero labels [B, NUM_CLASSES], Ids [B]).

    The same element structure as `model.data.make_eval_dataset(..., with_ids=True)`, so the shard path's
    scoring applies as it is. Samples that fail to read are skipped and appended to `rejected` as
    (Id, reason, detail) while the dataset is consumed.
    """
    import tensorflow as tf

    def generate():
        for sample, result in read_samples(samples, image_size, workers):
            if isinstance(result, stains_lib.Rejected):
                rejected.append((sample.id, result.reason, result.detail))
            else:
                yield result, sample.id

    spec = (
        tf.TensorSpec([image_size, image_size, schemas.NUM_STAINS], tf.uint8),
        tf.TensorSpec([], tf.string),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec)
    ds = ds.map(lambda image, sid: (image, tf.zeros([schemas.NUM_CLASSES], tf.float32), sid))
    return ds.batch(batch_size).prefetch(1)

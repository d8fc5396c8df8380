"""The image passes before writing: sizes from headers (ReadSizes, CheckSizes) and the full inspection of
every sample (InspectSamples: read, decode, validate, pixel statistics, perceptual hash, planned bytes).

The size check is cheap (the first bytes of each file) and gates the inspection: when samples differ in
size and no --image_size was given, nothing is decoded or written and the summary carries the error.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import google_crc32c
import numpy as np

import schemas
from pipelines import storage
from pipelines.progress import ProgressFile
from pipelines.transforms.samples import Candidate, rejection
from schemas import stains as stains_lib

COUNTERS = "preprocess"
INSPECT_PHASE = "inspected"
_EXAMPLE_IDS = 3


class _HeaderSizeFn(beam.DoFn):
    def process(self, c: Candidate):
        sizes = set()
        for path in c.paths:
            try:
                head = storage.read_bytes(path, stains_lib.HEADER_BYTES)
            except Exception:  # noqa: BLE001 (unreadable here: the inspection rejects it with the reason)
                return
            size = stains_lib.header_size(head)
            if size is None:
                return
            sizes.add(size)
        if len(sizes) == 1:  # stains of different sizes are the sample's own problem (size_mismatch)
            yield sizes.pop(), c.id


class _SizesFn(beam.CombineFn):
    """(height, width), Id -> {size: (count, a few example Ids, smallest first)}."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, item):
        size, sample_id = item
        count, ids = acc.get(size, (0, []))
        acc[size] = (count + 1, sorted([*ids, sample_id])[:_EXAMPLE_IDS])
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            for size, (count, ids) in acc.items():
                c0, i0 = out.get(size, (0, []))
                out[size] = (c0 + count, sorted(i0 + ids)[:_EXAMPLE_IDS])
        return out

    def extract_output(self, acc):
        return acc


def size_error(sizes: dict[tuple[int, int], tuple[int, list[str]]], image_size: int | None) -> str | None:
    """The error message when samples differ in size and no --image_size was given, else None."""
    if image_size is not None or len(sizes) <= 1:
        return None
    parts = [
        f"{w}x{h} ({count} sample{'s' * (count > 1)}, e.g. {', '.join(ids)})"
        for (h, w), (count, ids) in sorted(sizes.items(), key=lambda kv: -kv[1][0])
    ]
    return f"the samples differ in size: {'; '.join(parts)}. Pass --image_size N to resize them to one size"


def _to_error(sizes, image_size):
    return size_error(sizes, image_size)


@beam.ptransform_fn
def CheckSizes(candidates, image_size: int | None):  # noqa: N802
    """Candidates -> one element: None, or the error message when sizes differ without --image_size.

    Sizes come from the image headers (PNG IHDR, JPEG SOF, TIFF tags: the first 64 KiB of each file).
    """
    if image_size is not None:  # everything is resized: no size can be wrong
        return candidates.pipeline | "NoCheck" >> beam.Create([None])
    return (
        candidates
        | "ReadHeaders" >> beam.ParDo(_HeaderSizeFn())
        | "Sizes" >> beam.CombineGlobally(_SizesFn())
        | "Verdict" >> beam.Map(_to_error, image_size)
    )


def checksums(data: dict[str, bytes]) -> tuple[int, ...]:
    """CRC-32C of each stain file's bytes, in schemas.STAINS order."""
    return tuple(google_crc32c.value(data[s]) for s in schemas.STAINS)


def read_stains(c: Candidate) -> dict[str, bytes]:
    """The four stain files' bytes of one sample. Raises OSError naming the file."""
    data = {}
    for stain, path in zip(schemas.STAINS, c.paths):
        try:
            data[stain] = storage.read_bytes(path)
        except Exception as e:  # noqa: BLE001 (Beam wraps IO errors)
            raise OSError(f"cannot read {path}: {e}") from None
    return data


def inspect_candidate(
    c: Candidate, data: dict[str, bytes], image_size: int | None, strict_modes: bool, hash_fn=None
) -> tuple[Candidate, bytes]:
    """One sample's inspection: (the candidate with what the write pass needs, its hash bytes or b"").

    `num_bytes` becomes the planned output bytes: the stored streams' sizes, or an estimate of the PNG a
    converted or resized stain will be re-encoded as. Raises stains.Rejected.
    """
    seen = stains_lib.inspect_stains(data, image_size, strict_modes)
    planned = sum(
        stains_lib.estimate_png_bytes(seen.pixels[s]) if note else len(data[s])
        for s, note in zip(schemas.STAINS, seen.conversions)
    )
    h = b"" if hash_fn is None else np.asarray(hash_fn(seen.pixels), np.uint64).tobytes()
    inspected = dataclasses.replace(
        c,
        num_bytes=int(planned),
        height=seen.height,
        width=seen.width,
        mean=seen.mean,
        sq_mean=seen.sq_mean,
        checksums=checksums(data),
        conversions=seen.conversions,
    )
    return inspected, h


class _InspectFn(beam.DoFn):
    """Reads and decodes one sample; emits it with its statistics and planned bytes, or a rejection."""

    HASHES, REJECTED = "hashes", "rejected"

    def __init__(self, image_size, strict_modes, hash_fn, progress_dir):
        self._image_size = image_size
        self._strict = strict_modes
        self._hash_fn = hash_fn
        self._progress_dir = progress_dir

    def setup(self):
        self._progress = ProgressFile(self._progress_dir, INSPECT_PHASE)

    def finish_bundle(self):
        self._progress.flush()

    def process(self, c: Candidate, error):
        if not error:  # sizes differ: the job stops before any decoding or writing
            yield from self._inspect(c)

    def _inspect(self, c: Candidate):
        try:
            inspected, h = inspect_candidate(c, read_stains(c), self._image_size, self._strict, self._hash_fn)
        except stains_lib.Rejected as e:
            beam.metrics.Metrics.counter(COUNTERS, f"rejected_{e.reason}").inc()
            self._progress.add(rejected=1)
            yield beam.pvalue.TaggedOutput(self.REJECTED, rejection(c.source, c.id, e.reason, e.detail))
            return
        except OSError as e:  # listed but unreadable (deleted, permissions)
            self._progress.add(rejected=1)
            yield beam.pvalue.TaggedOutput(
                self.REJECTED, rejection(c.source, c.id, stains_lib.MISSING_STAIN, str(e))
            )
            return
        self._progress.add(done=1)
        yield beam.pvalue.TaggedOutput(self.HASHES, (c.id, c.source, c.labeled, h))
        yield inspected


@beam.ptransform_fn
def InspectSamples(
    candidates, size_check, image_size=None, strict_modes=False, hash_fn=None, progress_dir=None
):  # noqa: N802
    """Candidate -> inspected Candidate (main), `hashes` ((Id, source, labeled, hash bytes)), `rejected`.

    Runs only when `size_check` (a one-element PCollection from CheckSizes) holds no error.
    """
    fn = _InspectFn(image_size, strict_modes, hash_fn, progress_dir)
    return candidates | beam.ParDo(fn, beam.pvalue.AsSingleton(size_check)).with_outputs(
        fn.HASHES, fn.REJECTED, main="samples"
    )

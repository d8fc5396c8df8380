"""The download job: external HPAv18 stain images from the atlas' image server into one folder (Apache Beam).

    python -m pipelines.download --labels_csv HPAv18RBGY_wodpl.csv --output_dir hpav18/ [--image_size 512]

An atlas Id `{a}_{rest}` has four files, `{base_url}/{a}/{rest}_{stain}.jpg`, stains red, green, blue,
yellow. Each becomes `{output_dir}/{Id}_{stain}.jpg` (the bytes as served) or, with `--image_size N`,
`{Id}_{stain}.png` (8-bit grayscale, N x N, box filter: the preprocessing job's rules, schemas.stains).
The folder is the preprocessing job's `--input_dir` as it is.

The graph, each step a named transform:

    ReadIds        the label file's Ids, read by a worker (de-duplicated and cut to --limit in file order;
                   only the path is in the graph, the launcher has checked the file and counted them)
    PlanRequests   Id -> one request per stain; an Id that is no atlas Id -> report rows `bad_id`
    ListPresent    stain files already in --output_dir (Beam's fileio: local paths and gs:// alike)
    MatchPresent   requests joined with the files already there
    Fetch          per request: keep a valid present file, or download it (a bounded thread pool per DoFn
                   instance, retries with exponential backoff), check it is a whole image, write atomically
    WriteReport    download_report.csv: one row per stain file requested, sorted by Id and stain

Status of a stain file in the report:

    downloaded   fetched, decoded in full, written
    present      a valid file was already there (from an earlier run): not fetched again
    not_found    HTTP 404 or 410
    not_image    HTTP 200 but not a whole image (an HTML error page, a truncated JPEG): nothing written
    http_error   another HTTP status that a retry would not change (403, ...)
    failed       timeouts, connection errors, 429 or 5xx on every attempt
    bad_id       the Id is no plain file-name stem or has no `{a}_{rest}` form: nothing requested

A sample with some stains missing keeps the stains that were fetched (a rerun fetches only the missing ones);
the preprocessing job rejects it as `missing_stain` until it is complete. The summary line counts such
incomplete samples.

Writes go to `{output_dir}/.partial/` and are renamed into place, so a killed run never leaves a half-written
stain under its final name; a rerun deletes the leftovers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import http.client
import io
import logging
import os
import posixpath
import random
import shutil
import sys
import tempfile
import time
import uuid
from typing import Callable, Iterable

import apache_beam as beam
import urllib3
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

import schemas
from pipelines import beam_options, progress_files, rate_limit
from schemas import cli, locks
from schemas import labels as labels_lib
from schemas import stains as stains_lib

PROG = "hpa-download"
DOWNLOADED = "downloaded"
PRESENT = "present"
NOT_FOUND = "not_found"
NOT_IMAGE = "not_image"
HTTP_ERROR = "http_error"
FAILED = "failed"
BAD_ID = "bad_id"
STATUSES = (DOWNLOADED, PRESENT, NOT_FOUND, NOT_IMAGE, HTTP_ERROR, FAILED, BAD_ID)
_USABLE = (DOWNLOADED, PRESENT)

PARTIAL_DIR = ".partial"
# Image formats the preprocessing job reads, and the extension each is written with (its preference order).
_EXTENSION_OF_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}
_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_GONE_STATUS = frozenset({404, 410})
_USER_AGENT = "hpa-protein-localization-download/0.1 (Beam job; urllib3)"


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """Flags of the job (everything else goes to Beam's PipelineOptions)."""

    labels_csv: str
    output_dir: str
    base_url: str = "http://v18.proteinatlas.org/images"
    image_size: int | None = None
    limit: int | None = None
    concurrency: int = 16
    connect_timeout: float = 10.0
    allow_failed: int = 0
    read_timeout: float = 60.0
    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    progress_seconds: float = 10.0
    max_requests_per_second: float | None = None  # the whole job's, split among its processes
    processes: int = 1  # processes sending requests at once (rate_limit.processes_of_job)
    dry_run: bool = False
    job_key: str = ""  # one per run: the process-wide rate limiter is shared by this run's DoFns only

    @property
    def process_rate(self) -> float | None:
        """Requests per second allowed to one process (None: no limit)."""
        if self.max_requests_per_second is None:
            return None
        return self.max_requests_per_second / max(1, self.processes)


@dataclasses.dataclass(frozen=True)
class StainRequest:
    """One stain file to obtain: its URL and the files of this Id and stain already in the output folder."""

    id: str
    stain: str
    url: str
    present: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Fetched:
    """What one URL gave after retries: a status of the report, a detail, the body (only when downloaded)."""

    status: str
    detail: str
    body: bytes = b""
    attempts: int = 1
    content_type: str = ""


# --------------------------------------------------------------------------------------------------------
# Pure parts: URLs, file names, image checks, the summary


def stain_url(base_url: str, sample_id: str, stain: str) -> str:
    """The atlas URL of one stain: Id `{a}_{rest}` -> `{base_url}/{a}/{rest}_{stain}.jpg`.

    Raises:
      labels.RowRejected: an unsafe Id, or one without an `_` after its first part.
    """
    labels_lib.check_id(sample_id)
    first, _, rest = sample_id.partition("_")
    if not first or not rest:
        raise labels_lib.RowRejected(
            labels_lib.BAD_ID, f"Id {sample_id!r} is not an atlas Id of the form {{a}}_{{rest}}"
        )
    return f"{base_url.rstrip('/')}/{first}/{rest}_{stain}.jpg"


def stain_file(path: str) -> tuple[str, str, str] | None:
    """`dir/{Id}_{stain}.{ext}` -> (Id, stain, ext) for a stain file of the preprocessing job, else None."""
    stem, ext = posixpath.splitext(posixpath.basename(path))
    ext = ext.lower()
    sample_id, _, stain = stem.rpartition("_")
    if ext not in _EXTENSIONS or stain not in schemas.STAINS or not sample_id:
        return None
    return sample_id, stain, ext


def prepare_image(body: bytes, stain: str, image_size: int | None) -> tuple[bytes, str]:
    """Checks that a downloaded body is a whole image; returns the bytes to write and their extension.

    Without image_size the body is kept as served; with it the stain becomes an 8-bit grayscale PNG of
    image_size x image_size (schemas.stains' conversion and box-filter resize, as the preprocessing job).

    Raises:
      stains.Rejected: an empty, truncated or undecodable body, or a format the preprocessing job cannot read.
    """
    pixels, fmt, _ = stains_lib.decode_gray8(stain, body)
    if fmt not in _EXTENSION_OF_FORMAT:
        raise stains_lib.Rejected(
            stains_lib.CORRUPT_IMAGE, f"{stain} stain is a {fmt} image; expected JPEG, PNG or TIFF"
        )
    if image_size is None:
        return body, _EXTENSION_OF_FORMAT[fmt]
    if pixels.shape != (image_size, image_size):
        pixels = stains_lib.resize(pixels, image_size)
    return stains_lib.encode_png(pixels), ".png"


def check_present(data: bytes, stain: str, image_size: int | None) -> str | None:
    """Why a file already in the output folder cannot stand for this run's output, or None if it can.

    A present file must decode in full; with image_size it must also be an image_size x image_size
    8-bit grayscale PNG (what this run would write).
    """
    try:
        pixels, fmt, note = stains_lib.decode_gray8(stain, data)
    except stains_lib.Rejected as e:
        return e.detail
    if fmt not in _EXTENSION_OF_FORMAT:
        return f"a {fmt} file"
    if image_size is not None and (fmt != "PNG" or note or pixels.shape != (image_size, image_size)):
        h, w = pixels.shape
        return f"a {w}x{h} {fmt} ({note or 'gray'}), not a {image_size}x{image_size} grayscale PNG"
    return None


def _describe_error(e: BaseException) -> str:
    reason = getattr(e, "reason", None) if isinstance(e, urllib3.exceptions.MaxRetryError) else None
    e = reason or e
    # urllib3's NewConnectionError is a ConnectTimeoutError (for compatibility): test it before timeouts.
    if isinstance(e, ConnectionRefusedError) or (
        isinstance(e, urllib3.exceptions.NewConnectionError)
        and (isinstance(e.__cause__ or e.__context__, ConnectionRefusedError) or "refused" in str(e).lower())
    ):
        kind = "connection refused"
    elif isinstance(e, (urllib3.exceptions.NewConnectionError, ConnectionError)):
        kind = "connection error"
    elif isinstance(e, (urllib3.exceptions.TimeoutError, TimeoutError)):
        kind = "timeout"
    elif isinstance(e, (urllib3.exceptions.ProtocolError, http.client.HTTPException)):
        kind = "broken response"
    else:
        kind = type(e).__name__
    return f"{kind} ({str(e)[:120]})"


# Redirects are followed; every other retry is the job's own (below), so each attempt is reported.
_REDIRECTS_ONLY = urllib3.Retry(total=None, connect=0, read=0, other=0, status=0, redirect=5)


def fetch(
    pool: urllib3.PoolManager,
    url: str,
    retries: int,
    backoff: float,
    backoff_max: float,
    sleep: Callable[[float], None] = time.sleep,
    rate: rate_limit.RequestRate | None = None,
) -> Fetched:
    """GETs one URL, retrying timeouts, connection errors, broken bodies, 429 and 5xx.

    The wait before retry k (1-based) is backoff * 2**(k-1) seconds, capped at backoff_max, times a random
    factor in [0.5, 1] so that many workers do not retry in step; a Retry-After header lengthens it (up to
    backoff_max) and, with `rate`, pauses every request sharing it (the whole process's). Every attempt
    waits for its turn at `rate` first. urllib3's own Retry is not used: its first retry does not wait.

    Returns:
      Fetched with status DOWNLOADED (body set), NOT_FOUND, HTTP_ERROR or FAILED.
    """
    problems: list[str] = []
    for attempt in range(1, retries + 2):
        retry_after = 0.0
        if rate is not None:
            rate.acquire()
        try:
            resp = pool.request("GET", url, retries=_REDIRECTS_ONLY, preload_content=True)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
            problems.append(_describe_error(e))
        else:
            if resp.status == 200:
                detail = f"after {attempt} attempts: " + "; ".join(problems) if problems else ""
                return Fetched(DOWNLOADED, detail, resp.data, attempt, resp.headers.get("Content-Type", ""))
            if resp.status in _GONE_STATUS:
                return Fetched(NOT_FOUND, f"HTTP {resp.status}", attempts=attempt)
            if resp.status not in _RETRY_STATUS:
                return Fetched(HTTP_ERROR, f"HTTP {resp.status}", attempts=attempt)
            problems.append(f"HTTP {resp.status}")
            try:
                retry_after = float(resp.headers.get("Retry-After", 0))
            except ValueError:
                retry_after = 0.0  # an HTTP date: keep the exponential wait
            if rate is not None and retry_after > 0:
                rate.pause(min(retry_after, backoff_max))
        if attempt <= retries:
            wait = min(backoff_max, backoff * 2 ** (attempt - 1)) * (0.5 + 0.5 * random.random())
            sleep(max(wait, min(retry_after, backoff_max)))
    return Fetched(FAILED, f"{len(problems)} attempts: " + "; ".join(problems), attempts=retries + 1)


def summarise(rows: Iterable[tuple], num_ids: int, seconds: float) -> dict:
    """Counts of a report: by status, bytes, samples complete (four usable stains) or not.

    Args:
      rows: report rows (Id, stain, status, detail, bytes).
      num_ids: Ids requested.
      seconds: wall time of the run.
    """
    by_status = collections.Counter()
    num_bytes = collections.Counter()
    usable = collections.Counter()
    ids = set()
    for sample_id, _, status, _, size in rows:
        ids.add(sample_id)
        by_status[status] += 1
        num_bytes[status] += int(size)
        usable[sample_id] += status in _USABLE
    incomplete = sorted(i for i in ids if usable[i] < schemas.NUM_STAINS)
    return {
        "ids": num_ids,
        "files": sum(by_status.values()),
        "by_status": {s: by_status[s] for s in STATUSES if by_status[s]},
        "bytes_downloaded": num_bytes[DOWNLOADED],
        "bytes_present": num_bytes[PRESENT],
        "complete_samples": len(ids) - len(incomplete),
        "incomplete_samples": len(incomplete),
        "incomplete_examples": incomplete[:10],
        "seconds": round(seconds, 2),
    }


def summary_line(summary: dict) -> str:
    """One line for the log: what the run did."""
    counts = ", ".join(f"{n} {s}" for s, n in summary["by_status"].items())
    secs = max(summary["seconds"], 1e-9)
    line = (
        f"{summary['ids']} Ids, {summary['files']} stain files in {summary['seconds']:.1f} s: {counts}; "
        f"{summary['bytes_downloaded'] / 1e6:.1f} MB downloaded "
        f"({summary['by_status'].get(DOWNLOADED, 0) / secs:.1f} files/s); "
        f"{summary['complete_samples']} samples complete, {summary['incomplete_samples']} incomplete"
    )
    if summary["incomplete_samples"]:
        line += (
            f" (e.g. {', '.join(summary['incomplete_examples'][:3])}: the preprocessing job rejects them as "
            f"missing_stain; rerun to retry what failed; see {schemas.DOWNLOAD_REPORT_FILE})"
        )
    return line


# --------------------------------------------------------------------------------------------------------
# Transforms


def _report_row(request_id: str, stain: str, status: str, detail: str = "", size: int = 0) -> tuple:
    """A download_report.csv row, in schemas.DOWNLOAD_REPORT_COLUMNS order."""
    return (request_id, stain, status, detail, size)


class _PlanRequestsFn(beam.DoFn):
    BAD = "bad"

    def __init__(self, base_url: str):
        self._base_url = base_url

    def process(self, sample_id: str):
        try:
            urls = {stain: stain_url(self._base_url, sample_id, stain) for stain in schemas.STAINS}
        except labels_lib.RowRejected as e:
            beam.metrics.Metrics.counter("download", BAD_ID).inc(schemas.NUM_STAINS)
            for stain in schemas.STAINS:
                yield beam.pvalue.TaggedOutput(self.BAD, _report_row(sample_id, stain, BAD_ID, e.detail))
            return
        for stain, url in urls.items():
            yield (sample_id, stain), url


@beam.ptransform_fn
def PlanRequests(ids, base_url: str):  # noqa: N802 (Beam transform names are CamelCase)
    """Id -> ((Id, stain), url) per stain; Ids that are no atlas Id go to the `bad` output as report rows."""
    return ids | beam.ParDo(_PlanRequestsFn(base_url)).with_outputs(_PlanRequestsFn.BAD, main="requests")


def _present_key(meta):
    parsed = stain_file(meta.path)
    if parsed is not None:
        sample_id, stain, _ = parsed
        yield (sample_id, stain), meta.path


@beam.ptransform_fn
def ListPresent(pbegin, output_dir: str):  # noqa: N802
    """The stain files already in output_dir, keyed by (Id, stain)."""
    return (
        pbegin
        | "Pattern" >> beam.Create([posixpath.join(output_dir, "*")])
        | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
        | "ParseName" >> beam.FlatMap(_present_key)
    )


def _preference(path: str, image_size: int | None) -> tuple[int, str]:
    ext = posixpath.splitext(path)[1].lower()
    wanted = ".png" if image_size else ".jpg"
    return (0 if ext == wanted else 1 + _EXTENSIONS.index(ext), path)


def _join_present(item, image_size: int | None):
    (sample_id, stain), grouped = item
    urls = list(grouped["url"])
    if urls:  # files of Ids that were not requested are left alone
        present = tuple(sorted(grouped["present"], key=lambda p: _preference(p, image_size)))
        yield StainRequest(sample_id, stain, urls[0], present)


@beam.ptransform_fn
def MatchPresent(inputs, image_size: int | None):  # noqa: N802
    """(requests, present files) -> StainRequest per request, with the files already there."""
    requests, present = inputs
    return (
        {"url": requests, "present": present}
        | "JoinByIdStain" >> beam.CoGroupByKey()
        | "Join" >> beam.FlatMap(_join_present, image_size=image_size)
    )


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def write_atomic(target: str, data: bytes, partial_dir: str) -> None:
    """Writes data under a unique name in partial_dir, then renames it to target (local and gs://)."""
    tmp = posixpath.join(partial_dir, f"{posixpath.basename(target)}.{uuid.uuid4().hex}")
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    FileSystems.rename([tmp], [target])


class _FetchFn(beam.DoFn):
    """StainRequest -> report row; up to `concurrency` requests in flight per DoFn instance (a thread pool).

    Results are emitted as they complete, from process() while the pool is full and from finish_bundle()
    for the rest. Beam counters are updated on the bundle's own thread (metrics are per thread).
    """

    def __init__(self, cfg: DownloadConfig, partial_dir: str, progress_dir: str | None):
        self._cfg = cfg
        self._partial_dir = partial_dir
        self._progress_dir = progress_dir

    def setup(self):
        cfg = self._cfg
        self._http = urllib3.PoolManager(
            maxsize=cfg.concurrency,
            timeout=urllib3.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout),
            headers={"User-Agent": _USER_AGENT},
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="download")
        self._rate = rate_limit.shared_rate(cfg.process_rate, cfg.job_key)  # one per process
        self._pending: set[concurrent.futures.Future] = set()
        self._counts: collections.Counter = collections.Counter()
        self._last_log = time.monotonic()
        self._progress = None
        if self._progress_dir is not None:
            self._progress = progress_files.CounterFile(self._progress_dir, min(2.0, cfg.progress_seconds))

    def teardown(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.clear()

    def start_bundle(self):
        self._pending = set()

    def process(self, request: StainRequest):
        self._pending.add(self._pool.submit(self._obtain, request))
        block = len(self._pending) >= 2 * self._cfg.concurrency  # keep the pool fed, memory bounded
        yield from self._collect(block)

    def finish_bundle(self):
        while self._pending:
            for row in self._collect(block=True):
                yield GlobalWindows.windowed_value(row)
        self._report(force=True)

    def _collect(self, block: bool):
        done, self._pending = concurrent.futures.wait(
            self._pending, timeout=None if block else 0, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in done:
            row = future.result()  # an exception here (e.g. a failed write) fails the bundle: Beam retries it
            status, size = row[2], row[4]
            beam.metrics.Metrics.counter("download", status).inc()
            beam.metrics.Metrics.counter("download", f"bytes_{status}").inc(size)
            self._counts[status] += 1
            self._counts[f"bytes_{status}"] += size
            yield row
        self._report()

    def _report(self, force: bool = False):
        if self._progress is not None:
            self._progress.update(self._counts, force)
        elif force or time.monotonic() - self._last_log > self._cfg.progress_seconds:
            self._last_log = time.monotonic()  # remote workers: a line in the worker log
            logging.info("download progress of this worker: %s", dict(self._counts))

    def _obtain(self, req: StainRequest) -> tuple:
        cfg = self._cfg
        replaced = []
        for path in req.present:
            try:
                data = _read(path)
            except OSError as e:
                replaced.append((path, f"unreadable: {e}"))
                continue
            problem = check_present(data, req.stain, cfg.image_size)
            if problem is None:
                return _report_row(req.id, req.stain, PRESENT, posixpath.basename(path), len(data))
            replaced.append((path, problem))
        note = "; ".join(f"replaces {posixpath.basename(p)} ({why})" for p, why in replaced)
        got = fetch(self._http, req.url, cfg.retries, cfg.backoff, cfg.backoff_max, rate=self._rate)
        detail = "; ".join(filter(None, [got.detail, note]))
        if got.status != DOWNLOADED:
            return _report_row(req.id, req.stain, got.status, detail)
        try:
            data, ext = prepare_image(got.body, req.stain, cfg.image_size)
        except stains_lib.Rejected as e:
            what = f"{e.detail}; Content-Type {got.content_type or '-'}, body starts {got.body[:32]!r}"
            detail = "; ".join(filter(None, [what, note]))
            return _report_row(req.id, req.stain, NOT_IMAGE, detail, len(got.body))
        target = posixpath.join(cfg.output_dir, f"{req.id}_{req.stain}{ext}")
        write_atomic(target, data, self._partial_dir)
        # One file per stain: a replaced file of another name would shadow or duplicate the new one.
        stale = [p for p, _ in replaced if p != target]
        if stale:
            FileSystems.delete(stale)
        return _report_row(req.id, req.stain, DOWNLOADED, detail, len(data))


@beam.ptransform_fn
def Fetch(requests, cfg: DownloadConfig, partial_dir: str, progress_dir: str | None = None):  # noqa: N802
    """StainRequest -> report row (see the module docstring for the statuses)."""
    return requests | beam.ParDo(_FetchFn(cfg, partial_dir, progress_dir))


def _sort_key(row: tuple) -> tuple[str, int]:
    return row[0], schemas.STAINS.index(row[1])


def _write_report(rows: list[tuple], path: str, partial_dir: str) -> int:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(schemas.DOWNLOAD_REPORT_COLUMNS)
    w.writerows(sorted(rows, key=_sort_key))
    write_atomic(path, buf.getvalue().encode("utf-8"), partial_dir)
    return len(rows)


@beam.ptransform_fn
def WriteReport(rows, path: str, partial_dir: str):  # noqa: N802
    """Report rows -> download_report.csv (one file, sorted by Id and stain order)."""
    return (
        rows
        | "Collect" >> beam.combiners.ToList()
        | "Write" >> beam.Map(_write_report, path=path, partial_dir=partial_dir)
    )


def _ids_of_file(path: str, limit: int | None):
    ids, _ = read_ids(path, limit)
    yield from ids


@beam.ptransform_fn
def ReadIds(pbegin, path: str, limit: int | None):  # noqa: N802
    """The Ids of a label file, each once, in file order, cut to `limit`: read by one worker, then spread."""
    return (
        pbegin
        | "Path" >> beam.Create([path])
        | "Parse" >> beam.FlatMap(_ids_of_file, limit)
        | "Spread" >> beam.Reshuffle()
    )


def build_pipeline(p: beam.Pipeline, cfg: DownloadConfig, partial_dir: str, progress_dir):
    """Wires the job's transforms into `p` (the Ids are read by the workers: the graph holds their file's
    path only)."""
    ids = p | "ReadIds" >> ReadIds(cfg.labels_csv, cfg.limit)
    planned = ids | "PlanRequests" >> PlanRequests(cfg.base_url)
    present = p | "ListPresent" >> ListPresent(cfg.output_dir)
    requests = (planned.requests, present) | "MatchPresent" >> MatchPresent(cfg.image_size)
    fetched = requests | "Fetch" >> Fetch(cfg, partial_dir, progress_dir)
    rows = (planned.bad, fetched) | "AllRows" >> beam.Flatten()
    _ = rows | "WriteReport" >> WriteReport(
        posixpath.join(cfg.output_dir, schemas.DOWNLOAD_REPORT_FILE), partial_dir
    )


# --------------------------------------------------------------------------------------------------------
# The launcher


def parse_args(argv: list[str] | None) -> tuple[DownloadConfig, list[str]]:
    """Job flags -> DownloadConfig; unknown flags are returned for Beam's PipelineOptions."""
    d = DownloadConfig(labels_csv="", output_dir="")
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Download the four stain images of every atlas Id of a label file (e.g. the external "
        "HPAv18 set) into one folder that the preprocessing job reads as its --input_dir. Any Beam option "
        "(--runner DataflowRunner --project P --region R --temp_location gs://...) passes through.",
    )
    parser.add_argument("--labels_csv", required=True, help="Id,Target file of atlas Ids (local or gs://)")
    parser.add_argument(
        "--output_dir", required=True, help="folder for {Id}_{stain}.jpg|png and download_report.csv"
    )
    parser.add_argument(
        "--base_url",
        default=d.base_url,
        help=f"image server: Id {{a}}_{{rest}} is at BASE/{{a}}/{{rest}}_{{stain}}.jpg; default {d.base_url}",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="resize each stain to N x N on the worker (box filter, 8-bit grayscale PNG); default: keep "
        "the JPEG bytes as served",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N Ids of the label file")
    parser.add_argument(
        "--concurrency",
        "--workers",
        dest="concurrency",
        type=int,
        default=d.concurrency,
        help=f"requests in flight per DoFn instance (a thread pool; default {d.concurrency})",
    )
    parser.add_argument("--connect_timeout", type=float, default=d.connect_timeout, help="seconds to connect")
    parser.add_argument(
        "--timeout",
        dest="read_timeout",
        type=float,
        default=d.read_timeout,
        help=f"seconds without data from the server before an attempt fails (default {d.read_timeout:g})",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=d.retries,
        help=f"retries after a timeout, connection error, 429 or 5xx (default {d.retries})",
    )
    parser.add_argument(
        "--backoff",
        type=float,
        default=d.backoff,
        help=f"seconds before the first retry, doubling each retry (default {d.backoff:g})",
    )
    parser.add_argument(
        "--backoff_max", type=float, default=d.backoff_max, help="longest wait between attempts"
    )
    parser.add_argument(
        "--progress_seconds", type=float, default=d.progress_seconds, help="progress print interval"
    )
    parser.add_argument(
        "--allow_failed",
        type=int,
        default=0,
        metavar="N",
        help="exit 0 although up to N stain files could not be fetched (any status but downloaded or "
        "present); beyond N the job exits 1 after writing its report (a rerun fetches only those)",
    )
    parser.add_argument(
        "--max_requests_per_second",
        type=float,
        default=None,
        help="requests per second of the whole job to the image server, split evenly among the processes "
        "that send them (Dataflow: --max_num_workers x SDK processes per worker; see "
        "pipelines/rate_limit.py); a Retry-After answer pauses the whole process. Default: no limit",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="send nothing: print the requests, the bytes and the time the job would take at "
        "--max_requests_per_second, then stop",
    )
    args, beam_args = parser.parse_known_args(argv)
    beam_options.reject_unknown_beam_flags(parser, beam_args)
    if not args.base_url.startswith(("http://", "https://")):
        parser.error(f"--base_url must start with http:// or https://, got {args.base_url!r}")
    for name in ("image_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < (8 if name == "image_size" else 1):
            parser.error(f"--{name} must be at least {8 if name == 'image_size' else 1}")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.allow_failed < 0:
        parser.error("--allow_failed must be >= 0")
    if args.retries < 0 or min(args.connect_timeout, args.read_timeout) <= 0 or args.backoff < 0:
        parser.error("--retries and --backoff must be >= 0 and the timeouts > 0")
    if args.max_requests_per_second is not None and args.max_requests_per_second <= 0:
        parser.error("--max_requests_per_second must be positive")
    beam_options.check_remote(parser, beam_args, inputs=[args.labels_csv], outputs=[args.output_dir])
    cfg = DownloadConfig(
        labels_csv=args.labels_csv,
        output_dir=args.output_dir.rstrip("/"),
        base_url=args.base_url.rstrip("/"),
        image_size=args.image_size,
        limit=args.limit,
        concurrency=args.concurrency,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        retries=args.retries,
        backoff=args.backoff,
        backoff_max=args.backoff_max,
        progress_seconds=args.progress_seconds,
        allow_failed=args.allow_failed,
        max_requests_per_second=args.max_requests_per_second,
        processes=rate_limit.processes_of_job(beam_args)[0],
        dry_run=args.dry_run,
        job_key=uuid.uuid4().hex,
    )
    return cfg, beam_args


def read_ids(path: str, limit: int | None = None) -> tuple[list[str], int]:
    """The Ids of a label file in file order, each once, cut to `limit`. Returns (Ids, repeated rows).

    Raises:
      labels.LabelFileError: an unreadable, empty or malformed label file.
    """
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read()
    except Exception as e:  # Beam wraps IO errors in BeamIOError and others
        raise labels_lib.LabelFileError(f"cannot read label file {path}: {e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise labels_lib.LabelFileError(f"label file {path} is not UTF-8 text") from None
    try:
        rows = labels_lib.parse_label_table(text, "download", "", path)
    except csv.Error as e:
        raise labels_lib.LabelFileError(f"label file {path} is not valid CSV: {e}") from None
    ids = list(dict.fromkeys(r.id for r in rows))
    repeats = len(rows) - len(ids)
    return (ids[:limit] if limit else ids), repeats


def _progress_line(c: collections.Counter, elapsed: float, total: int) -> str:
    done = sum(c[s] for s in STATUSES)
    by_status = ", ".join(f"{c[s]} {s}" for s in STATUSES if c[s])
    return (
        f"download: {done}/{total} stain files ({100.0 * done / max(total, 1):.0f}%)"
        f"{': ' + by_status if by_status else ''}; {c[f'bytes_{DOWNLOADED}'] / 1e6:.1f} MB, "
        f"{c[DOWNLOADED] / max(elapsed, 1e-9):.1f} downloads/s, {elapsed:.0f} s"
    )


def _clear_partial(partial_dir: str) -> int:
    """Deletes what a killed run left in partial_dir. Returns how many files."""
    leftovers = [m.path for m in FileSystems.match([posixpath.join(partial_dir, "*")])[0].metadata_list]
    if leftovers:
        FileSystems.delete(leftovers)
    return len(leftovers)


def read_report(output_dir: str) -> list[tuple]:
    """The rows of a written download_report.csv (bytes as int)."""
    text = _read(posixpath.join(output_dir, schemas.DOWNLOAD_REPORT_FILE)).decode("utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    if tuple(header) != schemas.DOWNLOAD_REPORT_COLUMNS:
        raise ValueError(f"unexpected report header {header}")
    return [(i, s, st, d, int(b)) for i, s, st, d, b in reader]


# The size of one stain as the atlas serves it, for --dry_run when the output folder holds none to measure:
# an assumption, the 2048 px JPEG of bench/download.py (a real competition stain upscaled): 299 kB.
ASSUMED_SERVED_BYTES = 299_000


def dry_run(cfg: DownloadConfig, ids: list[str], beam_args: list[str]) -> dict:
    """What the run would ask of the server, printed in one line; nothing is sent or written.

    Requests: the stain files of the Ids without a file of that Id and stain in the output folder (present
    files are checked by the run and fetched again only when they fail the check). Bytes: that many times
    the mean size of the stain files already there as served (`.jpg`), else ASSUMED_SERVED_BYTES.
    """
    wanted = {(i, s) for i in ids for s in schemas.STAINS}
    sizes = []
    present = set()
    for m in FileSystems.match([posixpath.join(cfg.output_dir, "*")])[0].metadata_list:
        parsed = stain_file(m.path)
        if parsed and (parsed[0], parsed[1]) in wanted:
            present.add((parsed[0], parsed[1]))
            if parsed[2] == ".jpg":
                sizes.append(m.size_in_bytes)
    per_file = sum(sizes) / len(sizes) if sizes else ASSUMED_SERVED_BYTES
    est = rate_limit.dry_run_estimate(len(wanted) - len(present), cfg.max_requests_per_second, per_file)
    processes, how = rate_limit.processes_of_job(beam_args)
    if est["seconds_at_rate"] is None:
        timing = "no --max_requests_per_second: the time depends on the server and --concurrency"
    else:
        timing = (
            f"{est['seconds_at_rate'] / 3600:.2f} h at {cfg.max_requests_per_second:g} requests/s "
            f"({cfg.process_rate:.3g}/s in each of {processes} process(es): {how})"
        )
    source = f"mean of {len(sizes)} present .jpg files" if sizes else "assumed 299 kB per stain"
    _log(
        f"dry run: {est['requests']} requests ({len(present)} of {len(wanted)} stain files already present), "
        f"{est['bytes'] / 1e9:.2f} GB ({source}); {timing}; nothing sent"
    )
    return {"dry_run": True, **est, "present": len(present), "processes": processes}


def run(argv: list[str] | None = None) -> dict:
    """Runs the job. Returns the summary (see `summarise`); raises on bad input or a broken invariant."""
    cfg, beam_args = parse_args(argv)
    try:
        return _run(cfg, beam_args)
    finally:
        locks.release(cfg.output_dir)  # a killed run leaves it, for the next one to take over


def _run(cfg: DownloadConfig, beam_args: list[str]) -> dict:
    t0 = time.time()
    ids, repeats = read_ids(cfg.labels_csv, cfg.limit)
    out = cfg.output_dir
    if cfg.dry_run:
        return dry_run(cfg, ids, beam_args)
    if "://" not in out:
        os.makedirs(out, exist_ok=True)
    partial_dir = posixpath.join(out, PARTIAL_DIR)
    locks.acquire(out, PROG)  # before .partial/ is cleared: it may be another live run's
    cleared = _clear_partial(partial_dir)
    options, local = beam_options.beam_pipeline_options(beam_args)
    _log(
        f"{len(ids)} Ids ({len(ids) * schemas.NUM_STAINS} stain files) from {cfg.labels_csv}"
        f"{f', {repeats} repeated rows skipped' if repeats else ''} -> {out} "
        f"(from {cfg.base_url}, {'as served' if cfg.image_size is None else f'{cfg.image_size} px PNG'}, "
        f"{cfg.concurrency} in flight per DoFn instance"
        f"{f'; {cleared} partial files of an interrupted run deleted' if cleared else ''})"
    )
    progress_dir = tempfile.mkdtemp(prefix="hpa-download-") if local else None
    try:
        cli.set_stage("the download (a rerun fetches only the missing files)")
        p = beam.Pipeline(options=options)
        build_pipeline(p, cfg, partial_dir, progress_dir)
        if progress_dir:  # a local run may only return from run() when it is finished
            line = functools.partial(_progress_line, total=len(ids) * schemas.NUM_STAINS)
            with progress_files.Printer(progress_dir, cfg.progress_seconds, line):
                p.run().wait_until_finish()
        else:
            p.run().wait_until_finish()
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
    rows = read_report(out)
    if len(rows) != len(ids) * schemas.NUM_STAINS:
        raise RuntimeError(
            f"invariant broken: {len(rows)} report rows for {len(ids)} Ids x {schemas.NUM_STAINS} stains"
        )
    _clear_partial(partial_dir)
    summary = summarise(rows, len(ids), time.time() - t0)
    _log(summary_line(summary))
    summary["allow_failed"] = cfg.allow_failed
    summary["report"] = posixpath.join(out, schemas.DOWNLOAD_REPORT_FILE)
    return summary


def not_fetched_error(summary: dict) -> str | None:
    """The exit line when more stain files than --allow_failed could not be fetched (None otherwise)."""
    missing = {s: n for s, n in summary.get("by_status", {}).items() if s not in _USABLE}
    if sum(missing.values()) <= summary.get("allow_failed", 0):
        return None
    counts = ", ".join(f"{n} {s}" for s, n in missing.items())
    return (
        f"{sum(missing.values())} stain file(s) could not be fetched ({counts}; --allow_failed "
        f"{summary.get('allow_failed', 0)}): see {summary['report']}; "
        "rerun the same command to fetch only those"
    )


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


@cli.command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one-line errors (exit 2 for bad input) instead of tracebacks."""
    summary: dict = {}
    status = cli.run_or_bad_input(PROG, labels_lib.LabelFileError, lambda: summary.update(run(argv)))
    error = not_fetched_error(summary) if status == cli.EXIT_OK else None
    if error:  # more stain files than --allow_failed could not be fetched: a script must see it
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return cli.EXIT_FAILED
    return status


if __name__ == "__main__":
    # Run through the package's module, not __main__, so that pickled classes resolve on Beam's workers.
    from pipelines import download

    sys.exit(download.main())

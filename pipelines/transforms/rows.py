"""Label rows: reading them on the workers, row-level checks and repeated Ids (ReadLabelRows, CheckRows,
DropDuplicateIds)."""

from __future__ import annotations

import apache_beam as beam

from pipelines import storage
from pipelines.transforms.samples import rejection
from schemas import labels as labels_lib

COUNTERS = "preprocess"


def _read_label_file(path: str, source: str, input_dir: str):
    """Every row of one label file, with its line number (a malformed file fails the job)."""
    text = storage.read_text(path, "label file")
    yield from labels_lib.iter_label_rows(text, source, input_dir, path)


@beam.ptransform_fn
def ReadLabelRows(pbegin, path: str, source: str, input_dir: str):  # noqa: N802
    """A label file read by a worker -> LabelRow per row (line numbers kept for the rejected records).

    Only the path is in the job's graph, so its size does not grow with the file. One worker parses the
    file (CSV rows may span lines, so it cannot be split at line ends); the rows are then spread over the
    workers. The launcher has checked the same file (`labels.count_label_rows`), so a malformed file stops
    the job before it starts.
    """
    return (
        pbegin
        | "Path" >> beam.Create([path])
        | "Parse" >> beam.FlatMap(_read_label_file, source, input_dir)
        | "Spread" >> beam.Reshuffle()
    )


class _CheckRowFn(beam.DoFn):
    REJECTED = "rejected"

    def process(self, row: labels_lib.LabelRow):
        try:
            yield labels_lib.check_row(row)
        except labels_lib.RowRejected as e:
            beam.metrics.Metrics.counter(COUNTERS, f"rejected_{e.reason}").inc()
            detail = f"{e.detail} (line {row.line})" if row.line else e.detail
            yield beam.pvalue.TaggedOutput(self.REJECTED, rejection(row.source, row.id, e.reason, detail))


@beam.ptransform_fn
def CheckRows(rows):  # noqa: N802 (Beam transform names are CamelCase)
    """LabelRow -> CheckedRow; hostile Ids and malformed Targets go to the `rejected` output."""
    return rows | beam.ParDo(_CheckRowFn()).with_outputs(_CheckRowFn.REJECTED, main="valid")


def _resolve_duplicates(item):
    sample_id, rows = item
    kept, rejected = labels_lib.resolve_duplicates(sorted(rows, key=lambda r: (r.source, r.labels)))
    for row, detail in rejected:
        beam.metrics.Metrics.counter(COUNTERS, f"rejected_{labels_lib.DUPLICATE_ID}").inc()
        yield beam.pvalue.TaggedOutput(
            "rejected", rejection(row.source, row.id, labels_lib.DUPLICATE_ID, detail)
        )
    if kept is not None:
        yield kept


def _key_by_id(row: labels_lib.CheckedRow):
    return row.id, row


@beam.ptransform_fn
def DropDuplicateIds(rows):  # noqa: N802
    """Keeps one row per Id (see labels.resolve_duplicates); the others go to the `rejected` output."""
    return (
        rows
        | "KeyById" >> beam.Map(_key_by_id)
        | "GroupById" >> beam.GroupByKey()
        | "Resolve" >> beam.FlatMap(_resolve_duplicates).with_outputs("rejected", main="unique")
    )

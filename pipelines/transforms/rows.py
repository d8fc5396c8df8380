"""Label rows: row-level checks and repeated Ids (CheckRows, DropDuplicateIds)."""

from __future__ import annotations

import apache_beam as beam

from pipelines.transforms.samples import rejection
from schemas import labels as labels_lib

COUNTERS = "preprocess"


class _CheckRowFn(beam.DoFn):
    REJECTED = "rejected"

    def process(self, row: labels_lib.LabelRow):
        try:
            yield labels_lib.check_row(row)
        except labels_lib.RowRejected as e:
            beam.metrics.Metrics.counter(COUNTERS, f"rejected_{e.reason}").inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, rejection(row.source, row.id, e.reason, e.detail))


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

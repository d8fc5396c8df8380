"""The fold assignment: a global step over every sample's labels and groups (AssignFolds)."""

from __future__ import annotations

from typing import Iterable, Mapping

import apache_beam as beam
import numpy as np

import schemas
from pipelines import folds as folds_lib
from pipelines.transforms.samples import Candidate


def compute_folds(
    samples: Iterable[Candidate],
    num_folds: int,
    seed: int,
    order: int,
    groups: Mapping[str, str | int] | None,
) -> dict[str, int]:
    """Id -> fold for every labeled sample (unlabeled ones have none), independent of input order.

    Args:
      samples: the candidates.
      num_folds, seed, order: as pipelines.folds.assign_folds.
      groups: Id -> group; samples of one group share a fold. Ids absent from it form a group each.
    """
    labeled = sorted((s for s in samples if s.labeled), key=lambda s: s.id)
    assignment = {}
    if labeled:
        matrix = np.zeros((len(labeled), schemas.NUM_CLASSES), dtype=np.int8)
        for i, s in enumerate(labeled):
            matrix[i, list(s.labels)] = 1
        group_ids = None
        if groups:
            names = [f"g{groups[s.id]}" if s.id in groups else f"\0{s.id}" for s in labeled]
            _, group_ids = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
        if len(labeled) < num_folds:
            raise ValueError(f"{len(labeled)} labeled samples cannot fill {num_folds} folds")
        fold_of = folds_lib.assign_folds(matrix, num_folds, seed, order=order, groups=group_ids)
        assignment = {s.id: int(f) for s, f in zip(labeled, fold_of)}
    return assignment


class _AssignFoldsFn(beam.DoFn):
    def __init__(self, num_folds, seed, order, groups):
        self._args = (num_folds, seed, order)
        self._groups = groups

    def process(self, samples, *side):
        if side and side[0] is None:  # FindDuplicates found a group too large: no folds, nothing written
            yield None
            return
        groups = side[0] if side else None
        merged = dict(self._groups or {})
        if groups:
            merged.update(groups)
        yield compute_folds(samples, *self._args, merged or None)


@beam.ptransform_fn
def AssignFolds(candidates, num_folds: int, seed: int, order: int = 2, groups=None, group_side=None):  # noqa: N802
    """All candidates at once -> a single {Id: fold} dict (use as a side input).

    Args:
      groups: a fixed {Id: group} (e.g. read from --groups_csv), or None.
      group_side: a PCollection holding one {Id: group} dict computed by the job (it wins over `groups`),
        or None when the job must not assign folds (then the output is None too).
    """
    side = [beam.pvalue.AsSingleton(group_side)] if group_side is not None else []
    return (
        candidates
        | "Collect" >> beam.combiners.ToList()
        | "Stratify" >> beam.ParDo(_AssignFoldsFn(num_folds, seed, order, groups), *side)
    )

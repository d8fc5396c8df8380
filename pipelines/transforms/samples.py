"""What flows between the job's stages: samples, shard plans, rejected rows."""

from __future__ import annotations

import dataclasses

import schemas


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A sample whose row passed the checks and whose four stain files exist.

    After inspection (`transforms.images.InspectSamples`) it also carries what the write pass needs:
    `num_bytes` becomes the planned output bytes, plus the pixel statistics, the files' checksums, the
    output size and whether the stains must be re-encoded.
    """

    source: str
    id: str
    labels: tuple[int, ...]
    labeled: bool
    paths: tuple[str, ...]  # in schemas.STAINS order
    num_bytes: int
    height: int = 0
    width: int = 0
    mean: tuple[float, ...] = ()
    sq_mean: tuple[float, ...] = ()
    checksums: tuple[int, ...] = ()
    conversions: tuple[str, ...] = ()

    @property
    def reencode(self) -> bool:
        """True when some stain is converted or resized (so written as a new PNG)."""
        return any(self.conversions)


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One output shard: which samples go into which file."""

    fold: int
    index: int
    num_shards: int
    samples: tuple[Candidate, ...]

    @property
    def name(self) -> str:
        return schemas.shard_name(self.fold, self.index, self.num_shards)


def rejection(source: str, sample_id: str, reason: str, detail: str) -> tuple[str, str, str, str]:
    """A rejected.csv row, in schemas.REJECTED_COLUMNS order."""
    return (sample_id, reason, detail, source)

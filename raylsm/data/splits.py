"""Which rows train, validate and test a run.

The dataset contract has ``train/`` and ``test/``; a manifest may also list a
``val`` split (``<dataset>/val/``). Honest model selection needs rows that are
neither trained on nor reported: when the dataset has no ``val`` split, the
latest ``data.val_fraction`` of the train split by impression time is held out
(a time cut, like the train/test split itself, so validation never sees the
future of training). The cut is computed on the driver from the ``ts`` column
only and pushed into the Parquet read as a row filter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from raylsm.config import ConfigError
from raylsm.data.contract import VAL_SPLIT, Manifest, shard_files


@dataclass(frozen=True)
class SplitSource:
    """Rows ``split/`` with ``ts`` in ``ts_range`` (None = every row)."""

    split: str
    ts_range: tuple[int | None, int | None] | None = None


@dataclass(frozen=True)
class SplitPlan:
    train: SplitSource
    val: SplitSource | None
    test: SplitSource
    val_rows: int = 0
    how: str = ""  # "manifest", "time cut at ts=...", or "none"

    def as_dict(self) -> dict:
        return {"train": self.train.__dict__, "val": self.val.__dict__ if self.val else None,
                "test": self.test.__dict__, "val_rows": self.val_rows, "how": self.how}


def _train_ts(root: str | os.PathLike) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = [pq.read_table(p, columns=["ts"], partitioning=None).column("ts").to_numpy() for p in shard_files(root, "train")]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def plan_splits(root: str | os.PathLike, manifest: Manifest, val_fraction: float) -> SplitPlan:
    """The train/validation/test sources of a run; raise ConfigError when the cut leaves a side empty."""
    test = SplitSource("test")
    if VAL_SPLIT in manifest.splits:
        if not shard_files(root, VAL_SPLIT):
            raise ConfigError(f"{os.path.join(root, VAL_SPLIT)}: the manifest declares a '{VAL_SPLIT}' split "
                              "but it holds no Parquet shards")
        return SplitPlan(SplitSource("train"), SplitSource(VAL_SPLIT), test,
                         int(manifest.splits[VAL_SPLIT].get("rows", 0)), "manifest")
    if val_fraction <= 0:
        return SplitPlan(SplitSource("train"), None, test, 0, "none")
    ts = _train_ts(root)
    cut = int(np.quantile(ts, 1.0 - val_fraction, method="higher")) if len(ts) else 0
    val_rows = int((ts >= cut).sum())
    if val_rows == 0 or val_rows == len(ts):
        raise ConfigError(
            f"data.val_fraction: a {val_fraction:g} time cut of {os.path.join(root, 'train')} leaves "
            f"{len(ts) - val_rows} training and {val_rows} validation rows; use another fraction or 0 (no validation)"
        )
    return SplitPlan(SplitSource("train", (None, cut)), SplitSource("train", (cut, None)), test, val_rows,
                     f"time cut at ts={cut}")

"""Ray Data input pipeline: Parquet shards -> vectorised collate -> torch batches.

``read_split`` returns a lazy ``ray.data.Dataset`` of collated numpy batches;
Ray Train hands each worker a streaming shard of it
(``ray.train.get_dataset_shard``), which the worker iterates with
``iter_torch_batches``. Read and collate tasks ask for a fraction of a CPU so
that a 2-CPU laptop can run a trial driver, a training worker and the data
tasks together (DESIGN §7).
"""

from __future__ import annotations

import functools
import os

from raylsm.data.collate import CollateSpec, collate_table
from raylsm.data.contract import shard_files

DATA_TASK_CPUS = 0.25


def ts_filter(ts_range: tuple[int | None, int | None] | None):
    """A Ray Data predicate for ``lo <= ts < hi`` (None when there is no bound); Arrow-native, pushed down."""
    from ray.data.expressions import col

    if ts_range is None:
        return None
    lo, hi = ts_range
    expr = None
    if lo is not None:
        expr = col("ts") >= lo
    if hi is not None:
        upper = col("ts") < hi
        expr = upper if expr is None else expr & upper
    return expr


def read_split(
    root: str | os.PathLike,
    split: str,
    spec: CollateSpec,
    batch_rows: int = 4096,
    shuffle_seed: int | None = None,
    ts_range: tuple[int | None, int | None] | None = None,
):
    """Lazy Ray dataset of collated batches for one split (any partition depth under ``root/split``).

    ``ts_range=(lo, hi)`` keeps the rows with ``lo <= ts < hi`` (either end may be None), an Arrow
    predicate Ray Data pushes into the read: how the validation split is cut from the end of train.
    """
    import ray.data

    files = [str(p) for p in shard_files(root, split)]
    if not files:
        raise ValueError(f"{os.path.join(root, split)}: no Parquet shards found for split '{split}'")
    ds = ray.data.read_parquet(
        files,
        partitioning=None,  # hive folders (day=3/) would add a string column
        shuffle="files" if shuffle_seed is not None else None,
        num_cpus=DATA_TASK_CPUS,
    )
    if ts_filter(ts_range) is not None:
        ds = ds.filter(expr=ts_filter(ts_range))
    ds = ds.select_columns(spec.columns)
    return ds.map_batches(
        functools.partial(collate_table, spec=spec),
        batch_format="pyarrow",
        batch_size=batch_rows,
        zero_copy_batch=True,
        num_cpus=DATA_TASK_CPUS,
    )

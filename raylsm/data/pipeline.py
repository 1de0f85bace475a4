"""Ray Data input pipeline: Parquet shards -> vectorised collate -> torch batches.

``read_split`` returns a lazy ``ray.data.Dataset`` of collated rows; Ray Train
hands each worker a streaming shard of it (``ray.train.get_dataset_shard``),
which the worker iterates with ``iter_torch_batches`` (``raylsm.train.loop``).

Where the work happens, and why (profiled on L=500 rows, see README "Benchmarks"):

- **Read and collate are one task per shard.** Each task streams one Parquet
  shard (``pyarrow``, one thread) in blocks of ``batch_rows`` rows and collates
  each block before it leaves the task: the raw ``list<int64>`` columns (~17 KB
  a row at L=500) never travel through the object store, only the collated
  fixed-shape block does. Tasks run in parallel, as many as the CPUs that Ray
  Data may use (``task_cpus`` each, ``concurrency`` to cap them). (Ray's own
  ``read_parquet`` packs row groups into 128 MiB read units, so a small dataset
  became one read task: no parallelism at all; it also starts a footer-reader
  actor pool, seconds before the first row.)
- **The shuffle is done where it is free.** With a seed, the shard order is a
  seeded permutation that changes every epoch (Ray's execution index), and each
  block's rows come out in a seeded random order: the permutation is folded
  into the collate's gather index, so it costs nothing. The consumer needs no
  shuffle buffer (``train.shuffle_buffer`` adds one if wanted).
- **Ids travel in the narrowest dtype their vocabulary allows** (int8 for
  ``ll_ctx``/``ll_gap``, int16 for categories, int32 for items): about a quarter
  of the bytes of int64. The training loop widens them on the device.

Without a seed nothing is permuted, and with ``DataContext.execution_options.preserve_order``
the batches equal those of the single-process reader (``iter_local_batches``) and of the
previous pipeline, row for row.
"""

from __future__ import annotations

import functools
import os
import zlib
from dataclasses import replace
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylsm.data.collate import CollateSpec, collate_table, narrow_id_dtypes
from raylsm.data.contract import read_manifest, shard_files

BLOCK_ROWS = 8192  # rows per output block
DATA_TASK_CPUS = 0.5  # <= run.DATA_CPU_RESERVE, so a layout the driver accepts can always run a data task


def block_order(n: int, seed: int, epoch: int, path: str, chunk: int) -> np.ndarray:
    """The seeded row permutation of one block: a function of (seed, epoch, file, chunk), nothing else."""
    return np.random.default_rng([seed, epoch, zlib.crc32(path.encode()), chunk]).permutation(n)


def _execution_index() -> int:
    """Which execution (epoch) of the dataset this task belongs to; Ray counts them per dataset."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


def _ts_mask(table: pa.Table, ts_range: tuple[int | None, int | None]) -> pa.Array:
    import pyarrow.compute as pc

    lo, hi = ts_range
    ts = table.column("ts")
    keep = None
    if lo is not None:
        keep = pc.greater_equal(ts, lo)
    if hi is not None:
        upper = pc.less(ts, hi)
        keep = upper if keep is None else pc.and_(keep, upper)
    return keep


def read_collate(
    path: str,
    spec: CollateSpec,
    block_rows: int,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    ts_range: tuple[int | None, int | None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream one Parquet shard as collated blocks of at most ``block_rows`` rows (in file order).

    With ``shuffle_seed`` each block's rows come out permuted (:func:`block_order`), the
    permutation folded into the collate's gather.
    """
    columns = spec.columns + (["ts"] if ts_range is not None else [])
    pf = pq.ParquetFile(path)
    chunk = 0
    for rb in pf.iter_batches(batch_size=block_rows, columns=columns, use_threads=False):
        table = pa.Table.from_batches([rb])
        if ts_range is not None:
            table = table.filter(_ts_mask(table, ts_range))
        if not table.num_rows:
            continue
        order = block_order(table.num_rows, shuffle_seed, epoch, path, chunk) if shuffle_seed is not None else None
        chunk += 1
        yield collate_table(table, spec, order)


def _read_task(items: dict[str, np.ndarray], **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map function: the shard(s) named in ``items["path"]`` -> collated blocks."""
    epoch = _execution_index()
    for path in items["path"]:
        yield from read_collate(str(path), epoch=epoch, **kwargs)


def read_split(
    root: str | os.PathLike,
    split: str,
    spec: CollateSpec,
    batch_rows: int = BLOCK_ROWS,
    shuffle_seed: int | None = None,
    ts_range: tuple[int | None, int | None] | None = None,
    *,
    task_cpus: float = DATA_TASK_CPUS,
    concurrency: int | None = None,
    narrow_ids: bool = True,
    op_reservation: bool = False,
):
    """Lazy Ray dataset of collated rows for one split (any partition depth under ``root/split``).

    One read task per shard (read + collate fused), as many at once as the CPUs Ray Data may use
    allow (``task_cpus`` each; ``concurrency`` caps them). ``batch_rows``: rows per output block
    (a shard streams in pieces of this size; the in-block shuffle mixes this many rows).
    ``shuffle_seed``: seeded shard order and in-block row order, both reseeded every epoch; None =
    shard order, rows as stored. ``ts_range=(lo, hi)`` keeps the rows with ``lo <= ts < hi`` (either
    end may be None): how the validation split is cut from the end of train. ``narrow_ids``: ids in
    the narrowest dtype the manifest's vocabulary allows. ``op_reservation``: Ray Data's per-operator
    resource reservation for this dataset (``data.op_reservation``; off: with one operator it only
    holds back the second and later read tasks while its budget ramps up, each execution).
    """
    import ray.data
    from ray.data import RandomSeedConfig

    if task_cpus <= 0:
        raise ValueError(f"data.task_cpus: must be > 0, got {task_cpus}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"data.read_concurrency: must be >= 1, got {concurrency}")
    if batch_rows < 1:
        raise ValueError(f"data.block_rows: must be >= 1, got {batch_rows}")
    files = [str(p) for p in shard_files(root, split)]
    if not files:
        raise ValueError(f"{os.path.join(root, split)}: no Parquet shards found for split '{split}'")
    if narrow_ids and not spec.id_dtypes:
        spec = replace(spec, id_dtypes=narrow_id_dtypes(read_manifest(root).vocab))
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    ds = ds.map_batches(
        functools.partial(_read_task, spec=spec, block_rows=batch_rows, shuffle_seed=shuffle_seed, ts_range=ts_range),
        batch_format="numpy",
        batch_size=None,
        num_cpus=task_cpus,
        compute=ray.data.TaskPoolStrategy(size=concurrency),  # size None: no cap
    )
    # This dataset's own context (from_items copied the driver's). Without the reservation Ray itself bounds
    # the tasks by the cluster's free CPUs, and Ray Data's downstream-capacity backpressure the blocks that
    # wait for the consumer (a slow consumer: the same object-store peak as with it, README).
    ds.context.op_resource_reservation_enabled = op_reservation
    return ds

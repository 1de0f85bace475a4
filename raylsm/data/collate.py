"""Vectorised collate: contract-v1 rows -> fixed-shape numpy arrays.

One function, :func:`collate_table`, serves both paths: Ray Data's
``map_batches(batch_format="pyarrow")`` and the in-process reader
(:func:`iter_local_batches`) used by tests and benchmarks.

Each sequence keeps its most recent ``L`` behaviours (the lists are stored
oldest first, so the *tail*), left-padded with 0 so the newest behaviour sits in
the last column. Work is done on the Arrow offsets and flat values with numpy
fancy indexing; there is no Python loop over rows.

Collated batch (B rows, S = short-term length, L = lifelong length, P = profile fields):

=================================  =========  =========
key                                dtype      shape
=================================  =========  =========
user_id, item_id, item_cate         int64      (B,)
label                               float32    (B,)
profile                             int64      (B, P)
st_tgt_items, st_tgt_cates          int64      (B, S)
st_tgt_mask                         bool       (B, S)
st_src_items, st_src_cates          int64      (B, S)
st_src_mask                         bool       (B, S)
ll_items, ll_cates, ll_ctx, ll_gap  int64      (B, L)
ll_mask                             bool       (B, L)
=================================  =========  =========
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylsm.data.contract import PROFILE_PREFIX, SEQUENCE_GROUPS, shard_files


@dataclass(frozen=True)
class CollateSpec:
    """What the collate keeps: sequence lengths and the profile fields, in order."""

    st_len: int
    ll_len: int
    profile_fields: tuple[str, ...]

    @property
    def columns(self) -> list[str]:
        """The Parquet columns the collate reads."""
        cols = ["user_id", "item_id", "item_cate", "label"]
        cols += [PROFILE_PREFIX + f for f in self.profile_fields]
        for group in SEQUENCE_GROUPS.values():
            cols += list(group)
        return cols


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (B+1,) and flat values of a list<int64> column, as numpy, zero-copy where possible."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if col.offset != 0 or pa.types.is_large_list(col.type):
        col = pa.concat_arrays([col.cast(pa.list_(pa.int64()))])  # normalise slice/large offsets
    offsets = col.offsets.to_numpy().astype(np.int64, copy=False)
    values = col.values.to_numpy(zero_copy_only=False)
    return offsets, values


def tail_pad(offsets: np.ndarray, values: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last ``length`` items of each list, left-padded with 0.

    Returns ``(padded (B, length) int64, mask (B, length) bool)``.
    """
    b = len(offsets) - 1
    out = np.zeros((b, length), dtype=np.int64)
    if b == 0 or length == 0:
        return out, np.zeros((b, length), dtype=bool)
    starts, ends = offsets[:-1], offsets[1:]
    n = np.minimum(ends - starts, length)  # (B,) items kept per row
    # Column j of row i holds element ends[i] - length + j when that index is >= ends[i] - n[i].
    col = np.arange(length, dtype=np.int64)
    mask = col[None, :] >= (length - n)[:, None]  # (B, L)
    src = ends[:, None] - length + col[None, :]  # (B, L) index into values
    out[mask] = values[src[mask]]
    return out, mask


def _group_arrays(table: pa.Table, cols: tuple[str, ...], length: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    mask = None
    for c in cols:
        offsets, values = _list_parts(table.column(c))
        out[c], mask = tail_pad(offsets, values, length)
    prefix = cols[0].rsplit("_", 1)[0]  # st_tgt_items -> st_tgt
    out[f"{prefix}_mask"] = mask
    return out


def collate_table(table: pa.Table, spec: CollateSpec) -> dict[str, np.ndarray]:
    """Collate one Arrow table of contract rows into the fixed-shape batch described above."""
    b = table.num_rows

    def scalar(name: str) -> np.ndarray:
        return np.array(table.column(name).to_numpy(), dtype=np.int64)  # a writable copy (B,)

    batch: dict[str, np.ndarray] = {
        "user_id": scalar("user_id"),
        "item_id": scalar("item_id"),
        "item_cate": scalar("item_cate"),
        "label": table.column("label").to_numpy().astype(np.float32),
    }
    if spec.profile_fields:
        batch["profile"] = np.stack([scalar(PROFILE_PREFIX + f) for f in spec.profile_fields], axis=1)
    else:
        batch["profile"] = np.zeros((b, 0), dtype=np.int64)
    lengths = {"st_tgt": spec.st_len, "st_src": spec.st_len, "ll": spec.ll_len}
    for group, cols in SEQUENCE_GROUPS.items():
        batch.update(_group_arrays(table, cols, lengths[group]))
    return batch


class ArrowCollate:
    """Callable for ``Dataset.map_batches(..., batch_format="pyarrow")``."""

    def __init__(self, spec: CollateSpec):
        self.spec = spec

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        return collate_table(table, self.spec)


def iter_local_batches(
    root: str | os.PathLike,
    split: str,
    spec: CollateSpec,
    batch_size: int,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """In-process reader (no Ray): stream a split's shards and yield collated batches.

    With ``shuffle_seed`` the shard order and the rows inside each shard are
    permuted (a local shuffle, bounded by one shard's memory).
    """
    files = shard_files(root, split)
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        files = [files[i] for i in rng.permutation(len(files))]
    carry: pa.Table | None = None
    for path in files:
        table = pq.read_table(path, columns=spec.columns, partitioning=None)
        if rng is not None:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        if carry is not None and carry.num_rows:
            table = pa.concat_tables([carry, table])
        full = (table.num_rows // batch_size) * batch_size
        for start in range(0, full, batch_size):
            yield collate_table(table.slice(start, batch_size), spec)
        carry = table.slice(full)
    if carry is not None and carry.num_rows:
        yield collate_table(carry, spec)

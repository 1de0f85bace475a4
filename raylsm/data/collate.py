"""Vectorised collate: contract-v1 rows -> fixed-shape numpy arrays.

One function, :func:`collate_table`, serves both paths: Ray Data's
``map_batches(batch_format="pyarrow")`` and the in-process reader
(:func:`iter_local_batches`) used by tests and benchmarks.

Each sequence keeps its most recent ``L`` behaviours (the lists are stored
oldest first, so the *tail*), left-padded with 0 so the newest behaviour sits in
the last column. Work is done on the Arrow offsets and flat values with numpy
fancy indexing; there is no Python loop over rows. The columns of one sequence
group share their offsets (contract: same lengths), so the gather index is
computed once per group and reused for every column of it.

Collated batch (B rows, S = short-term length, L = lifelong length, P = profile fields):

=================================  =========  =========
key                                dtype      shape
=================================  =========  =========
user_id, item_id, item_cate         int64 *    (B,)
label                               float32    (B,)
profile                             int64 *    (B, P)
st_tgt_items, st_tgt_cates          int64 *    (B, S)
st_tgt_mask                         bool       (B, S)
st_src_items, st_src_cates          int64 *    (B, S)
st_src_mask                         bool       (B, S)
ll_items, ll_cates, ll_ctx, ll_gap  int64 *    (B, L)
ll_mask                             bool       (B, L)
=================================  =========  =========

\\* int64 unless the spec names narrower id dtypes (:func:`narrow_id_dtypes`: the
narrowest signed integer that holds the id space's vocabulary, e.g. int8 for
``ll_ctx``): a quarter of the bytes to move for an L=500 row. Consumers widen
ids to int64 on the device (``raylsm.train.loop.to_device``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylsm.data.contract import ID_RANGES, PROFILE_PREFIX, SEQUENCE_GROUPS, shard_files

ID_KEYS = tuple(ID_RANGES) + ("profile",)  # the collated keys that hold ids


@dataclass(frozen=True)
class CollateSpec:
    """What the collate keeps: sequence lengths, the profile fields in order, and the id dtypes.

    ``id_dtypes``: ``(key, numpy dtype name)`` pairs for collated id keys; a key not named is int64.
    """

    st_len: int
    ll_len: int
    profile_fields: tuple[str, ...]
    id_dtypes: tuple[tuple[str, str], ...] = ()

    @property
    def columns(self) -> list[str]:
        """The Parquet columns the collate reads."""
        cols = ["user_id", "item_id", "item_cate", "label"]
        cols += [PROFILE_PREFIX + f for f in self.profile_fields]
        for group in SEQUENCE_GROUPS.values():
            cols += list(group)
        return cols

    def dtype(self, key: str) -> np.dtype:
        """The collated dtype of id key ``key``."""
        return np.dtype(dict(self.id_dtypes).get(key, "int64"))


def collate_spec(data, profile_fields, id_dtypes: tuple[tuple[str, str], ...] = ()) -> CollateSpec:
    """The collate of a job's data block (a ``DataConfig`` or its dict: ``st_len``, ``ll_len``) over a dataset's
    profile fields (a manifest, or the field names in order)."""
    st_len, ll_len = (data["st_len"], data["ll_len"]) if isinstance(data, Mapping) else (data.st_len, data.ll_len)
    fields = getattr(profile_fields, "profile_fields", profile_fields)
    return CollateSpec(int(st_len), int(ll_len), tuple(fields), tuple(id_dtypes))


def narrowest_int(vocab_size: int) -> np.dtype:
    """The narrowest signed integer dtype that holds every id below ``vocab_size``."""
    for dt in (np.int8, np.int16, np.int32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def narrow_id_dtypes(vocab: Mapping) -> tuple[tuple[str, str], ...]:
    """``CollateSpec.id_dtypes`` from a manifest's ``vocab`` (``{"item": 60001, ..., "profile": {...}}``)."""
    pairs = [(key, narrowest_int(int(vocab[space])).name) for key, (space, _) in ID_RANGES.items()]
    profile = vocab.get("profile") or {}
    widest = max((int(v) for v in profile.values()), default=1)
    pairs.append(("profile", narrowest_int(widest).name))
    return tuple(pairs)


def list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (B+1,) and flat values of a list<int64> column, as numpy, zero-copy where possible."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if col.offset != 0 or pa.types.is_large_list(col.type):
        col = pa.concat_arrays([col.cast(pa.list_(pa.int64()))])  # normalise slice/large offsets
    offsets = col.offsets.to_numpy().astype(np.int64, copy=False)
    values = col.values.to_numpy(zero_copy_only=False)
    return offsets, values


def tail_index(offsets: np.ndarray, length: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gather index of the last ``length`` items of each list, and the mask of real items.

    Returns ``(idx (B, length) int64, mask (B, length) bool)``: ``idx`` indexes the flat values
    *shifted by one* (0 = padding, see :func:`gather_padded`). ``order`` permutes the rows (output
    row i is input row ``order[i]``) at no extra cost.
    """
    starts, ends = offsets[:-1], offsets[1:]
    if order is not None:
        starts, ends = starts[order], ends[order]
    n = np.minimum(ends - starts, length)  # (B,) items kept per row
    # Column j of row i holds element ends[i] - length + j when j >= length - n[i].
    col = np.arange(length, dtype=np.int64)
    mask = col[None, :] >= (length - n)[:, None]  # (B, L)
    idx = ends[:, None] + (col[None, :] + (1 - length))  # (B, L), +1: slot 0 of the shifted values is padding
    idx *= mask
    return idx, mask


def gather_padded(values: np.ndarray, idx: np.ndarray, dtype: np.dtype, name: str = "") -> np.ndarray:
    """``values`` gathered at a :func:`tail_index` index, as ``dtype`` (0 where padded).

    Narrowing is checked: an id that ``dtype`` cannot hold raises instead of wrapping.
    """
    if dtype != values.dtype and values.size:
        info = np.iinfo(dtype)
        lo, hi = values.min(), values.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"column {name}: id {hi if hi > info.max else lo} does not fit {dtype.name} (vocabulary too small?)")
    shifted = np.empty(len(values) + 1, dtype=dtype)
    shifted[0] = 0
    shifted[1:] = values
    return shifted.take(idx)


def tail_pad(offsets: np.ndarray, values: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last ``length`` items of each list, left-padded with 0.

    Returns ``(padded (B, length) int64, mask (B, length) bool)``.
    """
    idx, mask = tail_index(offsets, length)
    return gather_padded(values, idx, np.dtype(np.int64)), mask


def _group_arrays(table: pa.Table, cols: tuple[str, ...], length: int, spec: CollateSpec,
                  order: np.ndarray | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    shared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (offsets, idx, mask)
    for c in cols:
        offsets, values = list_parts(table.column(c))
        if shared is None or not np.array_equal(offsets, shared[0]):
            shared = (offsets, *tail_index(offsets, length, order))
        out[c] = gather_padded(values, shared[1], spec.dtype(c), c)
    prefix = cols[0].rsplit("_", 1)[0]  # st_tgt_items -> st_tgt
    out[f"{prefix}_mask"] = shared[2] if shared is not None else np.zeros((table.num_rows, length), bool)
    return out


def collate_table(table: pa.Table, spec: CollateSpec, order: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Collate one Arrow table of contract rows into the fixed-shape batch described above.

    ``order``: a permutation of the rows to emit them in (a shuffle folded into the gather).
    """
    b = table.num_rows

    def scalar(name: str, key: str) -> np.ndarray:
        values = table.column(name).to_numpy()
        if order is not None:
            values = values[order]
        dtype = spec.dtype(key)
        if dtype != values.dtype and values.size:
            info = np.iinfo(dtype)
            if values.min() < info.min or values.max() > info.max:
                raise ValueError(f"column {name}: an id does not fit {dtype.name} (vocabulary too small?)")
        return np.array(values, dtype=dtype)  # a writable copy (B,)

    batch: dict[str, np.ndarray] = {
        "user_id": scalar("user_id", "user_id"),
        "item_id": scalar("item_id", "item_id"),
        "item_cate": scalar("item_cate", "item_cate"),
    }
    label = table.column("label").to_numpy()
    batch["label"] = (label[order] if order is not None else label).astype(np.float32)
    if spec.profile_fields:
        batch["profile"] = np.stack([scalar(PROFILE_PREFIX + f, "profile") for f in spec.profile_fields], axis=1)
    else:
        batch["profile"] = np.zeros((b, 0), dtype=spec.dtype("profile"))
    lengths = {"st_tgt": spec.st_len, "st_src": spec.st_len, "ll": spec.ll_len}
    for group, cols in SEQUENCE_GROUPS.items():
        batch.update(_group_arrays(table, cols, lengths[group], spec, order))
    return batch
class ArrowCollate:
    """Callable for ``Dataset.map_batches(..., batch_format="pyarrow")``."""

    def __init__(self, spec: CollateSpec):
        self.spec = spec

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        return collate_table(table, self.spec)


def _ts_filters(ts_range: tuple[int | None, int | None] | None) -> list[tuple] | None:
    """``lo <= ts < hi`` as a pyarrow row filter (None when there is no bound)."""
    if ts_range is None:
        return None
    lo, hi = ts_range
    out = ([("ts", ">=", int(lo))] if lo is not None else []) + ([("ts", "<", int(hi))] if hi is not None else [])
    return out or None


def iter_local_batches(
    root: str | os.PathLike,
    split: str,
    spec: CollateSpec,
    batch_size: int,
    shuffle_seed: int | None = None,
    ts_range: tuple[int | None, int | None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """In-process reader (no Ray): stream a split's shards and yield collated batches.

    With ``shuffle_seed`` the shard order and the rows inside each shard are
    permuted (a local shuffle, bounded by one shard's memory). ``ts_range = (lo, hi)``
    keeps the rows with ``lo <= ts < hi`` (None = unbounded), the validation time cut
    of :func:`raylsm.data.splits.plan_splits`, pushed into the Parquet read.
    """
    filters = _ts_filters(ts_range)
    files = shard_files(root, split)
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        files = [files[i] for i in rng.permutation(len(files))]
    carry: pa.Table | None = None
    for path in files:
        table = pq.read_table(path, columns=spec.columns, partitioning=None, filters=filters)
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

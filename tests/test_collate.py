"""Collate: truncation to the most recent L, left padding, masks, empty lists; local and Ray paths agree."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylsm.data.collate import CollateSpec, collate_table, iter_local_batches, tail_pad
from raylsm.data.contract import arrow_schema


def _table(rows: list[dict]) -> pa.Table:
    cols = {name: [r[name] for r in rows] for name in arrow_schema(["age"]).names}
    return pa.Table.from_pydict(cols, schema=arrow_schema(["age"]))


def _row(uid: int, ll: list[int], st_tgt: list[int], st_src: list[int], label: int = 1) -> dict:
    return {
        "user_id": uid, "item_id": 7, "item_cate": 3, "label": label, "ts": 100 + uid, "profile_age": uid % 3,
        "st_tgt_items": st_tgt, "st_tgt_cates": [x + 100 for x in st_tgt],
        "st_src_items": st_src, "st_src_cates": [x + 200 for x in st_src],
        "ll_items": ll, "ll_cates": [x + 300 for x in ll], "ll_ctx": [x % 5 for x in ll], "ll_gap": [x % 7 for x in ll],
    }


def test_tail_pad_hand_computed():
    offsets = np.array([0, 5, 5, 7])  # lengths 5, 0, 2
    values = np.array([1, 2, 3, 4, 5, 8, 9])
    padded, mask = tail_pad(offsets, values, 3)
    np.testing.assert_array_equal(padded, [[3, 4, 5], [0, 0, 0], [0, 8, 9]])
    np.testing.assert_array_equal(mask, [[True] * 3, [False] * 3, [False, True, True]])


def test_collate_table_hand_computed():
    table = _table([
        _row(1, ll=[11, 12, 13, 14, 15], st_tgt=[1, 2, 3], st_src=[]),
        _row(2, ll=[], st_tgt=[4], st_src=[5, 6], label=0),
        _row(3, ll=[21, 22], st_tgt=[], st_src=[7, 8, 9, 10]),
    ])
    spec = CollateSpec(st_len=2, ll_len=4, profile_fields=("age",))
    b = collate_table(table, spec)
    np.testing.assert_array_equal(b["user_id"], [1, 2, 3])
    np.testing.assert_array_equal(b["label"], np.array([1, 0, 1], np.float32))
    assert b["label"].dtype == np.float32 and b["ll_items"].dtype == np.int64
    np.testing.assert_array_equal(b["profile"], [[1], [2], [0]])
    # Most recent L kept, left-padded with 0.
    np.testing.assert_array_equal(b["ll_items"], [[12, 13, 14, 15], [0, 0, 0, 0], [0, 0, 21, 22]])
    np.testing.assert_array_equal(b["ll_cates"], [[312, 313, 314, 315], [0, 0, 0, 0], [0, 0, 321, 322]])
    np.testing.assert_array_equal(b["ll_ctx"], [[2, 3, 4, 0], [0, 0, 0, 0], [0, 0, 1, 2]])
    np.testing.assert_array_equal(b["ll_mask"], [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(b["st_tgt_items"], [[2, 3], [0, 4], [0, 0]])
    np.testing.assert_array_equal(b["st_src_cates"], [[0, 0], [205, 206], [209, 210]])
    np.testing.assert_array_equal(b["st_src_mask"], [[0, 0], [1, 1], [1, 1]])
    # A sliced table (non-zero offset into the list arrays) collates the same.
    sliced = collate_table(table.slice(1, 2), spec)
    np.testing.assert_array_equal(sliced["ll_items"], b["ll_items"][1:])


def test_local_iterator_covers_every_row_once(tmp_path):
    rows = [_row(i, ll=list(range(1, i + 2)), st_tgt=[i], st_src=[i]) for i in range(1, 24)]
    (tmp_path / "train" / "day=1").mkdir(parents=True)
    pq.write_table(_table(rows[:10]), tmp_path / "train" / "day=1" / "part-0.parquet")
    pq.write_table(_table(rows[10:]), tmp_path / "train" / "part-1.parquet")
    spec = CollateSpec(st_len=1, ll_len=3, profile_fields=("age",))
    batches = list(iter_local_batches(tmp_path, "train", spec, batch_size=4, shuffle_seed=3))
    assert [len(x["user_id"]) for x in batches] == [4] * 5 + [3]
    users = np.concatenate([x["user_id"] for x in batches])
    assert sorted(users.tolist()) == list(range(1, 24))
    last = np.concatenate([x["ll_items"][:, -1] for x in batches])
    np.testing.assert_array_equal(last, users + 1)  # newest behaviour in the last column


@pytest.mark.ray
def test_ray_pipeline_equals_local(ray_local, tmp_path):
    from raylsm.data.pipeline import read_split

    rows = [_row(i, ll=list(range(1, i % 7 + 1)), st_tgt=[i], st_src=[]) for i in range(1, 40)]
    (tmp_path / "train" / "day=2").mkdir(parents=True)
    pq.write_table(_table(rows[:20]), tmp_path / "train" / "day=2" / "a.parquet")
    pq.write_table(_table(rows[20:]), tmp_path / "train" / "b.parquet")
    spec = CollateSpec(st_len=2, ll_len=5, profile_fields=("age",))
    ds = read_split(tmp_path, "train", spec, batch_rows=8, narrow_ids=False)  # no manifest here: int64 ids
    got = {k: [] for k in ("user_id", "ll_items", "ll_mask")}
    for batch in ds.iter_torch_batches(batch_size=16):
        for k in got:
            got[k].append(batch[k].numpy())
    got = {k: np.concatenate(v) for k, v in got.items()}
    order = np.argsort(got["user_id"])
    local = collate_table(pa.concat_tables([_table(rows[:20]), _table(rows[20:])]), spec)
    np.testing.assert_array_equal(got["user_id"][order], local["user_id"])
    np.testing.assert_array_equal(got["ll_items"][order], local["ll_items"])
    np.testing.assert_array_equal(got["ll_mask"][order], local["ll_mask"])

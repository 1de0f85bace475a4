"""Input pipeline: narrow id dtypes, in-task shuffle, and the Ray Data path against the single-process reader.

The Ray tests compare batch by batch (same rows, same order, same values) with the
single-process reader and with the previous pipeline's composition (Ray's Parquet reader,
then the collate in 4096-row batches), with the shuffle off and Ray's order preserved.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylsm.data.collate import CollateSpec, collate_table, iter_local_batches, narrow_id_dtypes, narrowest_int
from raylsm.data.contract import arrow_schema

VOCAB = {"item": 40_000, "cate": 300, "ctx": 5, "gap": 64, "user": 120, "profile": {"age": 7}}


def _rows(n: int, seed: int, ts0: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ll = rng.integers(1, VOCAB["item"], rng.integers(0, 30)).tolist()
        st = rng.integers(1, VOCAB["item"], rng.integers(0, 6)).tolist()
        rows.append({
            "user_id": int(rng.integers(1, VOCAB["user"])), "item_id": int(rng.integers(1, VOCAB["item"])),
            "item_cate": int(rng.integers(1, VOCAB["cate"])), "label": int(rng.integers(0, 2)), "ts": ts0 + i,
            "profile_age": int(rng.integers(0, 7)),
            "st_tgt_items": st, "st_tgt_cates": [x % 299 + 1 for x in st],
            "st_src_items": st[::-1], "st_src_cates": [x % 299 + 1 for x in st[::-1]],
            "ll_items": ll, "ll_cates": [x % 299 + 1 for x in ll], "ll_ctx": [x % 5 for x in ll], "ll_gap": [x % 64 for x in ll],
        })
    return rows


def _table(rows: list[dict]) -> pa.Table:
    schema = arrow_schema(["age"])
    return pa.Table.from_pydict({name: [r[name] for r in rows] for name in schema.names}, schema=schema)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three train shards of 37, 50 and 23 rows (batch boundaries fall inside shards), one in a hive folder."""
    root = tmp_path_factory.mktemp("pipe")
    (root / "train" / "day=1").mkdir(parents=True)
    sizes, start = (37, 50, 23), 0
    for i, n in enumerate(sizes):
        path = root / "train" / ("day=1" if i == 1 else "") / f"part-{i}.parquet"
        pq.write_table(_table(_rows(n, seed=i, ts0=start)), path)
        start += n
    (root / "manifest.json").write_text(json.dumps({
        "format": "raylsm-dataset/1", "name": "pipe", "vocab": VOCAB, "max_len": {"st": 6, "ll": 30},
        "domains": "cross", "splits": {"train": {"rows": sum(sizes)}, "test": {"rows": 0}}, "source": {},
    }))
    return root


SPEC = CollateSpec(st_len=4, ll_len=12, profile_fields=("age",))


def test_narrowest_dtypes_from_vocabulary():
    assert [narrowest_int(v).name for v in (2, 128, 129, 32768, 32769, 2**31, 2**31 + 1)] == [
        "int8", "int8", "int16", "int16", "int32", "int32", "int64"]
    dtypes = dict(narrow_id_dtypes(VOCAB))
    assert dtypes["ll_items"] == "int32" and dtypes["ll_cates"] == "int16" and dtypes["item_id"] == "int32"
    assert dtypes["ll_ctx"] == "int8" and dtypes["ll_gap"] == "int8" and dtypes["user_id"] == "int8"
    assert dtypes["profile"] == "int8"


def test_narrow_collate_equals_int64_and_refuses_to_wrap():
    table = _table(_rows(40, seed=5))
    wide = collate_table(table, SPEC)
    narrow = collate_table(table, CollateSpec(4, 12, ("age",), narrow_id_dtypes(VOCAB)))
    assert narrow["ll_ctx"].dtype == np.int8 and narrow["ll_items"].dtype == np.int32
    assert narrow["ll_mask"].dtype == np.bool_ and narrow["label"].dtype == np.float32
    for k in wide:
        np.testing.assert_array_equal(narrow[k].astype(wide[k].dtype), wide[k], err_msg=k)
    # An id outside the dtype (vocabulary understated) is an error naming the column, never a wrapped id.
    too_small = dict(VOCAB, item=100)
    with pytest.raises(ValueError, match="st_tgt_items|item_id"):
        collate_table(table, CollateSpec(4, 12, ("age",), narrow_id_dtypes(too_small)))


def test_order_permutes_rows_like_take():
    table = _table(_rows(33, seed=9))
    order = np.random.default_rng(0).permutation(33)
    permuted = collate_table(table, SPEC, order)
    reference = collate_table(table.take(pa.array(order)), SPEC)
    for k in reference:
        np.testing.assert_array_equal(permuted[k], reference[k], err_msg=k)


def test_to_device_widens_ids_only():
    from raylsm.train.step import to_device

    batch = {"ll_items": torch.tensor([[1, 2]], dtype=torch.int32), "ll_ctx": torch.tensor([[0, 3]], dtype=torch.int8),
             "ll_mask": torch.tensor([[False, True]]), "label": torch.tensor([1.0])}
    out = to_device(batch, torch.device("cpu"))
    assert out["ll_items"].dtype == torch.int64 and out["ll_ctx"].dtype == torch.int64
    assert out["ll_mask"].dtype == torch.bool and out["label"].dtype == torch.float32
    assert out["ll_ctx"].tolist() == [[0, 3]]


# ----------------------------------------------------------------------------- Ray Data


@pytest.fixture
def preserve_order(ray_local):
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    yield
    options.preserve_order = before


def _ray_batches(ds, batch_size: int) -> list[dict[str, np.ndarray]]:
    from raylsm.train.batches import torch_batches
    from raylsm.train.step import to_device

    cpu = torch.device("cpu")
    return [{k: v.numpy() for k, v in to_device(b, cpu).items()} for b in torch_batches(ds.iterator(), batch_size, cpu)]


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [len(b["label"]) for b in got] == [len(b["label"]) for b in want]
    for i, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w)
        for k in w:
            assert g[k].dtype == w[k].dtype, (i, k)
            np.testing.assert_array_equal(g[k], w[k], err_msg=f"batch {i}, {k}")


@pytest.mark.ray
def test_unshuffled_batches_equal_single_process_reader_and_previous_pipeline(dataset, preserve_order):
    import ray.data

    from raylsm.data.contract import shard_files
    from raylsm.data.pipeline import read_split

    local = list(iter_local_batches(dataset, "train", SPEC, batch_size=16))
    # block_rows=20 cuts shards into several blocks; batches of 16 span blocks and shards.
    new = _ray_batches(read_split(dataset, "train", SPEC, 20), 16)
    _assert_same_batches(new, local)
    # The previous pipeline: Ray's Parquet reader, then the collate in 4096-row batches.
    files = [str(p) for p in shard_files(dataset, "train")]
    previous = ray.data.read_parquet(files, partitioning=None).select_columns(SPEC.columns).map_batches(
        functools.partial(collate_table, spec=SPEC), batch_format="pyarrow", batch_size=4096, zero_copy_batch=True)
    _assert_same_batches(new, _ray_batches(previous, 16))


@pytest.mark.ray
def test_first_batch_fetched_ahead_leaves_the_batches_as_they_are(dataset, preserve_order):
    """The worker starts its first epoch's stream before building the model (start-up): same batches, same order."""
    from raylsm.data.pipeline import read_split
    from raylsm.train.batches import FirstFetched, torch_batches
    from raylsm.train.step import to_device

    cpu = torch.device("cpu")
    ds = read_split(dataset, "train", SPEC, 20)
    ahead = FirstFetched(torch_batches(ds.iterator(), 16, cpu))
    _assert_same_batches([{k: v.numpy() for k, v in to_device(b, cpu).items()} for b in ahead],
                         list(iter_local_batches(dataset, "train", SPEC, batch_size=16)))
    assert list(FirstFetched(iter([]))) == []

    def broken():
        raise OSError("shard gone")
        yield  # a generator

    with pytest.raises(OSError, match="shard gone"):  # raised where the batches are consumed
        list(FirstFetched(broken()))


@pytest.mark.ray
def test_seeded_shuffle_covers_every_row_once_per_epoch_and_is_reproducible(dataset, preserve_order):
    from raylsm.data.pipeline import read_split

    def epoch_rows(ds) -> np.ndarray:
        batches = _ray_batches(ds, 16)
        return np.concatenate([b["item_id"] * 1000 + b["user_id"] for b in batches])  # a row's identity

    stored = np.concatenate([b["item_id"] * 1000 + b["user_id"] for b in iter_local_batches(dataset, "train", SPEC, 16)])
    ds = read_split(dataset, "train", SPEC, 20, shuffle_seed=7)
    first, second = epoch_rows(ds), epoch_rows(ds)  # two executions = two epochs
    for rows in (first, second):
        assert sorted(rows.tolist()) == sorted(stored.tolist())  # every row exactly once
        assert not np.array_equal(rows, stored)  # shuffled
    assert not np.array_equal(first, second)  # reseeded every epoch
    again = read_split(dataset, "train", SPEC, 20, shuffle_seed=7)
    np.testing.assert_array_equal(epoch_rows(again), first)  # same seed, same epoch: same order
    assert not np.array_equal(epoch_rows(read_split(dataset, "train", SPEC, 20, shuffle_seed=8)), first)


@pytest.mark.ray
def test_ts_range_keeps_exactly_the_rows_in_range(dataset, preserve_order):
    from raylsm.data.pipeline import read_split

    got = _ray_batches(read_split(dataset, "train", SPEC, ts_range=(30, 90)), 1000)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(dataset.glob("train/**/*.parquet"), key=str)])
    ts = table.column("ts").to_numpy()
    want = collate_table(table.filter(pa.array((ts >= 30) & (ts < 90))), SPEC)
    assert len(got) == 1 and len(got[0]["label"]) == 60
    order = np.argsort(got[0]["item_id"] * 1000 + got[0]["user_id"], kind="stable")
    ref = np.argsort(want["item_id"] * 1000 + want["user_id"], kind="stable")
    for k in want:
        np.testing.assert_array_equal(got[0][k][order], want[k][ref], err_msg=k)


def test_bad_pipeline_options_name_the_option(dataset):
    from raylsm.data.pipeline import read_split

    with pytest.raises(ValueError, match="data.task_cpus"):
        read_split(dataset, "train", SPEC, task_cpus=0)
    with pytest.raises(ValueError, match="data.read_concurrency"):
        read_split(dataset, "train", SPEC, concurrency=0)

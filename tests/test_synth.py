"""Synthetic generator: contract validity, determinism, temporal consistency, and the planted effects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylsm.data.check import validate_dataset
from raylsm.data.contract import ContractError, shard_files
from raylsm.data.synth import SynthConfig, build_world, generate, generate_config
from raylsm.data.synth_world import counts_before, source_timeline

SMALL = dict(users=300, rows=4000, ll_len=200, st_len=20, shards=2)


def _read(root: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in shard_files(root, split)])


def _padded(col: pa.ChunkedArray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, length) right-aligned values and mask of a list column (most recent last)."""
    arr = col.combine_chunks()
    off, val = arr.offsets.to_numpy(), arr.values.to_numpy()
    n = np.diff(off)
    mask = np.arange(length)[None, :] >= (length - np.minimum(n, length))[:, None]
    out = np.zeros(mask.shape, np.int64)
    idx = off[1:, None] - length + np.arange(length)[None, :]
    out[mask] = val[idx[mask]]
    return out, mask


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC with tied scores averaged (Mann-Whitney U)."""
    order = np.argsort(score, kind="mergesort")
    _, inv, cnt = np.unique(score[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(score))
    ranks[order] = (np.cumsum(cnt) - (cnt - 1) / 2)[inv]
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@pytest.fixture(scope="module")
def cross(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cross")
    return out, generate(out, seed=0, progress=False, **SMALL)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single")
    return out, generate(out, domains="single", seed=1, progress=False, **SMALL)


@pytest.fixture(scope="module")
def effects(tmp_path_factory) -> tuple[pa.Table, object]:
    """A larger cross-domain dataset (8k rows, ll_len 300): its train split and its hidden world."""
    out = tmp_path_factory.mktemp("effects")
    params = dict(users=1000, rows=8000, ll_len=300, st_len=50, shards=1, seed=0)
    generate(out, progress=False, **params)
    return _read(out, "train"), build_world(SynthConfig(cache_elems=0, **params))


# ----------------------------------------------------------------------------- contract


def test_output_validates_and_manifest_is_exact(cross):
    out, summary = cross
    manifest = validate_dataset(out)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "raylsm-dataset/1"
    assert manifest.name == "synthetic-cross-domain" and manifest.domains == "cross"
    assert manifest.max_len == {"st": 20, "ll": 200}
    assert manifest.splits == {"train": {"rows": 3500}, "test": {"rows": 500}}
    assert summary["rows"] == 4000 and summary["splits"] == manifest.splits
    assert summary["train_rows"] == 3500 and summary["test_rows"] == 500
    assert [Path(f).relative_to(out).as_posix() for f in summary["files"]] == [
        "train/part-00000.parquet", "train/part-00001.parquet", "test/part-00000.parquet", "test/part-00001.parquet"]
    assert manifest.source["generator"] == "raylsm.data.synth" and manifest.source["seed"] == 0
    assert {k: manifest.source["params"][k] for k in SMALL} == SMALL
    assert manifest.source["params"]["domains"] == "cross"

    # vocab = max id + 1 exactly, over both splits
    table = pa.concat_tables([_read(out, "train"), _read(out, "test")])

    def top(*cols: str) -> int:
        vals = [table[c].combine_chunks() for c in cols]
        return max(int(np.max(v.values.to_numpy() if pa.types.is_list(v.type) else v.to_numpy())) for v in vals)

    assert manifest.vocab == {
        "item": top("item_id", "st_tgt_items", "st_src_items", "ll_items") + 1,
        "cate": top("item_cate", "st_tgt_cates", "st_src_cates", "ll_cates") + 1,
        "ctx": top("ll_ctx") + 1, "gap": top("ll_gap") + 1, "user": top("user_id") + 1,
    }
    assert manifest.profile_vocab == {f: top(f"profile_{f}") + 1 for f in ("age", "gender", "activity")}
    assert manifest.vocab["ctx"] == 5 and manifest.vocab["gap"] <= 64
    assert set(np.unique(table["ll_ctx"].combine_chunks().values.to_numpy())) == {1, 2, 3, 4}


def test_list_lengths_bounded_and_sequences_consistent(cross):
    out, _ = cross
    t = _read(out, "train")
    for name, limit in (("st_tgt_items", 20), ("st_src_items", 20), ("ll_items", 200)):
        lengths = np.diff(t[name].combine_chunks().offsets.to_numpy())
        assert lengths.max() == limit and lengths.min() >= 0
    ll_len = np.diff(t["ll_items"].combine_chunks().offsets.to_numpy())
    assert 0.5 < (ll_len == 200).mean() < 1.0  # most users have long histories, some do not
    # st_src is the tail of the lifelong sequence
    ll, ll_mask = _padded(t["ll_items"], 20)
    st, st_mask = _padded(t["st_src_items"], 20)
    np.testing.assert_array_equal(ll, st)
    np.testing.assert_array_equal(ll_mask, st_mask)
    # oldest first: the time-gap bucket never increases along a list
    gap, mask = _padded(t["ll_gap"], 200)
    steps = np.diff(np.where(mask, gap, 10**6), axis=1)
    assert (steps <= 0).all() and gap[mask].min() >= 1


def test_sequences_hold_exactly_the_behaviours_before_ts(cross):
    out, _ = cross
    world = build_world(SynthConfig(seed=0, **SMALL))
    t = _read(out, "test").slice(0, 200)
    u, ts = t["user_id"].to_numpy(), t["ts"].to_numpy()
    n_src, _, _ = counts_before(world, u, ts)
    m = np.minimum(n_src, 200)
    uf = np.repeat(u, m)
    pos = np.concatenate([np.arange(a, b) for a, b in zip(n_src - m, n_src)])
    hidden = source_timeline(world, uf, pos)  # recomputed by hash, not read from the cache
    np.testing.assert_array_equal(hidden["items"], t["ll_items"].combine_chunks().values.to_numpy())
    np.testing.assert_array_equal(hidden["ctx"], t["ll_ctx"].combine_chunks().values.to_numpy())
    assert (hidden["time"] < np.repeat(ts, m)).all()
    following = source_timeline(world, u, n_src)  # the next behaviour of each user is not before ts
    assert (following["time"] >= ts).all()


def test_temporal_split(cross, single):
    for out, _ in (cross, single):
        train, test = _read(out, "train"), _read(out, "test")
        assert test["ts"].to_numpy().min() > train["ts"].to_numpy().max()
        days = (test["ts"].to_numpy().max() - train["ts"].to_numpy().min()) / 86400
        assert 7.0 < days <= 8.0


def test_cross_domain_id_spaces_are_disjoint(cross):
    out, _ = cross
    t = pa.concat_tables([_read(out, "train"), _read(out, "test")])

    def ids(*cols: str) -> set[int]:
        return set(np.concatenate([
            t[c].combine_chunks().values.to_numpy() if pa.types.is_list(t[c].type) else t[c].to_numpy()
            for c in cols]).tolist())

    tgt_items, src_items = ids("item_id", "st_tgt_items"), ids("st_src_items", "ll_items")
    tgt_cates, src_cates = ids("item_cate", "st_tgt_cates"), ids("st_src_cates", "ll_cates")
    assert len(tgt_items) > 500 and len(src_items) > 5000
    assert not tgt_items & src_items
    assert not tgt_cates & src_cates
    assert min(tgt_items | src_items) >= 1 and min(tgt_cates | src_cates) >= 1


def test_single_domain(single):
    out, summary = single
    manifest = validate_dataset(out)
    assert manifest.name == "synthetic-single-domain" and manifest.domains == "single"
    t = _read(out, "train")
    assert len(t["st_tgt_items"].combine_chunks().values) == 0
    assert len(t["st_tgt_cates"].combine_chunks().values) == 0
    cand = set(t["item_id"].to_numpy().tolist())
    ll = set(t["ll_items"].combine_chunks().values.to_numpy().tolist())
    assert len(cand & ll) > 0.5 * len(cand)  # one shared item space
    assert 0.1 < summary["ctr"] < 0.35


# ----------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_and_chunking_does_not_matter(cross, tmp_path):
    out, summary = cross
    again = generate(tmp_path / "a", seed=0, progress=False, **SMALL)
    for f, g in zip(summary["files"], again["files"]):
        assert Path(f).read_bytes() == Path(g).read_bytes()
    assert (out / "manifest.json").read_text() == (tmp_path / "a" / "manifest.json").read_text()
    # no materialised timelines, tiny chunks: same rows
    cfg = SynthConfig(seed=0, chunk_elems=40_000, cache_elems=0, **SMALL)
    generate_config(tmp_path / "b", cfg, progress=False)
    assert _read(tmp_path / "b", "train").equals(_read(out, "train"))
    assert _read(tmp_path / "b", "test").equals(_read(out, "test"))


def test_different_seed_differs(cross, tmp_path):
    out, _ = cross
    generate(tmp_path / "c", seed=7, progress=False, **SMALL)
    a, b = _read(out, "train"), _read(tmp_path / "c", "train")
    assert a.schema == b.schema
    assert not np.array_equal(a["item_id"].to_numpy(), b["item_id"].to_numpy())
    assert not np.array_equal(a["label"].to_numpy(), b["label"].to_numpy())


def test_regenerating_replaces_old_shards(tmp_path):
    generate(tmp_path, users=50, rows=300, ll_len=30, st_len=5, shards=3, progress=False)
    summary = generate(tmp_path, users=50, rows=300, ll_len=30, st_len=5, shards=1, progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.parquet")) == ["part-00000.parquet"]
    assert validate_dataset(tmp_path).splits["train"]["rows"] == summary["train_rows"]


def test_refuses_to_mix_with_foreign_shards(tmp_path):
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "train" / "other.parquet")
    with pytest.raises(ValueError, match="--out"):
        generate(tmp_path, users=10, rows=20, ll_len=5, st_len=2, shards=1, progress=False)


def test_one_row_dataset_is_valid(tmp_path):
    summary = generate(tmp_path, users=1, rows=1, ll_len=3, st_len=2, shards=4, progress=False)
    assert summary["splits"] == {"train": {"rows": 1}, "test": {"rows": 0}}
    assert validate_dataset(tmp_path).splits["test"]["rows"] == 0


@pytest.mark.parametrize("kwargs, option", [
    ({"rows": 0}, "--rows"), ({"users": 0}, "--users"), ({"shards": 0}, "--shards"),
    ({"ll_len": -1}, "--ll-len"), ({"st_len": -5}, "--st-len"), ({"domains": "both"}, "--domains"),
    ({"seed": -1}, "--seed"), ({"rows": 2.5}, "--rows"), ({"users": True}, "--users"),
])
def test_bad_parameters_name_the_option(tmp_path, kwargs, option):
    with pytest.raises(ValueError) as err:
        generate(tmp_path, progress=False, **kwargs)
    message = str(err.value)
    assert message.startswith(option + ":") and "\n" not in message
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ContractError):
        validate_dataset(tmp_path)


# ----------------------------------------------------------------------------- planted effects


def test_label_rate_and_current_interest_effect(effects):
    t, world = effects
    y = t["label"].to_numpy()
    assert 0.15 < y.mean() < 0.3
    cand = world.cate_interest[t["item_cate"].to_numpy()]
    st, mask = _padded(t["st_tgt_cates"], 50)
    st_interest = np.where(mask, world.cate_interest[st], -1)
    recent = (st_interest[:, -20:] == cand[:, None]).sum(1)
    # (a) candidates matching the user's current short-term interests are clicked far more often
    assert y[recent >= 3].mean() > 3 * y[recent == 0].mean()
    # a simple count statistic on st_tgt alone separates clicks well
    assert _auc(recent.astype(float), y) > 0.7
    same_cate = (np.where(mask, st, -1) == t["item_cate"].to_numpy()[:, None]).sum(1)
    assert _auc(same_cate.astype(float), y) > 0.68
    # long-term interests matter on their own
    in_long = (world.long[t["user_id"].to_numpy()] == cand[:, None]).any(1)
    assert y[in_long].mean() > 4 * y[~in_long].mean()


def test_cross_domain_bridge(effects):
    """Same-user target and source short-term items share hidden interests; other users' do not."""
    t, world = effects
    tgt, tmask = _padded(t["st_tgt_cates"], 50)
    src, smask = _padded(t["st_src_cates"], 50)
    k = world.cfg.interests

    def hist(c: np.ndarray, m: np.ndarray) -> np.ndarray:
        h = np.zeros((len(c), k))
        rows = np.repeat(np.arange(len(c)), m.sum(1))
        np.add.at(h, (rows, world.cate_interest[c[m]]), 1)
        return h / np.maximum(h.sum(1, keepdims=True), 1)

    ht, hs = hist(tgt, tmask), hist(src, smask)
    same = (ht * hs).sum(1).mean()
    other = (ht * np.roll(hs, 1, axis=0)).sum(1).mean()
    assert same > 1.8 * other


def test_neighbourhood_context_carries_signal(effects):
    """(b) Lifelong items of the candidate's interest, weighted by their neighbours' engagement, beat own ctx."""
    t, world = effects
    y = t["label"].to_numpy()
    cand = world.cate_interest[t["item_cate"].to_numpy()]
    cates, mask = _padded(t["ll_cates"], 300)
    ctx, _ = _padded(t["ll_ctx"], 300)
    match = (world.cate_interest[cates] == cand[:, None]) & mask
    x, c = np.pad(np.where(mask, ctx, 0).astype(float), ((0, 0), (3, 3))), np.pad(mask.astype(float), ((0, 0), (3, 3)))
    offsets = [d for d in range(-3, 4) if d]
    nbr = sum(x[:, 3 + d:303 + d] for d in offsets) / np.maximum(sum(c[:, 3 + d:303 + d] for d in offsets), 1)
    raw = _auc(match.sum(1).astype(float), y)
    own = _auc((match & (ctx >= 3)).sum(1).astype(float), y)
    neighbours = _auc((match & (nbr >= 2.5)).sum(1).astype(float), y)
    assert neighbours > own + 0.04 and own > raw
    # behaviour level: among items with the same own ctx, the neighbours still separate real interests
    real = (world.cate_interest[cates][:, :, None] == world.long[t["user_id"].to_numpy()][:, None, :]).any(2) & mask
    for level in (1, 2, 3, 4):
        sel = mask & (ctx == level)
        assert real[sel & (nbr >= 2.5)].mean() > 1.8 * real[sel & (nbr < 2.5)].mean()


@pytest.mark.parametrize("focus", [0.5, 1.0])
def test_focus_sets_the_share_of_session_topic_behaviours(focus):
    """``--focus``: the share of a session's behaviours of its focus interest; 1 = every behaviour of a
    session shares one interest, so a window has no focus-vs-feed contrast left to exploit."""
    world = build_world(SynthConfig(cache_elems=0, focus=focus, **SMALL))
    u = np.repeat(np.arange(1, 301), 200)
    pos = np.tile(np.arange(200), 300)
    tl = source_timeline(world, u, pos)
    assert tl["topic"].mean() == pytest.approx(focus, abs=0.01)
    s = pos // world.sess_len[u]
    same = (s[1:] == s[:-1]) & (u[1:] == u[:-1])  # consecutive behaviours of one session
    shared = (tl["interest"][1:] == tl["interest"][:-1])[same].mean()
    if focus == 1.0:
        assert shared == 1.0
    else:  # two focus items (p = 1/4) share the interest; feed items only by chance
        assert 0.2 < shared < 0.4

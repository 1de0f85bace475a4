"""Taobao converters: contract validity, hand-checked sequences, splits, negatives, bad input.

The fixtures under ``tests/fixtures/taobao`` are tiny CSVs in the real files'
formats (header quirks included). User 523 (ad-click) and user 1018011
(user-behavior) are hand-crafted; every other row is random. Besides literal
checks on the crafted users, every output row is compared with a brute-force
pure-Python reference computed from the CSVs.
"""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylsm.data.check import validate_dataset
from raylsm.data.contract import shard_files
from raylsm.data.taobao import TaobaoOptions, _by_user, convert, gap_bucket

FIX = Path(__file__).parent / "fixtures" / "taobao"
AD_DIR, UB_DIR = FIX / "ad_click", FIX / "user_behavior"
BTAG = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}
CST = 8 * 3600
LL, ST = 8, 24  # ad-click lengths used below (ll short enough to truncate user 523's 12 source actions)
T_AD = 1494396000  # user 523's train impression (2017-05-10 14:00 CST)
T_AD2 = 1494640800  # user 523's test impression (2017-05-13 10:00 CST, the last day)
T_UB = 1512280800  # user 1018011's test positive (2017-12-03 14:00 CST, day 8)


def _read(root: Path, split: str | None = None) -> pa.Table:
    splits = [split] if split else ["train", "test"]
    return pa.concat_tables([pq.read_table(f) for s in splits for f in shard_files(root, s)])


def _rows(root: Path, split: str | None = None) -> list[dict]:
    return _read(root, split).to_pylist()


def _idmap(root: Path, name: str) -> dict[int, object]:
    """dense id -> raw id (item: (kind, raw))."""
    t = pq.read_table(root / "idmap" / f"{name}.parquet").to_pylist()
    if name == "item":
        return {r["id"]: (r["kind"], r["raw"]) for r in t}
    return {r["id"]: r["raw"] for r in t}


def _csv(path: Path, header: bool = True) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[1:] if header else rows


def _int(x: str) -> int | None:
    return None if x in ("", "NULL") else int(x)


@pytest.fixture(scope="module")
def ad(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ad") / "ds"
    convert(AD_DIR, out, "ad-click", ll_len=LL, st_len=ST, options=TaobaoOptions(shard_rows=40))
    return out


@pytest.fixture(scope="module")
def ub(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ub") / "ds"
    convert(UB_DIR, out, "user-behavior", ll_len=4, st_len=3, options=TaobaoOptions(shard_rows=300, seed=7))
    return out


# ----------------------------------------------------------------------------- ad-click


def _ad_reference() -> tuple[dict, dict]:
    """Raw ad -> cate, and user -> sorted behaviours (ts, brand, cate, ctx) from the CSVs."""
    ad_cate = {int(r[0]): int(r[1]) for r in _csv(AD_DIR / "ad_feature.csv")}
    beh = defaultdict(list)
    for u, ts, btag, cate, brand in _csv(AD_DIR / "behavior_log.csv"):
        beh[int(u)].append((int(ts), _int(brand), int(cate), BTAG[btag]))
    return ad_cate, beh


def test_ad_click_valid_manifest_and_counts(ad: Path):
    m = validate_dataset(ad)
    ad_cate, _ = _ad_reference()
    raw = _csv(AD_DIR / "raw_sample.csv")
    kept = [r for r in raw if int(r[2]) in ad_cate and ad_cate[int(r[2])] < 2000]
    assert m.domains == "cross"
    assert m.splits["train"]["rows"] + m.splits["test"]["rows"] == len(kept)
    assert m.max_len == {"st": ST, "ll": LL}
    assert m.vocab["ctx"] == 5  # pv, cart, fav, buy all occur
    assert list(m.profile_vocab) == [
        "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
        "shopping_level", "occupation", "new_user_class_level",
    ]
    src = m.source
    assert src["generator"] == "raylsm.data.taobao" and src["variant"] == "ad-click"
    assert any("brand" in n for n in src["notes"])
    assert src["dropped"]["impressions_without_ad_feature"] == sum(int(r[2]) not in ad_cate for r in raw)
    assert src["dropped"]["impressions_source_domain_candidate"] == sum(
        int(r[2]) in ad_cate and ad_cate[int(r[2])] >= 2000 for r in raw
    )
    assert len(shard_files(ad, "train")) >= 2  # shard_rows=40
    labels = {r["label"] for r in _rows(ad)}
    assert labels == {0, 1}


def test_ad_click_hand_checked_impression(ad: Path):
    items, cates = _idmap(ad, "item"), _idmap(ad, "cate")
    users = _idmap(ad, "user")
    row = next(r for r in _rows(ad, "train") if users[r["user_id"]] == 523 and r["ts"] == T_AD)
    assert items[row["item_id"]] == ("adgroup", 900001) and cates[row["item_cate"]] == 1665 and row["label"] == 1
    brands = lambda ids: [items[i][1] for i in ids]  # noqa: E731
    # target domain: 30 actions before T, latest 24 kept, oldest first; the tie at T and the later one excluded
    assert brands(row["st_tgt_items"]) == [500000 + k for k in range(6, 30)]
    assert [cates[c] for c in row["st_tgt_cates"]] == [1000 + k % 3 for k in range(6, 30)]
    # source domain (cate >= 2000, incl. exactly 2000): all 12 fit in st_len=24; brand NULL -> the no-brand item
    assert brands(row["st_src_items"]) == [600000 + k if k != 5 else None for k in range(12)]
    assert [cates[c] for c in row["st_src_cates"]] == [2000 + 100 * k for k in range(12)]
    assert items[row["st_src_items"][5]] == ("brand", None)
    # lifelong: the latest 8 source actions
    assert brands(row["ll_items"]) == [600004, None, 600006, 600007, 600008, 600009, 600010, 600011]
    assert row["ll_ctx"] == [1, 2, 3, 4, 1, 2, 3, 4]  # pv, cart, fav, buy cycling from k = 4
    # gaps 3600, 1000, 64, 8, 4, 3, 2, 1 s -> floor(log2) + 1
    assert row["ll_gap"] == [12, 10, 7, 4, 3, 2, 2, 1]


def test_ad_click_tie_and_later_actions_enter_the_test_impression(ad: Path):
    items, users = _idmap(ad, "item"), _idmap(ad, "user")
    row = next(r for r in _rows(ad, "test") if users[r["user_id"]] == 523)
    assert row["ts"] == T_AD2 and items[row["item_id"]] == ("adgroup", 900002) and row["label"] == 0
    assert [items[i][1] for i in row["st_tgt_items"]] == [500000 + k for k in range(8, 30)] + [599999, 599998]


def test_ad_click_every_row_matches_reference(ad: Path):
    ad_cate, beh = _ad_reference()
    items, cates, users = _idmap(ad, "item"), _idmap(ad, "cate"), _idmap(ad, "user")
    rows = _rows(ad)
    assert rows
    for r in rows:
        u, ts = users[r["user_id"]], r["ts"]
        kind, adgroup = items[r["item_id"]]
        assert kind == "adgroup" and cates[r["item_cate"]] == ad_cate[adgroup] < 2000
        before = sorted(b for b in beh[u] if b[0] < ts)  # fixture: no (user, ts) ties before an impression
        tgt = [b for b in before if b[2] < 2000]
        src = [b for b in before if b[2] >= 2000]
        for name, seq, n in (("st_tgt", tgt, ST), ("st_src", src, ST), ("ll", src, LL)):
            want = seq[-n:]
            assert [items[i] for i in r[f"{name}_items"]] == [("brand", b[1]) for b in want], (u, ts, name)
            assert [cates[c] for c in r[f"{name}_cates"]] == [b[2] for b in want]
        assert r["ll_ctx"] == [b[3] for b in src[-LL:]]
        assert r["ll_gap"] == [min((ts - b[0]).bit_length(), 63) for b in src[-LL:]]


def test_ad_click_item_spaces_are_disjoint(ad: Path):
    t = pq.read_table(ad / "idmap" / "item.parquet").to_pylist()
    ad_ids = [r["id"] for r in t if r["kind"] == "adgroup"]
    brand_ids = [r["id"] for r in t if r["kind"] == "brand"]
    assert max(ad_ids) < min(brand_ids) and sorted(ad_ids + brand_ids) == list(range(1, len(t) + 1))
    # some raw brand numbers equal raw ad group numbers in the fixture; they still get different ids
    shared = {r["raw"] for r in t if r["kind"] == "adgroup"} & {r["raw"] for r in t if r["kind"] == "brand"}
    assert shared


def test_ad_click_split_is_last_day(ad: Path):
    ad_cate, _ = _ad_reference()
    raw = [r for r in _csv(AD_DIR / "raw_sample.csv") if int(r[2]) in ad_cate and ad_cate[int(r[2])] < 2000]
    last_day = max((int(r[1]) + CST) // 86400 for r in raw)
    test_ts = sorted(r["ts"] for r in _rows(ad, "test"))
    train_ts = [r["ts"] for r in _rows(ad, "train")]
    assert test_ts == sorted(int(r[1]) for r in raw if (int(r[1]) + CST) // 86400 == last_day)
    assert {(t + CST) // 86400 for t in test_ts} == {last_day}
    assert max((t + CST) // 86400 for t in train_ts) < last_day


def test_ad_click_profile_remap(ad: Path):
    users = _idmap(ad, "user")
    prof_users = {int(r[0]) for r in _csv(AD_DIR / "user_profile.csv")}
    segs = sorted({int(r[1]) for r in _csv(AD_DIR / "user_profile.csv")})
    rows = _rows(ad)
    r523 = next(r for r in rows if users[r["user_id"]] == 523)
    # user_profile line of 523: "523,5,0,2,3,,3,0,2" (empty pvalue_level -> 0)
    assert r523["profile_pvalue_level"] == 0
    assert r523["profile_cms_segid"] == segs.index(5) + 1
    absent = [r for r in rows if users[r["user_id"]] not in prof_users]
    assert absent, "fixture should have impressions of users without a profile"
    assert all(v == 0 for r in absent for k, v in r.items() if k.startswith("profile_"))


# ----------------------------------------------------------------------------- user-behavior


def _ub_raw() -> list[tuple[int, int, int, int, int]]:
    """(user, item, cate, ctx, ts) of every CSV line."""
    return [(int(u), int(i), int(c), BTAG[b], int(t)) for u, i, c, b, t in _csv(UB_DIR / "UserBehavior.csv", header=False)]


LO, HI = 1511539200, 1511539200 + 9 * 86400  # 2017-11-25 .. 2017-12-03 in Beijing time


def test_user_behavior_valid_and_counts(ub: Path):
    m = validate_dataset(ub)
    raw = _ub_raw()
    valid = [r for r in raw if LO <= r[4] < HI]
    assert m.domains == "single" and m.source["variant"] == "user-behavior"
    assert m.source["dropped"]["rows_outside_days"] == len(raw) - len(valid) == 4
    rows = _rows(ub)
    assert sum(r["label"] == 1 for r in rows) == len(valid)  # every behaviour is a positive
    assert sum(r["label"] == 0 for r in rows) == len(valid)  # neg_ratio 1, all resolved
    assert all(r["st_tgt_items"] == [] for r in rows)
    assert list(m.profile_vocab) == ["activity", "buys"]


def test_user_behavior_split_by_day(ub: Path):
    day = lambda t: (t - LO) // 86400  # noqa: E731
    assert {day(r["ts"]) for r in _rows(ub, "test")} == {8}
    assert {day(r["ts"]) for r in _rows(ub, "train")} <= set(range(8))


def test_user_behavior_negatives_never_seen_items(ub: Path):
    items, users = _idmap(ub, "item"), _idmap(ub, "user")
    cat = {r["id"]: r["cate_id"] for r in pq.read_table(ub / "idmap" / "item.parquet").to_pylist()}
    seen = defaultdict(set)
    for u, i, _, _, t in _ub_raw():
        if LO <= t < HI:
            seen[u].add(i)
    rows = _rows(ub)
    pos = defaultdict(int)
    neg = defaultdict(int)
    for r in rows:
        key = (r["user_id"], r["ts"])
        if r["label"] == 1:
            pos[key] += 1
            assert items[r["item_id"]][1] in seen[users[r["user_id"]]]
        else:
            neg[key] += 1
            assert items[r["item_id"]][1] not in seen[users[r["user_id"]]]
            assert r["item_cate"] == cat[r["item_id"]]
    assert pos == neg  # one negative per positive, same user and timestamp


def test_user_behavior_hand_checked_positive(ub: Path):
    items, cates, users = _idmap(ub, "item"), _idmap(ub, "cate"), _idmap(ub, "user")
    rows = [r for r in _rows(ub, "test") if users[r["user_id"]] == 1018011 and r["ts"] == T_UB]
    pos = next(r for r in rows if r["label"] == 1 and items[r["item_id"]][1] == 4000100)
    # history: items 4000001..4000006 at T - 6000, ..., T - 1000; the tie at T (4000101) and T+50 excluded
    assert [items[i][1] for i in pos["ll_items"]] == [4000003, 4000004, 4000005, 4000006]  # ll_len = 4
    assert [items[i][1] for i in pos["st_src_items"]] == [4000004, 4000005, 4000006]  # st_len = 3
    assert [cates[c] for c in pos["ll_cates"]] == [7000001, 7000002, 7000001, 7000002]
    assert pos["ll_ctx"] == [3, 4, 1, 2]  # fav, buy, pv, cart
    assert pos["ll_gap"] == [12, 12, 11, 10]  # 4000, 3000, 2000, 1000 s
    negs = [r for r in rows if r["label"] == 0]
    assert negs and all(r["ll_items"] == pos["ll_items"] or r["ll_items"] == [] for r in negs)
    # the tie positive (4000101 at T) has the same history as 4000100
    tie = next(r for r in rows if r["label"] == 1 and items[r["item_id"]][1] == 4000101)
    assert tie["ll_items"] == pos["ll_items"]


def test_user_behavior_every_row_matches_reference(ub: Path):
    items, users = _idmap(ub, "item"), _idmap(ub, "user")
    hist = defaultdict(list)
    for u, i, c, b, t in _ub_raw():
        if LO <= t < HI:
            hist[u].append((t, i, b))
    for r in _rows(ub):
        h = sorted(x for x in hist[users[r["user_id"]]] if x[0] < r["ts"])
        assert [items[i][1] for i in r["ll_items"]] == [x[1] for x in h[-4:]]
        assert [items[i][1] for i in r["st_src_items"]] == [x[1] for x in h[-3:]]
        assert r["ll_ctx"] == [x[2] for x in h[-4:]]


def test_user_behavior_seeded(tmp_path: Path):
    a = convert(UB_DIR, tmp_path / "a", "user-behavior", ll_len=4, st_len=3, options=TaobaoOptions(seed=3))
    b = convert(UB_DIR, tmp_path / "b", "user-behavior", ll_len=4, st_len=3, options=TaobaoOptions(seed=3))
    assert a["rows"] == b["rows"]
    key = lambda t: sorted(zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "item_id"))))  # noqa: E731
    assert key(_read(tmp_path / "a")) == key(_read(tmp_path / "b"))


# ----------------------------------------------------------------------------- batching


def _canon(root: Path, label: int | None = None) -> list[tuple]:
    rows = [tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(r.items())) for r in _rows(root)]
    return sorted(r for r in rows if label is None or dict(r)["label"] == label)


def test_small_batches_and_chunks_give_same_rows(ad: Path, ub: Path, tmp_path: Path):
    tiny = dict(batch_rows=37, chunk_elements=50, shard_rows=7)
    s = convert(AD_DIR, tmp_path / "ad", "ad-click", ll_len=LL, st_len=ST, options=TaobaoOptions(**tiny))
    assert s["batches"] > 5
    assert _canon(tmp_path / "ad") == _canon(ad)
    assert len(shard_files(tmp_path / "ad", "train")) > 10
    s = convert(UB_DIR, tmp_path / "ub", "user-behavior", ll_len=4, st_len=3, options=TaobaoOptions(**tiny))
    assert s["batches"] > 5
    validate_dataset(tmp_path / "ub")
    assert _canon(tmp_path / "ub", label=1) == _canon(ub, label=1)  # negatives are drawn per batch
    assert len(_canon(tmp_path / "ub", label=0)) == len(_canon(ub, label=0))


def test_by_user_keeps_users_whole_and_aligned():
    def stream(users: list[int], size: int):
        for i in range(0, len(users), size):
            yield pa.RecordBatch.from_pydict({"user": pa.array(users[i:i + size], pa.int64())})

    beh = [1, 1, 1, 2, 4, 4, 4, 4, 4, 7, 9, 9]
    imp = [0, 1, 2, 3, 4, 4, 5, 6, 8, 9, 11, 12]  # users 0, 3, 5, 6, 8, 11, 12 have no behaviours
    pieces = list(_by_user(stream(beh, 2), stream(imp, 3), min_rows=3))
    assert len(pieces) > 2
    got_i = [i.column("user").to_pylist() if i is not None else [] for _, i in pieces]
    assert sum(got_i, []) == imp  # every impression exactly once, in order
    distinct_b = list({id(b): b for b, _ in pieces if b is not None}.values())  # the tail piece may repeat
    assert sum((b.column("user").to_pylist() for b in distinct_b), []) == beh
    for b, i in pieces:
        b_users = b.column("user").to_pylist() if b is not None else []
        for u in set(b_users):
            assert b_users.count(u) == beh.count(u)  # users are never split
        for u in i.column("user").to_pylist() if i is not None else []:
            assert u not in beh or u in b_users  # impressions travel with their user's behaviours


# ----------------------------------------------------------------------------- helpers + options


def test_gap_bucket_edges():
    g = np.array([1, 2, 3, 4, 7, 8, 60, 3600, 86400, 22 * 86400, 2**70 // 2**10])
    assert gap_bucket(g).tolist() == [1, 2, 2, 3, 3, 4, 6, 12, 17, 21, 61]
    assert gap_bucket(np.array([2**63 - 1])).tolist() == [63]


def test_min_history_and_all_candidates(tmp_path: Path):
    s = convert(AD_DIR, tmp_path / "a", "ad-click", ll_len=LL, options=TaobaoOptions(min_history=LL, candidates="all"))
    validate_dataset(tmp_path / "a")
    rows = _rows(tmp_path / "a")
    assert rows and all(len(r["ll_items"]) == LL for r in rows)
    assert s["dropped"]["impressions_short_history"] > 0
    assert "impressions_source_domain_candidate" not in s["dropped"]
    cates = _idmap(tmp_path / "a", "cate")
    assert any(cates[r["item_cate"]] >= 2000 for r in rows)  # source-domain ads kept


def test_rerun_replaces_previous_output(tmp_path: Path):
    convert(UB_DIR, tmp_path / "o", "user-behavior", ll_len=4, options=TaobaoOptions(shard_rows=100))
    s = convert(UB_DIR, tmp_path / "o", "user-behavior", ll_len=4, options=TaobaoOptions(shard_rows=10_000),
                overwrite=True)
    assert len(shard_files(tmp_path / "o", "train")) == 1 and not (tmp_path / "o" / "_staging").exists()
    assert validate_dataset(tmp_path / "o").splits["train"]["rows"] == s["rows"]["train"]


# ----------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_file(tmp_path: Path):
    raw = _copy(AD_DIR, tmp_path / "raw")
    (raw / "behavior_log.csv").unlink()
    with pytest.raises(ValueError, match=r"behavior_log\.csv: missing"):
        convert(raw, tmp_path / "out", "ad-click")
    with pytest.raises(ValueError, match=r"UserBehavior\.csv: missing"):
        convert(raw, tmp_path / "out", "user-behavior")


def test_wrong_header(tmp_path: Path):
    raw = _copy(AD_DIR, tmp_path / "raw")
    p = raw / "raw_sample.csv"
    p.write_text(p.read_text().replace("adgroup_id", "ad_id", 1))
    with pytest.raises(ValueError, match=r"raw_sample\.csv: header column 3 is 'ad_id', expected 'adgroup_id'") as e:
        convert(raw, tmp_path / "out", "ad-click")
    assert "\n" not in str(e.value)


def test_user_behavior_with_header_line(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    body = (UB_DIR / "UserBehavior.csv").read_text()
    (raw / "UserBehavior.csv").write_text("user_id,item_id,category_id,behavior_type,timestamp\n" + body)
    with pytest.raises(ValueError, match=r"UserBehavior\.csv: column 'user_id'.*no header"):
        convert(raw, tmp_path / "out", "user-behavior")


def test_bad_values_name_file_and_column(tmp_path: Path):
    raw = _copy(AD_DIR, tmp_path / "raw")
    with open(raw / "behavior_log.csv", "a") as f:
        f.write("523,1494000000,click,2100,1\n")
    with pytest.raises(ValueError, match=r"behavior_log\.csv: column btag: unknown behaviour type click") as e:
        convert(raw, tmp_path / "out", "ad-click")
    assert "\n" not in str(e.value)
    raw2 = _copy(AD_DIR, tmp_path / "raw2")
    with open(raw2 / "raw_sample.csv", "a") as f:
        f.write("523,1494000000,900001,430548_1007,0,2\n")
    with pytest.raises(ValueError, match=r"raw_sample\.csv: column clk: value 2 not in \{0,1\}"):
        convert(raw2, tmp_path / "out", "ad-click")
    raw3 = _copy(AD_DIR, tmp_path / "raw3")
    with open(raw3 / "behavior_log.csv", "a") as f:
        f.write("523,notatime,pv,2100,1\n")
    bad_ts = r"behavior_log\.csv: column .time_stamp.: Could not convert string \"notatime\".*\(line \d+\)"
    with pytest.raises(ValueError, match=bad_ts) as e:
        convert(raw3, tmp_path / "out", "ad-click")
    assert "\n" not in str(e.value)


def test_unknown_variant_and_bad_option(tmp_path: Path):
    with pytest.raises(ValueError, match="variant: unknown variant 'clicks'"):
        convert(AD_DIR, tmp_path / "out", "clicks")
    with pytest.raises(ValueError, match="option candidates"):
        convert(AD_DIR, tmp_path / "out", "ad-click", options=TaobaoOptions(candidates="source"))


def test_refuses_foreign_output_dir(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a raylsm dataset"):
        convert(UB_DIR, tmp_path / "out", "user-behavior", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # nothing removed

"""Taobao raw logs -> dataset contract v1 (docs/design.md, "Dataset contract").

Two public Tianchi datasets, one per paper:

``ad-click`` (Ali_Display_Ad_Click, LCN §5.1.1) -- cross-domain.
    Files ``raw_sample.csv``, ``ad_feature.csv``, ``user_profile.csv``,
    ``behavior_log.csv`` (all with headers). One row of ``raw_sample`` is one
    impression, ``label = clk``; the candidate is the ad (``adgroup_id``) with
    its ``cate_id`` from ``ad_feature``. Items with raw category < 2000 are the
    target domain, >= 2000 the source domain (LCN). By default only
    target-domain ads are kept as impressions (``candidates="target"``: the
    contract's ``item_id`` is a target-domain item); ``"all"`` keeps every ad.
    Behaviours come from ``behavior_log``, which has no item id: the behaviour's
    **item is its brand**. ``st_tgt`` = latest ``st_len`` target-domain
    behaviours, ``st_src`` = latest ``st_len`` source-domain behaviours,
    ``ll`` = latest ``ll_len`` source-domain behaviours. Test split = the last
    day of impressions, train = the earlier days.

``user-behavior`` (UserBehavior.csv, CAIN §5.1.1) -- single domain.
    One header-less file ``UserBehavior.csv``: user_id, item_id, category_id,
    behavior_type, timestamp. The log holds positive feedback only, so (as in
    the ETA/SIM preprocessing the paper follows) every behaviour whose type is
    in ``positive_btags`` (default: all four) is a positive impression at its
    own timestamp, and ``neg_ratio`` negatives per positive are drawn uniformly
    from the item catalogue (all items of the log), seeded, never an item the
    user interacted with anywhere in the log; a negative shares its positive's
    user, timestamp and sequences. ``st_src`` and ``ll`` are the latest
    ``st_len`` / ``ll_len`` behaviours (same domain), ``st_tgt`` is empty.
    Days: day index = (ts - start_date 00:00 Beijing time) // 86400;
    rows outside days [0, days) (outlier timestamps) are dropped and counted;
    the last ``test_days`` days are test, the earlier ones train (default: 8
    train days, the 9th test, as in CAIN). The dataset has no user profile, so
    two are derived from training-period behaviour counts (``derive_profile``):
    ``activity`` = 1 + floor(log2(1 + #behaviours)), ``buys`` = 1 +
    floor(log2(1 + #buys)), counted over the train days only.

Sequences: for an impression at time ``ts`` a sequence holds the user's most
recent behaviours with behaviour time **strictly before** ``ts`` (ties with the
impression excluded), oldest first. Behaviours sharing a timestamp are ordered
by (dense item id, ctx).

Id spaces (0 = padding everywhere; dense id = 1-based rank of the raw id in its
sorted vocabulary, so the order of raw ids is kept):

* ``user``: users with at least one impression.
* ``item`` (ad-click): ad group ids of candidate ads take 1..A; A+1 stands for
  a behaviour whose brand is NULL; brands of behaviours take A+2..A+1+B. Ads
  and brands never share an id, even when the raw numbers coincide.
* ``item`` (user-behavior): all item ids of the log.
* ``cate``: raw categories of candidates and behaviours together (one space;
  the domain split uses the raw value).
* ``profile_<field>`` (ad-click): the ``user_profile`` columns (names with
  surrounding spaces stripped), per field the rank of the raw value among the
  non-empty values; empty value or user absent from ``user_profile`` -> 0.
* ``ctx``: behaviour type, pv=1, cart=2, fav=3, buy=4.
* ``gap``: log2 bucket of the gap Δ = ts - behaviour time in seconds (Δ >= 1):
  bucket = floor(log2 Δ) + 1, capped at 63. So 1 s -> 1, 2-3 s -> 2,
  4-7 s -> 3, 1 min -> 6, 1 h -> 12, 1 day -> 17, 22 days -> 21.

Days are calendar days in Beijing time (UTC+8, ``tz_offset_hours``), which is
how Tianchi dates both datasets.

Pipeline, with memory bounded whatever the input size:

1. DuckDB (file-backed, ``memory_limit``, ``threads``, spilling to a work
   dir inside the dataset's staging directory) parses and checks the CSVs,
   joins the small side tables and writes typed impressions and behaviours to
   staging Parquet (one pass over each CSV).
2. Sorted distinct raw ids (the vocabularies) are read from the staged files.
3. DuckDB streams behaviours and impressions sorted by (user, ts) (an
   external sort past ``memory_limit``); they are regrouped into aligned
   batches of whole users (about ``batch_rows`` behaviours). Per batch numpy
   remaps ids by ``searchsorted``, finds each impression's window with one
   ``searchsorted`` on a (user, ts) key, and gathers the lists by index
   arithmetic in chunks of at most ``chunk_elements`` list elements, which
   stream into zstd Parquet shards of at most ``shard_rows`` rows per split.
   No Python loop runs per row; memory is set by ``memory_limit``,
   ``batch_rows`` and ``chunk_elements``, not by the input size.

Dense id maps are written next to the dataset under ``<out>/idmap/`` (raw ->
id Parquet tables) so predictions can be traced back to raw ids.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylsm.data.atomic import rebase, write_dataset
from raylsm.data.contract import PROFILE_PREFIX, SPLITS, Manifest, arrow_schema

log = logging.getLogger(__name__)

VARIANTS = ("ad-click", "user-behavior")
BTAG_CTX: dict[str, int] = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}
TARGET_CATE_BELOW = 2000  # LCN: raw category < 2000 is the target domain
GAP_MAX_BUCKET = 63
MAX_NEG_ROUNDS = 32  # resampling rounds for negatives that hit a user's own item
_NULL = np.iinfo(np.int64).min  # stand-in for SQL NULL in staged integer columns

# Expected headers (names compared after stripping spaces: the real
# user_profile.csv header ends in "new_user_class_level ").
AD_CLICK_FILES: dict[str, dict[str, str]] = {
    "raw_sample.csv": {
        "user": "BIGINT", "time_stamp": "BIGINT", "adgroup_id": "BIGINT",
        "pid": "VARCHAR", "nonclk": "BIGINT", "clk": "BIGINT",
    },
    "ad_feature.csv": {
        "adgroup_id": "BIGINT", "cate_id": "BIGINT", "campaign_id": "BIGINT",
        "customer": "BIGINT", "brand": "BIGINT", "price": "DOUBLE",
    },
    "user_profile.csv": {
        "userid": "BIGINT", "cms_segid": "BIGINT", "cms_group_id": "BIGINT",
        "final_gender_code": "BIGINT", "age_level": "BIGINT", "pvalue_level": "BIGINT",
        "shopping_level": "BIGINT", "occupation": "BIGINT", "new_user_class_level": "BIGINT",
    },
    "behavior_log.csv": {
        "user": "BIGINT", "time_stamp": "BIGINT", "btag": "VARCHAR", "cate": "BIGINT", "brand": "BIGINT",
    },
}
USER_BEHAVIOR_FILE = "UserBehavior.csv"
USER_BEHAVIOR_COLUMNS: dict[str, str] = {
    "user_id": "BIGINT", "item_id": "BIGINT", "category_id": "BIGINT",
    "behavior_type": "VARCHAR", "timestamp": "BIGINT",
}
AD_PROFILE_FIELDS: tuple[str, ...] = tuple(list(AD_CLICK_FILES["user_profile.csv"])[1:])
UB_PROFILE_FIELDS: tuple[str, ...] = ("activity", "buys")


@dataclass
class TaobaoOptions:
    """Knobs of :func:`convert` besides the sequence lengths; defaults follow the papers."""

    # --- both variants
    batch_rows: int = 250_000  # behaviours (whole users) held in numpy at once
    chunk_elements: int = 1_000_000  # list elements gathered in memory at once
    shard_rows: int = 200_000  # max impressions per output Parquet shard
    min_history: int = 0  # drop impressions whose lifelong sequence is shorter
    tz_offset_hours: int = 8  # day boundaries in Beijing time (Tianchi dates)
    test_days: int = 1  # user-behavior: last N days are test (ad-click: always the last day)
    memory_limit: str = "2GB"  # DuckDB memory limit; it spills to the staging dir beyond
    threads: int = 2
    work_dir: str | None = None  # DuckDB's work dir; default inside the dataset's staging, removed at the end
    compression: str = "zstd"
    name: str | None = None  # manifest name; default "taobao-<variant>"
    # --- ad-click
    candidates: str = "target"  # "target": ads with raw cate < 2000 only (LCN); "all"
    # --- user-behavior
    neg_ratio: int = 1  # sampled negatives per positive
    positive_btags: tuple[str, ...] = ("pv", "cart", "fav", "buy")
    positive_fraction: float = 1.0  # keep this share of positives (seeded), to bound output size
    seed: int = 0
    start_date: str = "2017-11-25"  # day 0 (Beijing time)
    days: int = 9  # valid days [0, days); the rest are outliers, dropped
    derive_profile: bool = True  # profile_activity, profile_buys


# ----------------------------------------------------------------------------- public API


def convert(
    raw_dir: str | Path,
    out_dir: str | Path,
    variant: str,
    ll_len: int = 500,
    st_len: int = 24,
    options: TaobaoOptions | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert a raw Taobao dump in ``raw_dir`` into a contract-v1 dataset in ``out_dir``.

    The dataset is written beside ``out_dir`` and swapped in once complete and
    checked (:mod:`raylsm.data.atomic`): a failed or interrupted conversion leaves
    what was there untouched. An existing dataset is replaced only with
    ``overwrite``. Returns a summary: rows per split, shard files, dropped-row
    counts, timing and peak RSS. Raises ``ValueError`` (one line, naming the
    file/column) on bad input.
    """
    opts = options or TaobaoOptions()
    _check_args(variant, ll_len, st_len, opts)
    raw, out = Path(raw_dir), Path(out_dir)
    if not raw.is_dir():
        raise ValueError(f"{raw}: raw directory does not exist")
    files = _check_files(raw, variant)
    t_start = time.perf_counter()
    staged: dict[str, Path] = {}

    def write(root: Path) -> tuple[dict, _Plan]:
        staged["root"] = root
        work = Path(opts.work_dir) if opts.work_dir else root / "_staging"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            con = _connect(work, opts)
            try:
                if variant == "ad-click":
                    plan = _stage_ad_click(con, files, work, opts)
                else:
                    plan = _stage_user_behavior(con, files[USER_BEHAVIOR_FILE], work, opts)
                return _build(plan, root, variant, ll_len, st_len, opts), plan
            finally:
                con.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    summary, plan = write_dataset(out, write, overwrite=overwrite)
    summary["out"] = str(out)
    summary["files"] = {s: [rebase(f, staged["root"], out) for f in fs] for s, fs in summary["files"].items()}
    seconds = time.perf_counter() - t_start
    total = summary["rows"]["train"] + summary["rows"]["test"]
    summary.update(
        seconds=round(seconds, 3),
        rows_per_s=round(total / seconds, 1) if seconds > 0 else None,
        behaviours_per_s=round(plan.n_behaviours / seconds, 1) if seconds > 0 else None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    log.info("taobao %s: %s", variant, summary["rows"])
    return summary


def gap_bucket(gap_seconds: np.ndarray) -> np.ndarray:
    """floor(log2(gap)) + 1 for gaps >= 1 s, capped at 63 (0 stays 0, the padding id)."""
    g = np.asarray(gap_seconds, dtype=np.int64)
    _, exp = np.frexp(g.astype(np.float64))  # g = m * 2**exp, m in [0.5, 1): exp = floor(log2 g) + 1, exact
    return np.minimum(exp, GAP_MAX_BUCKET).astype(np.int64)


# ----------------------------------------------------------------------------- input checks


def _check_args(variant: str, ll_len: int, st_len: int, o: TaobaoOptions) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown variant {variant!r}, expected one of {', '.join(VARIANTS)}")
    checks: list[tuple[str, object, bool]] = [
        ("ll_len", ll_len, ll_len >= 0),
        ("st_len", st_len, st_len >= 0),
        ("batch_rows", o.batch_rows, o.batch_rows >= 1),
        ("chunk_elements", o.chunk_elements, o.chunk_elements >= 1),
        ("shard_rows", o.shard_rows, o.shard_rows >= 1),
        ("min_history", o.min_history, o.min_history >= 0),
        ("days", o.days, o.days >= 2),
        ("test_days", o.test_days, 1 <= o.test_days < o.days),
        ("threads", o.threads, o.threads >= 1),
        ("neg_ratio", o.neg_ratio, o.neg_ratio >= 0),
        ("positive_fraction", o.positive_fraction, 0.0 < o.positive_fraction <= 1.0),
        ("candidates", o.candidates, o.candidates in ("target", "all")),
        ("positive_btags", o.positive_btags, len(o.positive_btags) > 0 and all(b in BTAG_CTX for b in o.positive_btags)),
    ]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"option {name}: invalid value {value!r}")
    try:
        dt.date.fromisoformat(o.start_date)
    except ValueError:
        raise ValueError(f"option start_date: not an ISO date: {o.start_date!r}") from None


def _read_first_line(path: Path) -> str:
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        return f.readline().lstrip("\ufeff").rstrip("\r\n")


def _check_files(raw: Path, variant: str) -> dict[str, Path]:
    """Each expected file exists and has the expected header (first line for user-behavior)."""
    if variant == "ad-click":
        out = {}
        for name, columns in AD_CLICK_FILES.items():
            path = raw / name
            if not path.is_file():
                raise ValueError(f"{path}: missing (the ad-click variant needs {', '.join(AD_CLICK_FILES)})")
            got = [c.strip() for c in _read_first_line(path).split(",")]
            want = list(columns)
            if got != want:
                for i, (g, w) in enumerate(zip(got + [""] * len(want), want)):
                    if g != w:
                        raise ValueError(
                            f"{path}: header column {i + 1} is {g!r}, expected {w!r} (expected header: {','.join(want)})"
                        )
                raise ValueError(f"{path}: header has {len(got)} columns, expected {len(want)}: {','.join(want)}")
            out[name] = path
        return out
    path = raw / USER_BEHAVIOR_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (the user-behavior variant needs {USER_BEHAVIOR_FILE})")
    first = _read_first_line(path)
    parts = first.split(",")
    want = ",".join(USER_BEHAVIOR_COLUMNS)
    if len(parts) != 5:
        raise ValueError(f"{path}: first line has {len(parts)} columns, expected 5 ({want}, no header): {first[:80]!r}")
    for i in (0, 1, 2, 4):
        if not re.fullmatch(r"-?\d+", parts[i].strip()):
            name = list(USER_BEHAVIOR_COLUMNS)[i]
            raise ValueError(
                f"{path}: column {name!r}: first line value {parts[i]!r} is not an integer "
                f"(the file has no header; columns are {want})"
            )
    if parts[3].strip() not in BTAG_CTX:
        raise ValueError(f"{path}: column 'behavior_type': unknown value {parts[3]!r} on line 1, expected pv/cart/fav/buy")
    return {USER_BEHAVIOR_FILE: path}


# ----------------------------------------------------------------------------- DuckDB staging


def _connect(work: Path, o: TaobaoOptions) -> duckdb.DuckDBPyConnection:
    spill = work / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(work / "stage.duckdb"))
    con.execute(f"SET memory_limit = '{o.memory_limit}'")
    con.execute(f"SET threads = {int(o.threads)}")
    con.execute(f"SET temp_directory = '{_sql_str(spill)}'")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    return con


def _sql_str(x: object) -> str:
    return str(x).replace("'", "''")


def _read_csv(path: Path, columns: dict[str, str], header: bool) -> str:
    cols = ", ".join(f"'{k}': '{v}'" for k, v in columns.items())
    return (
        f"read_csv('{_sql_str(path)}', header={str(header).lower()}, auto_detect=false, delim=',', "
        f"quote='\"', escape='\"', columns={{{cols}}}, nullstr=['NULL', ''])"
    )


def _sql(con: duckdb.DuckDBPyConnection, query: str, file: Path) -> list[tuple]:
    """Run a query; turn DuckDB errors (bad values, our error() checks) into one-line ValueErrors."""
    try:
        return con.execute(query).fetchall()
    except duckdb.Error as e:
        raise ValueError(_one_line_error(str(e), file)) from None


def _one_line_error(msg: str, file: Path) -> str:
    m = re.search(r"raylsm: (.*)", msg)
    if m:  # raised by our own error() checks: already names file and column
        return m.group(1).strip()
    line = re.search(r"CSV Error on Line: (\d+)", msg)
    where = f" (line {line.group(1)})" if line else ""
    col = re.search(r'converting column "([^"]+)"\. ([^\n]*)', msg)
    if col:
        return f"{file}: column '{col.group(1)}': {col.group(2).strip()}{where}"
    head = next((ln.strip() for ln in msg.splitlines() if ln.strip()), msg)
    return f"{file}: cannot parse{where}: {head}"


def _fail(file: Path, what: str) -> str:
    """SQL expression raising a one-line error that names the file."""
    return f"error('raylsm: {_sql_str(file)}: ' || {what})"


def _btag_case(col: str, label: str, file: Path) -> str:
    """SQL mapping a behaviour-type string to its ctx id; unknown values raise."""
    whens = " ".join(f"WHEN '{k}' THEN {v}" for k, v in BTAG_CTX.items())
    msg = f"'column {label}: unknown behaviour type ' || coalesce({col}, 'NULL') || ' (expected pv/cart/fav/buy)'"
    return f"CASE {col} {whens} ELSE {_fail(file, msg)} END"


def _pq(path: Path) -> str:
    return f"read_parquet('{_sql_str(path)}')"


def _arrow(con: duckdb.DuckDBPyConnection, query: str) -> pa.Table:
    """A query result as an Arrow table (DuckDB 2 renamed fetch_arrow_table to to_arrow_table)."""
    rel = con.sql(query)
    fetch = getattr(rel, "to_arrow_table", None) or getattr(rel, "fetch_arrow_table")
    return fetch()


def _sorted_ints(con: duckdb.DuckDBPyConnection, query: str) -> np.ndarray:
    tbl = _arrow(con, query)
    return tbl.column(0).to_numpy().astype(np.int64) if tbl.num_rows else np.zeros(0, np.int64)


@dataclass
class _Plan:
    """What staging hands to the builder."""

    profile_fields: tuple[str, ...]
    test_start: int  # impressions with ts >= test_start are test
    batches: Callable[[], Iterator["_Batch"]]
    idmaps: dict[str, pa.Table]
    n_behaviours: int
    dropped: dict[str, int]
    counters: dict[str, int] = field(default_factory=dict)  # filled while batches are built
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Events:
    """Behaviours of whole users and one domain, sorted by (uid, ts, item, ctx), dense ids."""

    uid: np.ndarray
    ts: np.ndarray
    item: np.ndarray
    cate: np.ndarray
    ctx: np.ndarray

    def take(self, sel: np.ndarray) -> "_Events":
        return _Events(self.uid[sel], self.ts[sel], self.item[sel], self.cate[sel], self.ctx[sel])

    @staticmethod
    def empty() -> "_Events":
        return _Events(*(np.zeros(0, np.int64) for _ in range(5)))


@dataclass
class _Impressions:
    uid: np.ndarray
    ts: np.ndarray
    item: np.ndarray
    cate: np.ndarray
    label: np.ndarray
    profile: dict[str, np.ndarray]

    def take(self, sel: np.ndarray) -> "_Impressions":
        return _Impressions(
            self.uid[sel], self.ts[sel], self.item[sel], self.cate[sel], self.label[sel],
            {k: v[sel] for k, v in self.profile.items()},
        )


@dataclass
class _Batch:
    """Impressions of a set of whole users with those users' behaviours."""

    tgt: _Events | None  # None: single-domain, st_tgt empty
    src: _Events
    imp: _Impressions


def _stream(con: duckdb.DuckDBPyConnection, query: str, batch_size: int = 131072) -> Iterator[pa.RecordBatch]:
    """Stream a query's result as Arrow record batches (DuckDB sorts/spills within its memory limit).

    Staging avoids ``COPY ... PARTITION_BY`` and ``IN (subquery)`` filters inside
    a COPY: with DuckDB 2.0.0 those deadlocked (idle CPU, never returning) on
    a few million rows; plain COPY with joins plus a sorted stream does not.
    """
    rel = con.sql(query)
    reader = rel.to_arrow_reader(batch_size) if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch(batch_size)
    for batch in reader:
        if batch.num_rows:
            yield batch


def _rows_from(tbl: pa.Table, start: int) -> list[pa.RecordBatch]:
    """The table's rows from ``start`` on, as non-empty record batches (zero-copy)."""
    return [b for b in tbl.slice(start).to_batches() if b.num_rows]


class _UserCursor:
    """Hands out a user-sorted stream of rows up to a user bound."""

    def __init__(self, stream: Iterator[pa.RecordBatch]):
        self._stream = stream
        self._buf: list[pa.RecordBatch] = []
        self._done = False

    def below(self, user: int) -> pa.Table | None:
        """All remaining rows whose ``user`` < ``user``."""
        while not self._done and (not self._buf or self._buf[-1].column("user")[-1].as_py() < user):
            batch = next(self._stream, None)
            if batch is None:
                self._done = True
            else:
                self._buf.append(batch)
        if not self._buf:
            return None
        tbl = pa.Table.from_batches(self._buf)
        cut = int(np.searchsorted(_col(tbl, "user"), user, side="left"))
        self._buf = _rows_from(tbl, cut)
        return tbl.slice(0, cut) if cut else None

    def rest(self, max_rows: int) -> Iterator[pa.Table]:
        """The remaining rows, in tables of about ``max_rows``."""
        pending, n = list(self._buf), sum(b.num_rows for b in self._buf)
        self._buf = []
        for batch in self._stream:
            pending.append(batch)
            n += batch.num_rows
            if n >= max_rows:
                yield pa.Table.from_batches(pending)
                pending, n = [], 0
        if n:
            yield pa.Table.from_batches(pending)


def _by_user(
    beh: Iterator[pa.RecordBatch], imp: Iterator[pa.RecordBatch] | None, min_rows: int
) -> Iterator[tuple[pa.Table | None, pa.Table | None]]:
    """Regroup user-sorted behaviour (and impression) streams into aligned pieces of whole users.

    Each piece's behaviours hold the first ``min_rows`` rows and the rest of the
    last user's (fewer only at the end of the stream); its impressions are
    those of the same user range, so a user's history is never split from its
    impressions.
    """
    imps = _UserCursor(imp) if imp is not None else None
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in beh:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= min_rows:
            tbl = pa.Table.from_batches(pending)
            users = _col(tbl, "user")
            cut = int(np.searchsorted(users, users[min_rows - 1], side="right"))  # end of that user's rows
            if cut >= len(users):
                break  # that user may continue in the next batch
            pending, rows = _rows_from(tbl, cut), len(users) - cut
            yield tbl.slice(0, cut), (imps.below(int(users[cut])) if imps else None)
    tail = pa.Table.from_batches(pending) if pending else None
    if imps is None:
        if tail is not None:
            yield tail, None
        return
    for rest in imps.rest(min_rows):
        yield tail, rest


def _col(tbl: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """An integer column as int64 numpy, SQL NULL -> _NULL."""
    c = tbl.column(name)
    if c.null_count:
        c = c.fill_null(_NULL)
    return np.asarray(c.to_numpy()).astype(np.int64, copy=False)


def _rank(vocab: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
    """1-based rank of each value in the sorted vocabulary (every value must be present)."""
    pos = np.searchsorted(vocab, values)
    if len(values) and (pos.max() >= len(vocab) or not np.array_equal(vocab[pos], values)):
        raise RuntimeError(f"internal error: {what} id missing from its vocabulary")
    return pos.astype(np.int64) + 1


def _rank_or_zero(vocab: np.ndarray, values: np.ndarray) -> np.ndarray:
    """1-based rank, 0 for NULL / values outside the vocabulary."""
    if len(vocab) == 0:
        return np.zeros(len(values), np.int64)
    pos = np.searchsorted(vocab, values)
    found = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == values)
    return np.where(found, pos + 1, 0).astype(np.int64)


def _day_start(ts: int, tz_offset_hours: int) -> int:
    off = tz_offset_hours * 3600
    return (ts + off) // 86400 * 86400 - off


# --- ad-click


def _stage_ad_click(con: duckdb.DuckDBPyConnection, files: dict[str, Path], work: Path, o: TaobaoOptions) -> _Plan:
    rs, ad, up, bl = (files[n] for n in ("raw_sample.csv", "ad_feature.csv", "user_profile.csv", "behavior_log.csv"))
    log.info("ad-click: staging under %s", work)
    _sql(con, f"""
        CREATE TABLE ad AS
        SELECT adgroup_id, min(cate_id) AS cate
        FROM {_read_csv(ad, AD_CLICK_FILES['ad_feature.csv'], True)}
        WHERE adgroup_id IS NOT NULL AND cate_id IS NOT NULL GROUP BY adgroup_id""", ad)
    pcols = ", ".join(f"min({f}) AS {f}" for f in AD_PROFILE_FIELDS)
    _sql(con, f"""
        CREATE TABLE prof AS
        SELECT userid, {pcols}
        FROM {_read_csv(up, AD_CLICK_FILES['user_profile.csv'], True)}
        WHERE userid IS NOT NULL GROUP BY userid""", up)
    _sql(con, f"""
        CREATE TABLE rs AS
        SELECT CASE WHEN "user" IS NULL OR time_stamp IS NULL OR adgroup_id IS NULL
                    THEN {_fail(rs, "'empty user, time_stamp or adgroup_id'")} ELSE "user" END AS u,
               time_stamp AS ts, adgroup_id,
               CASE WHEN clk IN (0, 1) THEN clk::TINYINT
                    ELSE {_fail(rs, "'column clk: value ' || coalesce(clk::VARCHAR, 'empty') || ' not in {0,1}'")} END AS label
        FROM {_read_csv(rs, AD_CLICK_FILES['raw_sample.csv'], True)}""", rs)
    n_all, n_no_ad, n_src = _sql(con, f"""
        SELECT count(*), count(*) FILTER (WHERE ad.cate IS NULL),
               count(*) FILTER (WHERE ad.cate >= {TARGET_CATE_BELOW})
        FROM rs LEFT JOIN ad USING (adgroup_id)""", rs)[0]
    where = f"WHERE ad.cate < {TARGET_CATE_BELOW}" if o.candidates == "target" else ""
    pcols = ", ".join(f"prof.{f}" for f in AD_PROFILE_FIELDS)
    stage_imp, stage_beh = work / "imp.parquet", work / "beh.parquet"
    _sql(con, f"""
        COPY (
          SELECT rs.u AS "user", rs.ts, rs.adgroup_id AS adgroup,
                 ad.cate, rs.label, {pcols}
          FROM rs JOIN ad USING (adgroup_id) LEFT JOIN prof ON prof.userid = rs.u
          {where}
        ) TO '{_sql_str(stage_imp)}' (FORMAT parquet)""", rs)
    n_imp = _sql(con, f"SELECT count(*) FROM {_pq(stage_imp)}", rs)[0][0]
    if n_imp == 0:
        raise ValueError(f"{rs}: no impressions left after joining ad_feature.csv and keeping candidates={o.candidates!r}")
    con.execute(f"CREATE TABLE users AS SELECT DISTINCT \"user\" AS u FROM {_pq(stage_imp)}")
    con.execute("DROP TABLE rs")
    _sql(con, f"""
        COPY (
          SELECT b."user", b.time_stamp AS ts,
                 {_btag_case('b.btag', 'btag', bl)} AS ctx,
                 CASE WHEN b.time_stamp IS NULL OR b.cate IS NULL
                      THEN {_fail(bl, "'empty time_stamp or cate'")} ELSE b.cate END AS cate,
                 b.brand
          FROM {_read_csv(bl, AD_CLICK_FILES['behavior_log.csv'], True)} b
          JOIN users ON b."user" = users.u  -- a join, not IN (subquery): see the note in _stream
        ) TO '{_sql_str(stage_beh)}' (FORMAT parquet)""", bl)
    n_beh = _sql(con, f"SELECT count(*) FROM {_pq(stage_beh)}", bl)[0][0]

    users = _sorted_ints(con, "SELECT u FROM users ORDER BY u")
    adgroups = _sorted_ints(con, f"SELECT DISTINCT adgroup FROM {_pq(stage_imp)} ORDER BY 1")
    brands = _sorted_ints(con, f"SELECT DISTINCT brand FROM {_pq(stage_beh)} WHERE brand IS NOT NULL ORDER BY 1")
    cates = _sorted_ints(con, f"""
        SELECT DISTINCT cate FROM (SELECT cate FROM {_pq(stage_imp)} UNION ALL SELECT cate FROM {_pq(stage_beh)}) ORDER BY 1""")
    profile_vocab = {
        f: _sorted_ints(con, f"SELECT DISTINCT {f} FROM prof WHERE {f} IS NOT NULL ORDER BY 1") for f in AD_PROFILE_FIELDS
    }
    max_ts = _sql(con, f"SELECT max(ts) FROM {_pq(stage_imp)}", rs)[0][0]
    test_start = _day_start(int(max_ts), o.tz_offset_hours)
    A = len(adgroups)
    no_brand_id = A + 1
    imp_cols = ", ".join(['"user"', "ts", "adgroup", "cate", "label", *AD_PROFILE_FIELDS])

    def to_batch(bt: pa.Table | None, it: pa.Table) -> _Batch:
        imp = _Impressions(
            uid=_rank(users, _col(it, "user"), "user"),
            ts=_col(it, "ts"),
            item=_rank(adgroups, _col(it, "adgroup"), "adgroup"),
            cate=_rank(cates, _col(it, "cate"), "cate"),
            label=_col(it, "label").astype(np.int8),
            profile={f: _rank_or_zero(profile_vocab[f], _col(it, f)) for f in AD_PROFILE_FIELDS},
        )
        if bt is None or bt.num_rows == 0:
            return _Batch(_Events.empty(), _Events.empty(), imp)
        raw_cate, brand = _col(bt, "cate"), _col(bt, "brand")
        is_null = brand == _NULL
        item = np.full(len(brand), no_brand_id, np.int64)
        item[~is_null] = no_brand_id + _rank(brands, brand[~is_null], "brand")
        ev = _Events(_rank(users, _col(bt, "user"), "user"), _col(bt, "ts"), item,
                     _rank(cates, raw_cate, "cate"), _col(bt, "ctx"))
        is_tgt = raw_cate < TARGET_CATE_BELOW
        return _Batch(ev.take(is_tgt), ev.take(~is_tgt), imp)

    def batches() -> Iterator[_Batch]:
        cb, ci = con.cursor(), con.cursor()  # two concurrent streams need two cursors
        try:
            # NULL brand first and brands ascending = dense item order, so ties sort as (item, ctx)
            beh = _stream(cb, f"""SELECT "user", ts, ctx, cate, brand FROM {_pq(stage_beh)}
                                  ORDER BY "user", ts, brand NULLS FIRST, ctx""")
            imp = _stream(ci, f'SELECT {imp_cols} FROM {_pq(stage_imp)} ORDER BY "user"')
            for bt, it in _by_user(beh, imp, o.batch_rows):
                if it is not None and it.num_rows:
                    yield to_batch(bt, it)
        finally:
            cb.close()
            ci.close()

    ids = np.arange(1, len(users) + 1, dtype=np.int64)
    idmaps = {
        "user": pa.table({"raw": users, "id": ids}),
        "item": pa.table({
            "kind": pa.array(["adgroup"] * A + ["brand"] * (len(brands) + 1)),
            "raw": pa.array(np.concatenate([adgroups, [0], brands]), pa.int64(),
                            mask=np.arange(A + 1 + len(brands)) == A),
            "id": np.arange(1, A + 2 + len(brands), dtype=np.int64),
        }),
        "cate": pa.table({"raw": cates, "id": np.arange(1, len(cates) + 1, dtype=np.int64)}),
    }
    for f, v in profile_vocab.items():
        idmaps[PROFILE_PREFIX + f] = pa.table({"raw": v, "id": np.arange(1, len(v) + 1, dtype=np.int64)})
    dropped = {"impressions_without_ad_feature": int(n_no_ad)}
    if o.candidates == "target":
        dropped["impressions_source_domain_candidate"] = int(n_src)
    return _Plan(
        profile_fields=AD_PROFILE_FIELDS, test_start=test_start, batches=batches,
        idmaps=idmaps, n_behaviours=int(n_beh), dropped=dropped,
        params={"raw_impressions": int(n_all), "test_day_start_ts": test_start},
        notes=[
            "behavior_log.csv has no item id: a behaviour's item is its brand (NULL brand -> one 'no brand' item id)",
            f"item ids: ad groups 1..{A}, no-brand {A + 1}, brands {A + 2}..{A + 1 + len(brands)} (disjoint ranges)",
            f"domains: raw category < {TARGET_CATE_BELOW} target, >= {TARGET_CATE_BELOW} source (LCN 5.1.1)",
            f"candidates={o.candidates}: "
            + ("only target-domain ads are impressions" if o.candidates == "target" else "every ad is an impression"),
            "ctx = btag (pv=1, cart=2, fav=3, buy=4); gap = floor(log2(ts - behaviour ts)) + 1, capped at 63",
            "test = last day of impressions (Beijing time), train = earlier days; sequences strictly before ts",
        ],
    )


# --- user-behavior


def _stage_user_behavior(con: duckdb.DuckDBPyConnection, path: Path, work: Path, o: TaobaoOptions) -> _Plan:
    d0 = dt.date.fromisoformat(o.start_date)
    lo = calendar.timegm(d0.timetuple()) - o.tz_offset_hours * 3600
    hi = lo + o.days * 86400
    test_start = hi - o.test_days * 86400
    log.info("user-behavior: staging under %s", work)
    stage = work / "beh.parquet"
    _sql(con, f"""
        COPY (
          SELECT user_id AS "user", item_id AS item,
                 CASE WHEN user_id IS NULL OR item_id IS NULL OR category_id IS NULL OR "timestamp" IS NULL
                      THEN {_fail(path, "'empty user_id, item_id, category_id or timestamp'")}
                      ELSE category_id END AS cate,
                 {_btag_case('behavior_type', 'behavior_type', path)} AS ctx,
                 "timestamp" AS ts,
                 ("timestamp" >= {lo} AND "timestamp" < {hi}) AS ok
          FROM {_read_csv(path, USER_BEHAVIOR_COLUMNS, False)}
        ) TO '{_sql_str(stage)}' (FORMAT parquet)""", path)
    n_all, n_ok = _sql(con, f"SELECT count(*), count(*) FILTER (WHERE ok) FROM {_pq(stage)}", path)[0]
    if n_ok == 0:
        raise ValueError(f"{path}: column 'timestamp': no rows within {o.start_date} + {o.days} days (Beijing time)")
    users = _sorted_ints(con, f"SELECT DISTINCT \"user\" FROM {_pq(stage)} WHERE ok ORDER BY 1")
    cates = _sorted_ints(con, f"SELECT DISTINCT cate FROM {_pq(stage)} WHERE ok ORDER BY 1")
    cat_tbl = _arrow(con, f"SELECT item, min(cate) AS cate FROM {_pq(stage)} WHERE ok GROUP BY item ORDER BY item")
    items = _col(cat_tbl, "item")
    item_cate = np.concatenate([[0], _rank(cates, _col(cat_tbl, "cate"), "cate")])  # dense item -> dense cate
    del cat_tbl
    n_items = len(items)
    stride = n_items + 1
    pos_ctx = np.array(sorted(BTAG_CTX[b] for b in o.positive_btags), np.int64)
    fields = UB_PROFILE_FIELDS if o.derive_profile else ()
    counters = {"negatives_unresolved": 0}

    def to_batch(t: pa.Table, rng: np.random.Generator) -> _Batch:
        ev = _Events(
            _rank(users, _col(t, "user"), "user"), _col(t, "ts"), _rank(items, _col(t, "item"), "item"),
            _rank(cates, _col(t, "cate"), "cate"), _col(t, "ctx"),
        )
        pos = np.flatnonzero(np.isin(ev.ctx, pos_ctx))
        if o.positive_fraction < 1.0:
            pos = pos[rng.random(len(pos)) < o.positive_fraction]
        pu, pt = ev.uid[pos], ev.ts[pos]
        # negatives: uniform over the catalogue, rejecting items of the user's whole log (batches hold whole users)
        seen = np.unique(ev.uid * stride + ev.item)
        nu = np.repeat(pu, o.neg_ratio)
        ni = rng.integers(1, n_items + 1, len(nu))
        bad = _isin_sorted(seen, nu * stride + ni)
        for _ in range(MAX_NEG_ROUNDS):
            if not bad.any():
                break
            idx = np.flatnonzero(bad)
            ni[idx] = rng.integers(1, n_items + 1, len(idx))
            bad[idx] = _isin_sorted(seen, nu[idx] * stride + ni[idx])
        counters["negatives_unresolved"] += int(bad.sum())
        keep = ~bad
        nu, ni, nt = nu[keep], ni[keep], np.repeat(pt, o.neg_ratio)[keep]
        uid = np.concatenate([pu, nu])
        profile: dict[str, np.ndarray] = {}
        if fields:
            users_b, inv = np.unique(ev.uid, return_inverse=True)
            in_train = ev.ts < test_start
            n_act = np.bincount(inv[in_train], minlength=len(users_b))
            n_buy = np.bincount(inv[in_train & (ev.ctx == BTAG_CTX["buy"])], minlength=len(users_b))
            at = np.searchsorted(users_b, uid)
            profile = {"activity": gap_bucket(n_act[at] + 1), "buys": gap_bucket(n_buy[at] + 1)}
        imp = _Impressions(
            uid=uid,
            ts=np.concatenate([pt, nt]),
            item=np.concatenate([ev.item[pos], ni]),
            cate=np.concatenate([ev.cate[pos], item_cate[ni]]),
            label=np.concatenate([np.ones(len(pu), np.int8), np.zeros(len(nu), np.int8)]),
            profile=profile,
        )
        return _Batch(None, ev, imp)

    def batches() -> Iterator[_Batch]:
        cur = con.cursor()
        try:
            beh = _stream(cur, f"""SELECT "user", item, cate, ctx, ts FROM {_pq(stage)}
                                   WHERE ok ORDER BY "user", ts, item, ctx""")
            for k, (bt, _) in enumerate(_by_user(beh, None, o.batch_rows)):
                if bt is not None and bt.num_rows:
                    yield to_batch(bt, np.random.default_rng([o.seed, k]))
        finally:
            cur.close()

    idmaps = {
        "user": pa.table({"raw": users, "id": np.arange(1, len(users) + 1, dtype=np.int64)}),
        "item": pa.table({"kind": pa.array(["item"] * n_items), "raw": items,
                          "id": np.arange(1, n_items + 1, dtype=np.int64), "cate_id": item_cate[1:]}),
        "cate": pa.table({"raw": cates, "id": np.arange(1, len(cates) + 1, dtype=np.int64)}),
    }
    return _Plan(
        profile_fields=fields, test_start=test_start, batches=batches, idmaps=idmaps,
        n_behaviours=int(n_ok), dropped={"rows_outside_days": int(n_all - n_ok)}, counters=counters,
        params={"valid_ts": [lo, hi], "test_start_ts": test_start},
        notes=[
            f"positives: every behaviour of type {'/'.join(o.positive_btags)} (label 1) at its own timestamp",
            f"negatives: {o.neg_ratio} per positive, uniform over the {n_items} catalogue items, seed {o.seed}, "
            "never an item in the user's log; same user, ts and sequences as the positive",
            f"days: (ts - {o.start_date} 00:00 UTC{o.tz_offset_hours:+d}) // 86400; rows outside days [0, {o.days}) "
            f"dropped; last {o.test_days} day(s) test",
            "single domain: st_src and ll hold the user's behaviours, st_tgt is empty",
            "ctx = behavior_type (pv=1, cart=2, fav=3, buy=4); gap = floor(log2(ts - behaviour ts)) + 1, capped at 63",
            ("profile: activity = 1 + floor(log2(1 + #behaviours)), buys = 1 + floor(log2(1 + #buys)), train days only"
             if fields else "profile: none"),
        ],
    )


def _isin_sorted(sorted_arr: np.ndarray, q: np.ndarray) -> np.ndarray:
    if len(sorted_arr) == 0:
        return np.zeros(len(q), bool)
    pos = np.minimum(np.searchsorted(sorted_arr, q), len(sorted_arr) - 1)
    return sorted_arr[pos] == q


# ----------------------------------------------------------------------------- sequences + writing


def _windows(ev: _Events | None, uid: np.ndarray, ts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per impression, (start, length) of the user's latest <= n behaviours with time < ts in ``ev``."""
    m = len(uid)
    if ev is None or n == 0 or len(ev.uid) == 0 or m == 0:
        return np.zeros(m, np.int64), np.zeros(m, np.int64)
    t0 = int(min(ev.ts.min(), ts.min()))
    span = int(max(ev.ts.max(), ts.max())) - t0 + 1
    if int(max(ev.uid.max(), uid.max())) + 1 > (2**62) // span:
        raise ValueError(f"timestamps span {span} s: too wide to key (user, ts) in int64")
    key_b = ev.uid * span + (ev.ts - t0)
    if len(key_b) > 1 and bool((key_b[1:] < key_b[:-1]).any()):
        raise RuntimeError("internal error: behaviours are not sorted by (user, ts)")
    end = np.searchsorted(key_b, uid * span + (ts - t0), side="left")  # first behaviour at/after ts
    first = np.searchsorted(key_b, uid * span, side="left")  # the user's first behaviour
    length = np.minimum(end - first, n)
    return end - length, length


def _gather(start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """List offsets and flat source indices for rows taking ev[start : start + length]."""
    offsets = np.zeros(len(length) + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    idx = np.arange(offsets[-1], dtype=np.int64) + np.repeat(start - offsets[:-1], length)
    return offsets, idx


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


class _ShardWriter:
    """Streams tables into ``<split>/part-NNNNN.parquet`` files of at most ``max_rows`` rows."""

    def __init__(self, root: Path, schema: pa.Schema, max_rows: int, compression: str):
        self.root, self.schema, self.max_rows, self.compression = root, schema, max_rows, compression
        self.root.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0

    def _open(self) -> None:
        path = self.root / f"part-{len(self.files):05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema, compression=self.compression)
        self.files.append(path)
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._in_file >= self.max_rows:
                self.close_file()
                self._open()
            n = min(self.max_rows - self._in_file, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, n))
            self._in_file += n
            self.rows += n
            offset += n

    def close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        if not self.files:  # an empty split still gets one (empty) shard
            self._open()
        self.close_file()


class _Stats:
    """Largest id seen per id space (vocab = max + 1) and sequence-length totals."""

    def __init__(self, profile_fields: tuple[str, ...]):
        self.max = {k: 0 for k in ("user", "item", "cate", "ctx", "gap")}
        self.max_profile = {f: 0 for f in profile_fields}
        self.ll_total = 0
        self.st_total = {"st_tgt": 0, "st_src": 0}

    def see(self, key: str, arr: np.ndarray) -> None:
        if len(arr):
            self.max[key] = max(self.max[key], int(arr.max()))


def _build(plan: _Plan, out: Path, variant: str, ll_len: int, st_len: int, o: TaobaoOptions) -> dict:
    schema = arrow_schema(list(plan.profile_fields))
    writers = {s: _ShardWriter(out / s, schema, o.shard_rows, o.compression) for s in SPLITS}
    stats = _Stats(plan.profile_fields)
    dropped_short = n_batches = 0
    try:
        for batch in plan.batches():
            n_batches += 1
            imp = batch.imp
            if o.min_history:
                _, ll_n = _windows(batch.src, imp.uid, imp.ts, ll_len)
                keep = ll_n >= o.min_history
                dropped_short += int((~keep).sum())
                imp = imp.take(keep)
            is_test = imp.ts >= plan.test_start
            for split, mask in (("train", ~is_test), ("test", is_test)):
                if mask.any():
                    _write_split(writers[split], schema, batch, imp.take(mask), ll_len, st_len, o, stats)
            if n_batches % 20 == 1:
                log.info("batch %d: %s rows so far", n_batches, {s: w.rows for s, w in writers.items()})
    finally:
        for w in writers.values():
            w.close()

    dropped = dict(plan.dropped, **plan.counters)
    if o.min_history:
        dropped["impressions_short_history"] = dropped_short
    idmap_dir = out / "idmap"
    idmap_dir.mkdir(exist_ok=True)
    for name, tbl in plan.idmaps.items():
        pq.write_table(tbl, idmap_dir / f"{name}.parquet")
    rows = {s: writers[s].rows for s in SPLITS}
    vocab = {k: v + 1 for k, v in stats.max.items()}
    manifest = Manifest(
        name=o.name or f"taobao-{variant}",
        vocab=vocab,
        profile_vocab={f: v + 1 for f, v in stats.max_profile.items()},
        max_len={"st": st_len, "ll": ll_len},
        domains="cross" if variant == "ad-click" else "single",
        splits={s: {"rows": n} for s, n in rows.items()},
        source={
            "generator": "raylsm.data.taobao",
            "variant": variant,
            "params": dict(
                asdict(o), ll_len=ll_len, st_len=st_len,
                positive_btags=list(o.positive_btags), **plan.params,
            ),
            "seed": o.seed,
            "dropped": dropped,
            "notes": plan.notes,
        },
    )
    manifest.write(out)
    n_total = rows["train"] + rows["test"]
    return {
        "out": str(out),
        "variant": variant,
        "rows": rows,
        "files": {s: [str(f) for f in writers[s].files] for s in SPLITS},
        "batches": n_batches,
        "behaviours": plan.n_behaviours,
        "dropped": dropped,
        "vocab": dict(vocab, profile=manifest.profile_vocab),
        "mean_ll_len": round(stats.ll_total / n_total, 2) if n_total else 0.0,
        "mean_st_len": {k: round(v / n_total, 2) if n_total else 0.0 for k, v in stats.st_total.items()},
    }


def _write_split(
    writer: _ShardWriter, schema: pa.Schema, part: _Batch, imp: _Impressions,
    ll_len: int, st_len: int, o: TaobaoOptions, stats: _Stats,
) -> None:
    """Build the sequences of ``imp`` chunk by chunk (bounded list elements) and write them."""
    seqs = {
        "st_tgt": (part.tgt, *_windows(part.tgt, imp.uid, imp.ts, st_len)),
        "st_src": (part.src, *_windows(part.src, imp.uid, imp.ts, st_len)),
        "ll": (part.src, *_windows(part.src, imp.uid, imp.ts, ll_len)),
    }
    weight = 1 + sum(length for _, _, length in seqs.values())
    cum = np.cumsum(weight)
    n = len(imp.uid)
    a = 0
    while a < n:
        base = cum[a - 1] if a else 0
        b = int(np.searchsorted(cum, base + o.chunk_elements, side="right"))
        b = min(max(b, a + 1), a + o.shard_rows, n)
        sl = slice(a, b)
        cols: dict[str, pa.Array] = {
            "user_id": pa.array(imp.uid[sl]),
            "item_id": pa.array(imp.item[sl]),
            "item_cate": pa.array(imp.cate[sl]),
            "label": pa.array(imp.label[sl], pa.int8()),
            "ts": pa.array(imp.ts[sl]),
        }
        stats.see("user", imp.uid[sl])
        stats.see("item", imp.item[sl])
        stats.see("cate", imp.cate[sl])
        for f in stats.max_profile:
            v = imp.profile[f][sl]
            cols[PROFILE_PREFIX + f] = pa.array(v)
            if len(v):
                stats.max_profile[f] = max(stats.max_profile[f], int(v.max()))
        for name, (ev, start, length) in seqs.items():
            offsets, idx = _gather(start[sl], length[sl])
            items = ev.item[idx] if ev is not None else np.zeros(0, np.int64)
            cates = ev.cate[idx] if ev is not None else np.zeros(0, np.int64)
            stats.see("item", items)
            stats.see("cate", cates)
            if name == "ll":
                stats.ll_total += int(offsets[-1])
                ctx = ev.ctx[idx] if ev is not None else np.zeros(0, np.int64)
                ts_rep = np.repeat(imp.ts[sl], length[sl])
                gap = gap_bucket(ts_rep - ev.ts[idx]) if ev is not None else np.zeros(0, np.int64)
                del ts_rep
                stats.see("ctx", ctx)
                stats.see("gap", gap)
                cols.update(ll_items=_list(offsets, items), ll_cates=_list(offsets, cates),
                            ll_ctx=_list(offsets, ctx), ll_gap=_list(offsets, gap))
            else:
                stats.st_total[name] += int(offsets[-1])
                cols[f"{name}_items"] = _list(offsets, items)
                cols[f"{name}_cates"] = _list(offsets, cates)
        writer.write(pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema))
        a = b

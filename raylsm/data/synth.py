"""Seeded generator of synthetic contract-v1 datasets with planted, documented effects.

``generate(out, ...)`` writes ``<out>/manifest.json`` and ``<out>/{train,test}/part-NNNNN.parquet``
(docs/design.md, "Dataset contract"). Every random draw is a counter-based hash (SplitMix64) of ``(seed, stream, key)``, so a
user's behaviour timeline is a *fixed property of the user*: impressions of one user at different
times see prefixes of the same timeline. Same config → byte-identical shards; the rows themselves do
not depend on the chunk size (only the row groups do).
Work is vectorised numpy over chunks of rows, written with one ``pq.ParquetWriter`` per shard, so
memory is bounded by one chunk (plus the users' timelines, materialised once when they fit
``cache_elems`` values; otherwise rows are hashed directly — same values either way).

Planted effects (defaults in brackets):

* **Hidden interests, cross-domain bridge.** ``interests`` [32] hidden topics; every item and every
  category belongs to one. In ``cross`` mode the target domain (candidates, ``st_tgt_*``) and the
  source domain (``ll_*``, ``st_src_*``) use **disjoint item and category id ranges**
  (target items ``1..tgt_items`` [10k], source items after them [50k]; ``cates_per_interest`` [4]
  categories per interest and domain); only the hidden interests are shared. In ``single`` mode
  (CAIN's setting) one item space [``src_items``] serves candidates, ``ll_*`` and ``st_src_*``, and
  ``st_tgt_*`` are empty lists.
* **Users.** Profile ``age`` 1..7, ``gender`` 1..2 (each 0 = unknown w.p. 0.1), ``activity`` 1..4.
  Each user has ``long_interests`` [3] *real* long-term interests (drawn from an (age, gender)
  dependent popularity) and ``decoy_interests`` [2] interests they browse a lot but do not like.
  **Current mix (drift):** per window of ``window_sessions`` [10] sessions the user has 2 current
  interests, each a long-term one w.p. ``mix_long`` [0.7], else a random transient one.
* **Lifelong timeline (``ll_*``, source domain), sessions/bursts.** Sessions of 4..12 behaviours (per
  user), one a minute, hours to a day apart (the rate is set by activity so a user has ≈ 0.6/1.2/2/4 ×
  ``ll_len`` behaviours over a full ``history_days`` [60] history; histories start 30–100 % of it
  before day 0). A session is *real* w.p. ``p_real`` [0.4] (focus = a current interest), *decoy*
  w.p. ``p_decoy`` [0.4] (focus = a decoy interest) or *random* [0.2]. A behaviour is a focus item
  w.p. ``focus`` [0.5], else a feed item of a uniform interest. Each decoy interest fills ≈ 12 % of a
  lifelong sequence, each long-term interest only ≈ 7 %: frequency alone points the wrong way, and
  only a small minority of the ``ll_len`` [500] behaviours share a given candidate's interest.
* **Context effect (``ll_ctx``: 1 skip, 2 view, 3 long-view, 4 like).** A real session is engaged
  (3/4), decoy and random sessions are not (1/2). Feed items show the session's engagement (own ctx
  randomised w.p. ``feed_ctx_noise`` [0.1]); focus items' own ctx is randomised (uniform 1..4) w.p.
  ``ctx_noise`` by activity [0.6, 0.7, 0.8, 0.9]. So a focus item's own ctx is a weak witness
  (P(ctx ≥ 3) ≈ 0.62 real vs 0.38 decoy), while its session neighbours tell (≈ 0.95 vs 0.05):
  counting the lifelong items of the candidate's interest weighted by their neighbours'
  engagement predicts the label far better than weighting by their own ctx (a TCN's job; the
  noise level depends on the profile, which PEG can use).
* **``ll_gap``** = 1 + ⌊g · log2(1 + Δt / 1 min)⌋ with Δt = ``ts`` − behaviour time and g such that
  the oldest possible behaviour lands in bucket ``gap_buckets`` − 1 [63].
* **Short-term sequences.** ``st_src_*`` = the last ``st_len`` [50] behaviours of the lifelong
  timeline (the tail of ``ll_*``). ``st_tgt_*`` = the last ``st_len`` target-domain behaviours:
  1..3 (per user) right after each session, each an item of a *current* interest w.p. 1 −
  ``st_noise`` [0.8]. Co-occurring ``st_tgt`` and ``st_src`` items of a user thus share the user's
  current interests although their ids are disjoint — what LCN's contrastive CRP can align.
* **Impressions and labels.** A row draws a user (weight ∝ activity) and ``ts`` uniform over days
  0..``train_days``−1 [0..6] (train) or the next ``test_days`` [1] (test), so every test ``ts`` is
  later than every train ``ts``; all sequences hold only behaviours strictly before ``ts``, oldest
  first. The candidate's interest k is a long-term interest w.p. 0.25, a current one w.p. 0.2, a
  decoy w.p. 0.2, else uniform (``cand_mix``), and
  ``P(click) = σ(−3.0 + 1.8·[k long-term] + 1.5·[k current] + b_item + b_user)``, b ~ N(0, 0.3)
  (``base_logit``, ``w_long``, ``w_current``, ``*_bias_std``). Decoys get no uplift. Base CTR ≈
  0.22; CTR ≈ 0.44 vs 0.07 for long-term vs other candidates, ≈ 0.50 vs 0.10 for current vs other.

Effect switches and the mechanism each one rewards (all on by default):

* ``bridge`` (``--bridge on|off``). On: ``st_tgt`` holds the user's current interests, so
  target and source items that co-occur in one impression's short-term sequences share a hidden
  interest — the only link between the disjoint id spaces besides the labels. Rewards LCN's CRP
  (cross-domain pairs). Off: ``st_tgt`` items are of uniform random interests (``st_noise`` = 1):
  nothing co-occurs, CRP has nothing to align (and the short-term target signal is gone as well).
* ``context_effect`` (``--context-effect on|off``). On: a session's engagement (``ll_ctx`` 3/4 vs
  1/2) says whether it is real or decoy. Rewards a context encoder (CAIN's TCN: neighbours'
  engagement) and context-aware attention (MSA/FSA, TWIN's cross features). Off: each session is
  engaged with probability ``p_real`` regardless of its kind, so ctx carries no information.
  Where it pays most: ``--domains single`` (CAIN's setting) with ``--ctx-noise 1``. There the
  candidate and the lifelong behaviours share one id space, so retrieving the behaviours of the
  candidate's interest is exact and what is left to tell is real vs decoy: the engagement of the
  neighbours. In ``cross`` mode retrieval first needs the learned bridge, and the context effect
  shows far less (docs/experiments.md, "CAIN's own setting: one item space").
* Frequency gap (``--p-real``, ``--p-decoy``): the share of real (liked) and decoy sessions. With
  the defaults (0.4 / 0.4 over 2 current and 2 decoy interests) each decoy interest fills more of
  the lifelong sequence than each liked one, so counting matching behaviours alone (DIN) is misled;
  ``--p-decoy 0`` makes counting suffice, ``--p-real 0.7 --p-decoy 0.1`` makes liked interests the
  frequent ones. The world size (``--interests``, ``--cates-per-interest``, ``--tgt-items``,
  ``--src-items``) sets how many rows a model needs to learn the bridge.
* Short-term noise (``--st-noise`` [0.2]): the share of ``st_tgt`` items of a random interest. The
  short-term target sequence is a shortcut: at 0.2 it alone ranks with AUC ≈ 0.74 at ``ll_len`` 100,
  leaving the lifelong sequence ≈ +0.01 and the context effect ≈ +0.004 on top (a logistic model on
  the hidden-interest counts). At 0.8 the shortcut falls to ≈ 0.64 and the lifelong sequence with its
  neighbours' engagement adds ≈ +0.06 (+0.03 of it from the neighbours), so a context encoder has
  something to find; the bridge weakens with it (fewer co-occurring pairs share an interest).
* Session focus (``--focus`` [0.5]): the share of a session's behaviours of its focus interest. At 0.5 a
  window also sees *topic*: a behaviour whose neighbours share its interest is a focus item, a lone
  one a feed item of a random interest, a signal even with the context effect off. At 1 every
  behaviour of a session shares its interest, so topic says nothing; but then the behaviours of the
  candidate's interest are the session itself, and their own engagement, summed, already tells real
  from decoy sessions (the neighbours add ≈ 0: 0.640 / 0.651 / 0.691 / 0.692 at ``--st-noise 0.8``).

Measured on 20k rows (seed 0, defaults): the true click probability ranks with AUC ≈ 0.84; "how many of
the last 20 ``st_tgt`` items share the candidate's interest" ≈ 0.75 (same category ≈ 0.73);
lifelong items of the candidate's interest, raw count ≈ 0.57, own ctx ≥ 3 ≈ 0.61, neighbours' mean
ctx ≥ 2.5 (±3 positions) ≈ 0.69.

Manifest vocab sizes are max id + 1 over the written rows (docs/design.md, "Dataset contract").
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raylsm.data.atomic import rebase, write_dataset
from raylsm.data.contract import PROFILE_PREFIX, Manifest, arrow_schema

GENERATOR = "raylsm.data.synth"
PROFILE_FIELDS: tuple[str, ...] = ("age", "gender", "activity")
T_BASE = 1_700_006_400  # 2023-11-15 00:00 UTC: start of day 0
DAY = 86_400
STEP = 60  # seconds between consecutive behaviours of a session
CTX_SKIP, CTX_VIEW, CTX_LONG_VIEW, CTX_LIKE = 1, 2, 3, 4

# Hash streams (independent random sources).
_S_SESSION, _S_MIX, _S_BEHAVIOUR, _S_TARGET, _S_ROW_USER, _S_ROW_TS, _S_ROW_CAND, _S_ROW_LABEL = range(1, 9)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


@dataclass
class SynthConfig:
    """Parameters of the generator; the first seven are the CLI options of ``raylsm data synth``."""

    users: int = 2000
    rows: int = 100_000
    ll_len: int = 500
    st_len: int = 50
    shards: int = 4
    domains: str = "cross"
    seed: int = 0
    # world
    interests: int = 32
    long_interests: int = 3
    decoy_interests: int = 2
    cates_per_interest: int = 4
    tgt_items: int = 10_000
    src_items: int = 50_000
    train_days: int = 7
    test_days: int = 1
    history_days: int = 60
    window_sessions: int = 10
    p_real: float = 0.4
    p_decoy: float = 0.4
    focus: float = 0.5
    mix_long: float = 0.7
    st_noise: float = 0.2
    # Effect switches (each one isolates the mechanism that needs it; see the module docstring).
    bridge: bool = True  # False: st_tgt items are of uniform random interests (no cross-domain co-occurrence)
    context_effect: bool = True  # False: a session's engagement (ctx) is drawn independently of its kind
    ctx_noise: tuple[float, float, float, float] = (0.6, 0.7, 0.8, 0.9)
    feed_ctx_noise: float = 0.1
    gap_buckets: int = 64
    # labels
    cand_mix: tuple[float, float, float] = (0.25, 0.2, 0.2)
    base_logit: float = -3.0
    w_long: float = 1.8
    w_current: float = 1.5
    item_bias_std: float = 0.3
    user_bias_std: float = 0.3
    # output
    chunk_elems: int = 3_000_000
    cache_elems: int = 30_000_000
    compression: str = "zstd"

    def __post_init__(self) -> None:
        self.ctx_noise = tuple(float(x) for x in self.ctx_noise)  # type: ignore[assignment]
        self.cand_mix = tuple(float(x) for x in self.cand_mix)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message naming the first bad option."""

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}: must be {what}, got {getattr(self, name)!r}")

        def is_int(x: object) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        for name, lo in (("users", 1), ("rows", 1), ("ll_len", 0), ("st_len", 0), ("shards", 1), ("seed", 0),
                         ("interests", 2), ("long_interests", 1), ("decoy_interests", 1), ("cates_per_interest", 1),
                         ("train_days", 1), ("test_days", 1), ("history_days", 1), ("window_sessions", 1),
                         ("gap_buckets", 3), ("chunk_elems", 1), ("cache_elems", 0)):
            need(is_int(getattr(self, name)) and getattr(self, name) >= lo, name, f"an integer >= {lo}")
        need(self.users < 2**31, "users", "< 2**31")
        need(self.chunk_elems <= 2**30, "chunk_elems", "<= 2**30 (list offsets are int32)")
        need(self.ll_len <= 1_000_000, "ll_len", "<= 1000000")
        need(self.st_len <= 1_000_000, "st_len", "<= 1000000")
        need(self.seed < 2**63, "seed", "< 2**63")
        need(self.domains in ("cross", "single"), "domains", "'cross' or 'single'")
        need(self.long_interests + self.decoy_interests < self.interests, "interests",
             "> long_interests + decoy_interests")
        for name in ("tgt_items", "src_items"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= self.interests, name,
                 f"an integer >= interests ({self.interests})")
        for name in ("p_real", "p_decoy", "focus", "mix_long", "st_noise", "feed_ctx_noise"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")
        need(self.p_real + self.p_decoy <= 1.0, "p_decoy", "<= 1 - p_real")
        for name in ("bridge", "context_effect"):
            need(isinstance(getattr(self, name), (bool, np.bool_)), name, "a boolean (on/off)")
        need(len(self.ctx_noise) == 4 and all(0 <= q <= 1 for q in self.ctx_noise), "ctx_noise",
             "4 probabilities (activity 1..4)")
        need(len(self.cand_mix) == 3 and all(p >= 0 for p in self.cand_mix) and sum(self.cand_mix) <= 1,
             "cand_mix", "3 probabilities (long, current, decoy) summing to <= 1")
        need(self.compression in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"), "compression",
             "one of zstd, snappy, gzip, lz4, brotli, none")

    @property
    def name(self) -> str:
        return "synthetic-cross-domain" if self.domains == "cross" else "synthetic-single-domain"

    @property
    def split_rows(self) -> dict[str, int]:
        """Rows per split: train gets ``train_days / (train_days + test_days)`` of them (at least 1)."""
        train = max(1, round(self.rows * self.train_days / (self.train_days + self.test_days)))
        train = min(train, self.rows)
        return {"train": train, "test": self.rows - train}


# ----------------------------------------------------------------------------- hashing


def _salt(seed: int, stream: int) -> np.uint64:
    """A 64-bit salt for one (seed, stream) pair (SplitMix64 of a Python int)."""
    z = (seed * 0x2545F4914F6CDD1D + stream * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return np.uint64(z ^ (z >> 31))


def _hash(key: np.ndarray, salt: np.uint64) -> np.ndarray:
    """SplitMix64 finaliser of ``key ^ salt`` (uint64, element-wise); a counter-based RNG."""
    z = np.bitwise_xor(key.astype(np.uint64, copy=False), salt)
    z += _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def _key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pack (a < 2**31, b < 2**32) into one uint64 key."""
    return (a.astype(np.uint64) << np.uint64(32)) | b.astype(np.uint64)


def _bits(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    """``width`` bits of ``h`` starting at bit ``shift``, as int64."""
    return ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).view(np.int64)


def _below(x: np.ndarray, width: int, n: int) -> np.ndarray:
    """Map uniform ``width``-bit ints to uniform-ish ints in [0, n) (multiply-shift, no division)."""
    return (x * n) >> width


def _unit(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- world


@dataclass
class Domain:
    """One item space: ids grouped by interest (popular first), their categories and interests."""

    by_interest: np.ndarray  # (n_items,) item ids sorted by interest, then popularity
    offsets: np.ndarray  # (interests + 1,) start of each interest in ``by_interest``

    def pick(self, interest: np.ndarray, u24: np.ndarray) -> np.ndarray:
        """An item of each ``interest``; ``u24`` uniform 24-bit ints, squared for a popularity skew."""
        lo = self.offsets[interest]
        count = self.offsets[interest + 1] - lo
        r = (u24 * u24) >> 24
        return self.by_interest[lo + ((r * count) >> 24)]


@dataclass
class World:
    """The hidden generative state: item tables and per-user tables (index 0 unused)."""

    cfg: SynthConfig
    item_interest: np.ndarray  # (max item id + 1,) interest of each item, -1 for id 0
    item_cate: np.ndarray  # (max item id + 1,) category of each item, 0 for id 0
    cate_interest: np.ndarray  # (max cate id + 1,) interest of each category, -1 for id 0
    item_bias: np.ndarray  # (max item id + 1,) float64 click-logit offset
    target: Domain  # candidates and st_tgt
    source: Domain  # ll and st_src
    profile: np.ndarray  # (users + 1, 3) age, gender, activity
    long: np.ndarray  # (users + 1, long_interests) real long-term interests
    decoy: np.ndarray  # (users + 1, decoy_interests)
    sess_len: np.ndarray  # (users + 1,) behaviours per session
    tgt_per_session: np.ndarray  # (users + 1,) target behaviours after each session (0 in single mode)
    t0: np.ndarray  # (users + 1,) start of the user's timeline (seconds)
    interval: np.ndarray  # (users + 1,) seconds between session slots
    ctx_noise_q: np.ndarray  # (users + 1,) P(own ctx randomised) scaled to 0..256
    user_bias: np.ndarray  # (users + 1,)
    user_cdf: np.ndarray  # (users,) cumulative impression weight
    gap_scale: float
    cache: "Timelines | None" = None


def _domain(rng: np.random.Generator, n_items: int, id0: int, cate0: int, cfg: SynthConfig,
            item_interest: np.ndarray, item_cate: np.ndarray, cate_interest: np.ndarray) -> Domain:
    """Create ``n_items`` items with ids ``id0..`` and categories ``cate0..``; fill the lookup tables."""
    k = cfg.interests
    interest = np.concatenate([np.arange(k), rng.integers(0, k, n_items - k)])
    rng.shuffle(interest)
    ids = np.arange(id0, id0 + n_items)
    n_cates = k * cfg.cates_per_interest
    cate_ids = cate0 + rng.permutation(n_cates)  # cate slot (interest, sub) -> hidden id
    cate_interest[cate_ids] = np.repeat(np.arange(k), cfg.cates_per_interest)
    sub = rng.integers(0, cfg.cates_per_interest, n_items)
    item_interest[ids] = interest
    item_cate[ids] = cate_ids[interest * cfg.cates_per_interest + sub]
    popularity = rng.permutation(n_items)
    order = np.lexsort((popularity, interest))
    offsets = np.searchsorted(interest[order], np.arange(k + 1))
    return Domain(by_interest=ids[order], offsets=offsets.astype(np.int64))


def build_world(cfg: SynthConfig) -> World:
    """The deterministic hidden state for ``cfg`` (O(items + users · interests) memory)."""
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    k, cpi = cfg.interests, cfg.cates_per_interest
    cross = cfg.domains == "cross"
    n_items = cfg.tgt_items + cfg.src_items if cross else cfg.src_items
    n_cates = (2 if cross else 1) * k * cpi
    item_interest = np.full(n_items + 1, -1, np.int64)
    item_cate = np.zeros(n_items + 1, np.int64)
    cate_interest = np.full(n_cates + 1, -1, np.int64)
    if cross:
        target = _domain(rng, cfg.tgt_items, 1, 1, cfg, item_interest, item_cate, cate_interest)
        source = _domain(rng, cfg.src_items, 1 + cfg.tgt_items, 1 + k * cpi, cfg, item_interest, item_cate,
                         cate_interest)
    else:
        target = source = _domain(rng, cfg.src_items, 1, 1, cfg, item_interest, item_cate, cate_interest)
    item_bias = rng.normal(0.0, cfg.item_bias_std, n_items + 1)

    u = cfg.users
    age = np.where(rng.random(u) < 0.1, 0, rng.integers(1, 8, u))
    gender = np.where(rng.random(u) < 0.1, 0, rng.integers(1, 3, u))
    activity = 1 + np.searchsorted(np.cumsum([0.2, 0.3, 0.3, 0.2]), rng.random(u), side="right")
    activity = np.minimum(activity, 4)
    group_logw = np.log(rng.dirichlet(np.full(k, 0.5), size=24) + 1e-12)  # (age, gender) -> interest popularity
    group = age * 3 + gender
    long = np.empty((u, cfg.long_interests), np.int64)
    decoy = np.empty((u, cfg.decoy_interests), np.int64)
    block = 1 << 16
    for lo in range(0, u, block):  # Gumbel top-k, in blocks so memory stays O(block · interests)
        hi = min(u, lo + block)
        score = group_logw[group[lo:hi]] + rng.gumbel(size=(hi - lo, k))
        top = np.argsort(-score, axis=1)
        long[lo:hi] = top[:, : cfg.long_interests]
        rest = rng.random((hi - lo, k))
        np.put_along_axis(rest, long[lo:hi], -1.0, axis=1)
        decoy[lo:hi] = np.argsort(-rest, axis=1)[:, : cfg.decoy_interests]
    sess_len = rng.integers(4, 13, u)
    tgt_per_session = rng.integers(1, 4, u) if cross else np.zeros(u, np.int64)
    hist_days = cfg.history_days * rng.uniform(0.3, 1.0, u)
    factor = np.array([0.0, 0.6, 1.2, 2.0, 4.0])[activity]
    sessions_full = np.maximum(1.0, max(cfg.ll_len, 1) * factor / sess_len)  # sessions over a full history
    duration = (sess_len + tgt_per_session) * STEP
    interval = np.maximum(cfg.history_days * DAY / sessions_full, 2 * duration + 600).astype(np.int64)
    t0 = T_BASE - (hist_days * DAY).astype(np.int64)
    q = np.array([0.0, *cfg.ctx_noise])[activity]
    user_bias = rng.normal(0.0, cfg.user_bias_std, u)
    weight = activity.astype(np.float64)
    cdf = np.cumsum(weight) / weight.sum()
    span_min = (cfg.history_days + cfg.train_days + cfg.test_days) * DAY / 60
    gap_scale = (cfg.gap_buckets - 2) / math.log2(1 + span_min)

    def pad(a: np.ndarray, fill: int | float = 0) -> np.ndarray:
        return np.concatenate([np.full((1, *a.shape[1:]), fill, a.dtype), a])

    world = World(
        cfg=cfg, item_interest=item_interest, item_cate=item_cate, cate_interest=cate_interest, item_bias=item_bias,
        target=target, source=source,
        profile=pad(np.stack([age, gender, activity], 1).astype(np.int64)),
        long=pad(long), decoy=pad(decoy), sess_len=pad(sess_len.astype(np.int64), 1),
        tgt_per_session=pad(tgt_per_session.astype(np.int64)), t0=pad(t0, T_BASE), interval=pad(interval, DAY),
        ctx_noise_q=pad(np.round(q * 256).astype(np.int64)), user_bias=pad(user_bias), user_cdf=cdf,
        gap_scale=gap_scale,
    )
    world.cache = _materialise(world)
    return world


# ----------------------------------------------------------------------------- timelines


def _current_interest(world: World, u: np.ndarray, window: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Interest in ``slot`` (0/1) of user ``u``'s current mix in session window ``window``."""
    cfg = world.cfg
    h = _hash(_key(u, 2 * window + slot), _salt(cfg.seed, _S_MIX))
    from_long = _bits(h, 0, 16) < round(cfg.mix_long * 65536)
    long_pick = world.long[u, _below(_bits(h, 16, 16), 16, cfg.long_interests)]
    return np.where(from_long, long_pick, _below(_bits(h, 32, 16), 16, cfg.interests))


def _session_hash(world: World, u: np.ndarray, s: np.ndarray) -> np.ndarray:
    return _hash(_key(u, s), _salt(world.cfg.seed, _S_SESSION))


def _session_start(world: World, u: np.ndarray, s: np.ndarray, hs: np.ndarray | None = None) -> np.ndarray:
    """Start time of session slot ``s``: slot start plus a jitter in [0, interval/4)."""
    if hs is None:
        hs = _session_hash(world, u, s)
    iv = world.interval[u]
    return world.t0[u] + s * iv + ((_bits(hs, 40, 24) * (iv // 4)) >> 24)


def counts_before(world: World, u: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source behaviours, target behaviours, current session slot) of each user strictly before ``ts``."""
    s0 = (ts - world.t0[u]) // world.interval[u]  # sessions < s0 ended before ts
    start = _session_start(world, u, s0)
    n_len, n_tgt = world.sess_len[u], world.tgt_per_session[u]
    src = np.clip(-((start - ts) // STEP), 0, n_len)  # ceil((ts - start) / STEP) behaviours started before ts
    tgt = np.clip(-((start + n_len * STEP - ts) // STEP), 0, n_tgt)
    return s0 * n_len + src, s0 * n_tgt + tgt, s0


def source_timeline(world: World, u: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Lifelong behaviour number ``pos`` of user ``u`` (element-wise): observable and hidden values.

    Returns ``items``, ``cates``, ``ctx``, ``time`` and the hidden ``kind`` (0 real, 1 decoy, 2 random
    session), ``topic`` (the session's focus interest, else a feed item) and ``interest``.
    """
    cfg = world.cfg
    sl = world.sess_len[u]
    s = pos // sl
    hs = _session_hash(world, u, s)
    kind_u = _bits(hs, 0, 16)
    kind = (kind_u >= round(cfg.p_real * 65536)).astype(np.int8)
    kind += kind_u >= round((cfg.p_real + cfg.p_decoy) * 65536)
    pick = _bits(hs, 17, 16)
    interest = np.where(kind == 1, world.decoy[u, _below(pick, 16, cfg.decoy_interests)],
                        _below(pick, 16, cfg.interests))
    real = kind == 0
    interest[real] = _current_interest(world, u[real], s[real] // cfg.window_sessions, _bits(hs[real], 16, 1))
    hb = _hash(_key(u, pos), _salt(cfg.seed, _S_BEHAVIOUR))
    topic = _bits(hb, 0, 12) < round(cfg.focus * 4096)
    interest = np.where(topic, interest, _below(_bits(hb, 12, 16), 16, cfg.interests))
    items = world.source.pick(interest, _bits(hb, 28, 24))
    noise_q = np.where(topic, world.ctx_noise_q[u], round(cfg.feed_ctx_noise * 256))
    randomised = _bits(hb, 52, 8) < noise_q
    if cfg.context_effect:
        liked = real
    else:  # engagement drawn per session with the same rate, independent of the session's kind
        liked = _bits(hs, 33, 7) < round(cfg.p_real * 128)
    engaged = np.where(liked, CTX_LONG_VIEW, CTX_SKIP) + _bits(hb, 62, 1)
    ctx = np.where(randomised, 1 + _bits(hb, 60, 2), engaged)
    time_ = _session_start(world, u, s, hs) + (pos - s * sl) * STEP
    return {"items": items, "cates": world.item_cate[items], "ctx": ctx, "time": time_, "kind": kind,
            "topic": topic, "interest": interest}


def target_timeline(world: World, u: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Target-domain behaviour number ``pos`` of user ``u`` (element-wise): ``items``, ``cates``, ``interest``."""
    cfg = world.cfg
    s = pos // np.maximum(world.tgt_per_session[u], 1)
    h = _hash(_key(u, pos), _salt(cfg.seed, _S_TARGET))
    interest = _current_interest(world, u, s // cfg.window_sessions, _bits(h, 0, 1))
    noise = _bits(h, 1, 12) < round((cfg.st_noise if cfg.bridge else 1.0) * 4096)
    interest = np.where(noise, _below(_bits(h, 13, 16), 16, cfg.interests), interest)
    items = world.target.pick(interest, _bits(h, 32, 24))
    return {"items": items, "cates": world.item_cate[items], "interest": interest}


@dataclass
class Timelines:
    """Every user's timeline up to the last impression day, materialised (identical to the hash path)."""

    src_base: np.ndarray  # (users + 2,) user u's behaviours are src_*[src_base[u]:src_base[u + 1]]
    src_items: np.ndarray
    src_cates: np.ndarray
    src_ctx: np.ndarray
    src_time: np.ndarray
    tgt_base: np.ndarray
    tgt_items: np.ndarray
    tgt_cates: np.ndarray


def _materialise(world: World) -> Timelines | None:
    """All users' timelines if they fit ``cfg.cache_elems`` values, else None (then rows hash directly)."""
    cfg = world.cfg
    users = np.arange(cfg.users + 1)
    end = np.full(len(users), T_BASE + (cfg.train_days + cfg.test_days) * DAY, np.int64)
    n_src, n_tgt, _ = counts_before(world, users, end)
    n_src[0] = n_tgt[0] = 0
    if int(n_src.sum() + n_tgt.sum()) > cfg.cache_elems:
        return None
    parts: dict[str, np.ndarray] = {}
    for name, n, fn, keys in (("src", n_src, source_timeline, ("items", "cates", "ctx", "time")),
                              ("tgt", n_tgt, target_timeline, ("items", "cates"))):
        base = np.zeros(len(users) + 1, np.int64)
        np.cumsum(n, out=base[1:])
        parts[f"{name}_base"] = base
        arrays = {k: np.empty(base[-1], np.int64 if k == "time" else np.int32 if k != "ctx" else np.int8)
                  for k in keys}
        lo = 0
        while lo < len(users):  # blocks of users, each at most ~chunk_elems behaviours
            hi = max(lo + 1, int(np.searchsorted(base, base[lo] + cfg.chunk_elems, side="right")) - 1)
            hi = min(hi, len(users))
            m = n[lo:hi]
            uf = np.repeat(users[lo:hi], m)
            pos = _ranges(m, np.zeros_like(m))
            values = fn(world, uf, pos)
            for k in keys:
                arrays[k][base[lo]:base[hi]] = values[k]
            lo = hi
        parts.update({f"{name}_{k}": v for k, v in arrays.items()})
    return Timelines(**parts)


def _ranges(m: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Concatenated ``start[i] .. start[i] + m[i] - 1`` for every i (flat, int64)."""
    offsets = np.cumsum(m) - m
    return np.arange(int(m.sum()), dtype=np.int64) + np.repeat(start - offsets, m)


def _offsets(m: np.ndarray) -> np.ndarray:
    out = np.zeros(len(m) + 1, np.int64)
    np.cumsum(m, out=out[1:])
    return out


def _gap(world: World, dt: np.ndarray) -> np.ndarray:
    """Log-scaled time-gap bucket of ``dt`` seconds (1 .. gap_buckets - 1)."""
    minutes = dt.astype(np.float32) * np.float32(1 / 60)
    gap = np.log2(minutes + np.float32(1))
    gap *= np.float32(world.gap_scale)
    return np.minimum(gap.astype(np.int64) + 1, world.cfg.gap_buckets - 1)


def source_behaviours(world: World, u: np.ndarray, ts: np.ndarray, n: np.ndarray, length: int,
                      context: bool = True) -> dict[str, np.ndarray]:
    """The last ``length`` lifelong behaviours before ``ts`` (``n`` of them exist) of each row, flattened.

    Returns ``offsets`` (B+1,) and flat ``items``, ``cates`` (+ ``ctx``, ``gap`` with ``context``).
    """
    m = np.minimum(n, length)
    out = {"offsets": _offsets(m)}
    cache = world.cache
    if cache is not None:
        idx = _ranges(m, cache.src_base[u] + n - m)
        values = {"items": cache.src_items[idx], "cates": cache.src_cates[idx]}
        if context:
            values["ctx"] = cache.src_ctx[idx]
            values["time"] = cache.src_time[idx]
    else:
        values = source_timeline(world, np.repeat(u, m), _ranges(m, n - m))
    out["items"], out["cates"] = values["items"], values["cates"]
    if context:
        out["ctx"] = values["ctx"]
        out["gap"] = _gap(world, np.repeat(ts, m) - values["time"])
    return out


def target_behaviours(world: World, u: np.ndarray, n: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """The last ``length`` target-domain behaviours (``n`` exist before ts) of each row, flattened."""
    m = np.minimum(n, length)
    cache = world.cache
    if cache is not None:
        idx = _ranges(m, cache.tgt_base[u] + n - m)
        items, cates = cache.tgt_items[idx], cache.tgt_cates[idx]
    else:
        values = target_timeline(world, np.repeat(u, m), _ranges(m, n - m))
        items, cates = values["items"], values["cates"]
    return {"offsets": _offsets(m), "items": items, "cates": cates}


# ----------------------------------------------------------------------------- rows


def impressions(world: World, r0: int, r1: int, split: str) -> dict[str, np.ndarray]:
    """Rows ``r0..r1-1`` (global row index) of ``split``: user, ts, candidate, label and hidden state."""
    cfg = world.cfg
    r = np.arange(r0, r1, dtype=np.uint64)
    u = 1 + np.searchsorted(world.user_cdf, _unit(_hash(r, _salt(cfg.seed, _S_ROW_USER))), side="right")
    u = np.minimum(u, cfg.users).astype(np.int64)
    day0, days = (0, cfg.train_days) if split == "train" else (cfg.train_days, cfg.test_days)
    ts = T_BASE + day0 * DAY + (_hash(r, _salt(cfg.seed, _S_ROW_TS)) % np.uint64(days * DAY)).astype(np.int64)
    n_src, n_tgt, s0 = counts_before(world, u, ts)
    window = s0 // cfg.window_sessions
    current = np.stack([_current_interest(world, u, window, np.full_like(u, j)) for j in (0, 1)], 1)

    hc = _hash(r, _salt(cfg.seed, _S_ROW_CAND))
    src = _bits(hc, 0, 16) * (1.0 / 65536)  # which source the candidate's interest comes from
    p_long, p_cur, p_dec = cfg.cand_mix
    which = _bits(hc, 16, 8)
    k = _bits(hc, 24, 16) % cfg.interests  # uniform by default
    k = np.where(src < p_long + p_cur + p_dec, world.decoy[u, which % cfg.decoy_interests], k)
    k = np.where(src < p_long + p_cur, current[np.arange(len(u)), which & 1], k)
    k = np.where(src < p_long, world.long[u, which % cfg.long_interests], k)
    item = world.target.pick(k, _bits(hc, 40, 24))
    in_long = (world.long[u] == k[:, None]).any(1)
    in_current = (current == k[:, None]).any(1)
    logit = (cfg.base_logit + cfg.w_long * in_long + cfg.w_current * in_current
             + world.item_bias[item] + world.user_bias[u])
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (_unit(_hash(r, _salt(cfg.seed, _S_ROW_LABEL))) < p).astype(np.int8)
    return {"user_id": u, "ts": ts, "item_id": item, "item_cate": world.item_cate[item], "label": label,
            "n_src": n_src, "n_tgt": n_tgt, "interest": k, "in_long": in_long, "in_current": in_current, "p": p}


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64, copy=False)))


def chunk_table(world: World, r0: int, r1: int, split: str, schema: pa.Schema) -> pa.Table:
    """The contract-v1 table of rows ``r0..r1-1`` of ``split``."""
    cfg = world.cfg
    imp = impressions(world, r0, r1, split)
    u, ts = imp["user_id"], imp["ts"]
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(u), "item_id": pa.array(imp["item_id"]), "item_cate": pa.array(imp["item_cate"]),
        "label": pa.array(imp["label"]), "ts": pa.array(ts),
    }
    prof = world.profile[u]
    for j, f in enumerate(PROFILE_FIELDS):
        cols[PROFILE_PREFIX + f] = pa.array(np.ascontiguousarray(prof[:, j]))
    if cfg.domains == "cross":
        tgt = target_behaviours(world, u, imp["n_tgt"], cfg.st_len)
        cols["st_tgt_items"] = _list(tgt["offsets"], tgt["items"])
        cols["st_tgt_cates"] = _list(tgt["offsets"], tgt["cates"])
        del tgt
    else:
        empty = np.zeros(len(u) + 1, np.int64)
        cols["st_tgt_items"] = cols["st_tgt_cates"] = _list(empty, np.zeros(0, np.int64))
    st = source_behaviours(world, u, ts, imp["n_src"], cfg.st_len, context=False)
    cols["st_src_items"] = _list(st["offsets"], st["items"])
    cols["st_src_cates"] = _list(st["offsets"], st["cates"])
    del st
    ll = source_behaviours(world, u, ts, imp["n_src"], cfg.ll_len)
    for name in ("items", "cates", "ctx", "gap"):
        cols["ll_" + name] = _list(ll["offsets"], ll[name])
    del ll
    return pa.Table.from_arrays([cols[n] for n in schema.names], schema=schema)


# ----------------------------------------------------------------------------- driver


def _max_ids(table: pa.Table, acc: dict[str, int]) -> None:
    """Fold the table's largest id per vocab key into ``acc``."""
    import pyarrow.compute as pc

    keys = {"user": ["user_id"], "item": ["item_id", "st_tgt_items", "st_src_items", "ll_items"],
            "cate": ["item_cate", "st_tgt_cates", "st_src_cates", "ll_cates"], "ctx": ["ll_ctx"], "gap": ["ll_gap"]}
    keys.update({PROFILE_PREFIX + f: [PROFILE_PREFIX + f] for f in PROFILE_FIELDS})
    for key, names in keys.items():
        for name in names:
            col = table.column(name)
            if pa.types.is_list(col.type):
                col = pc.list_flatten(col)
            if len(col):
                acc[key] = max(acc.get(key, 0), pc.max(col).as_py())


def generate_config(out: str | Path, cfg: SynthConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the dataset described by ``cfg`` to ``out``; return a summary (see :func:`generate`).

    The dataset is written beside ``out`` and swapped in once complete and checked
    (:mod:`raylsm.data.atomic`); an existing dataset in ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    started = time.perf_counter()
    staged: dict[str, Path] = {}

    def write(root: Path) -> dict:
        staged["root"] = root
        return _write_shards(root, cfg, progress, out.name)

    summary = write_dataset(out, write, overwrite=overwrite)
    summary["out"] = str(out)
    summary["files"] = [rebase(f, staged["root"], out) for f in summary["files"]]
    summary["manifest"] = str(out / "manifest.json")
    seconds = time.perf_counter() - started
    summary.update(seconds=round(seconds, 3), rows_per_s=round(cfg.rows / max(seconds, 1e-9), 1))
    return summary


def _write_shards(out: Path, cfg: SynthConfig, progress: bool, label: str) -> dict:
    """Write every shard, then the manifest, into ``out`` (a fresh directory); return the summary."""
    world = build_world(cfg)
    schema = arrow_schema(list(PROFILE_FIELDS))
    per_row = max(1, cfg.ll_len + 2 * cfg.st_len)
    chunk_rows = max(1, min(50_000, cfg.chunk_elems // per_row))
    compression = None if cfg.compression == "none" else cfg.compression
    split_rows = cfg.split_rows
    files: list[str] = []
    maxima: dict[str, int] = {}
    labels = ll_total = 0
    bar = tqdm(total=cfg.rows, unit="rows", desc=f"synth {label}", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    base = 0
    for split in ("train", "test"):
        n = split_rows[split]
        (out / split).mkdir(exist_ok=True)
        n_files = max(1, min(cfg.shards, n))
        bounds = [base + n * i // n_files for i in range(n_files + 1)]
        for i in range(n_files):
            path = out / split / f"part-{i:05d}.parquet"
            with pq.ParquetWriter(path, schema, compression=compression) as writer:
                if bounds[i] == bounds[i + 1]:
                    writer.write_table(schema.empty_table())
                for r0 in range(bounds[i], bounds[i + 1], chunk_rows):
                    r1 = min(r0 + chunk_rows, bounds[i + 1])
                    table = chunk_table(world, r0, r1, split, schema)
                    _max_ids(table, maxima)
                    labels += int(np.asarray(table.column("label")).sum(dtype=np.int64))
                    ll_total += len(table.column("ll_items").combine_chunks().values)
                    writer.write_table(table, row_group_size=r1 - r0)
                    del table
                    bar.update(r1 - r0)
            files.append(str(path))
        base += n
    bar.close()

    vocab = {k: maxima.get(k, 0) + 1 for k in ("item", "cate", "ctx", "gap", "user")}
    profile_vocab = {f: maxima.get(PROFILE_PREFIX + f, 0) + 1 for f in PROFILE_FIELDS}
    manifest = Manifest(
        name=cfg.name, vocab=vocab, profile_vocab=profile_vocab, max_len={"st": cfg.st_len, "ll": cfg.ll_len},
        domains=cfg.domains, splits={s: {"rows": split_rows[s]} for s in ("train", "test")},
        source={"generator": GENERATOR, "params": _params(cfg), "seed": cfg.seed},
    )
    manifest_path = manifest.write(out)  # last: a directory without it is no dataset
    return {
        "out": str(out), "name": cfg.name, "domains": cfg.domains, "rows": cfg.rows,
        "train_rows": split_rows["train"], "test_rows": split_rows["test"],
        "splits": {s: {"rows": split_rows[s]} for s in ("train", "test")},
        "files": files, "manifest": str(manifest_path), "vocab": {**vocab, "profile": profile_vocab},
        "ctr": labels / cfg.rows, "mean_ll_len": ll_total / cfg.rows,
        "bytes": sum(Path(f).stat().st_size for f in files),
    }


def _params(cfg: SynthConfig) -> dict:
    params = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def generate(
    out: str | Path,
    users: int = 2000,
    rows: int = 100_000,
    ll_len: int = 500,
    st_len: int = 50,
    shards: int = 4,
    domains: str = "cross",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Generate a synthetic contract-v1 dataset under ``out`` (the ``raylsm data synth`` command).

    Returns ``{"out", "name", "domains", "rows", "train_rows", "test_rows", "splits", "files", "manifest",
    "vocab", "ctr", "mean_ll_len", "bytes", "seconds", "rows_per_s"}``. Raises ``ValueError`` naming
    the option for bad parameters, or ``--out`` when it holds files and ``overwrite`` is not set (or
    they are not a dataset). Other knobs: build a :class:`SynthConfig` and call
    :func:`generate_config`.
    """
    cfg = SynthConfig(users=users, rows=rows, ll_len=ll_len, st_len=st_len, shards=shards, domains=domains, seed=seed)
    return generate_config(out, cfg, progress=progress, overwrite=overwrite)


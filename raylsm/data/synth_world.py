"""The hidden world of the synthetic generator and what it yields.

Items and users (:func:`build_world`), each user's lifelong and target-domain timelines, the
sequences before a time, and the impressions with their labels. What is planted and why: the
docstring of :mod:`raylsm.data.synth`, which writes these rows as a dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raylsm.data.synth_config import SynthConfig
from raylsm.data.synth_hash import (S_BEHAVIOUR, S_MIX, S_ROW_CAND, S_ROW_LABEL, S_ROW_TS, S_ROW_USER, S_SESSION,
                                    S_TARGET, below, bits, hash64, pack, salt, unit)

PROFILE_FIELDS: tuple[str, ...] = ("age", "gender", "activity")
T_BASE = 1_700_006_400  # 2023-11-15 00:00 UTC: start of day 0
DAY = 86_400
STEP = 60  # seconds between consecutive behaviours of a session
CTX_SKIP, CTX_VIEW, CTX_LONG_VIEW, CTX_LIKE = 1, 2, 3, 4


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
    h = hash64(pack(u, 2 * window + slot), salt(cfg.seed, S_MIX))
    from_long = bits(h, 0, 16) < round(cfg.mix_long * 65536)
    long_pick = world.long[u, below(bits(h, 16, 16), 16, cfg.long_interests)]
    return np.where(from_long, long_pick, below(bits(h, 32, 16), 16, cfg.interests))


def _session_hash(world: World, u: np.ndarray, s: np.ndarray) -> np.ndarray:
    return hash64(pack(u, s), salt(world.cfg.seed, S_SESSION))


def _session_start(world: World, u: np.ndarray, s: np.ndarray, hs: np.ndarray | None = None) -> np.ndarray:
    """Start time of session slot ``s``: slot start plus a jitter in [0, interval/4)."""
    if hs is None:
        hs = _session_hash(world, u, s)
    iv = world.interval[u]
    return world.t0[u] + s * iv + ((bits(hs, 40, 24) * (iv // 4)) >> 24)


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
    kind_u = bits(hs, 0, 16)
    kind = (kind_u >= round(cfg.p_real * 65536)).astype(np.int8)
    kind += kind_u >= round((cfg.p_real + cfg.p_decoy) * 65536)
    pick = bits(hs, 17, 16)
    interest = np.where(kind == 1, world.decoy[u, below(pick, 16, cfg.decoy_interests)],
                        below(pick, 16, cfg.interests))
    real = kind == 0
    interest[real] = _current_interest(world, u[real], s[real] // cfg.window_sessions, bits(hs[real], 16, 1))
    hb = hash64(pack(u, pos), salt(cfg.seed, S_BEHAVIOUR))
    topic = bits(hb, 0, 12) < round(cfg.focus * 4096)
    interest = np.where(topic, interest, below(bits(hb, 12, 16), 16, cfg.interests))
    items = world.source.pick(interest, bits(hb, 28, 24))
    noise_q = np.where(topic, world.ctx_noise_q[u], round(cfg.feed_ctx_noise * 256))
    randomised = bits(hb, 52, 8) < noise_q
    if cfg.context_effect:
        liked = real
    else:  # engagement drawn per session with the same rate, independent of the session's kind
        liked = bits(hs, 33, 7) < round(cfg.p_real * 128)
    engaged = np.where(liked, CTX_LONG_VIEW, CTX_SKIP) + bits(hb, 62, 1)
    ctx = np.where(randomised, 1 + bits(hb, 60, 2), engaged)
    time_ = _session_start(world, u, s, hs) + (pos - s * sl) * STEP
    return {"items": items, "cates": world.item_cate[items], "ctx": ctx, "time": time_, "kind": kind,
            "topic": topic, "interest": interest}


def target_timeline(world: World, u: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Target-domain behaviour number ``pos`` of user ``u`` (element-wise): ``items``, ``cates``, ``interest``."""
    cfg = world.cfg
    s = pos // np.maximum(world.tgt_per_session[u], 1)
    h = hash64(pack(u, pos), salt(cfg.seed, S_TARGET))
    interest = _current_interest(world, u, s // cfg.window_sessions, bits(h, 0, 1))
    noise = bits(h, 1, 12) < round((cfg.st_noise if cfg.bridge else 1.0) * 4096)
    interest = np.where(noise, below(bits(h, 13, 16), 16, cfg.interests), interest)
    items = world.target.pick(interest, bits(h, 32, 24))
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
    u = 1 + np.searchsorted(world.user_cdf, unit(hash64(r, salt(cfg.seed, S_ROW_USER))), side="right")
    u = np.minimum(u, cfg.users).astype(np.int64)
    day0, days = (0, cfg.train_days) if split == "train" else (cfg.train_days, cfg.test_days)
    ts = T_BASE + day0 * DAY + (hash64(r, salt(cfg.seed, S_ROW_TS)) % np.uint64(days * DAY)).astype(np.int64)
    n_src, n_tgt, s0 = counts_before(world, u, ts)
    window = s0 // cfg.window_sessions
    current = np.stack([_current_interest(world, u, window, np.full_like(u, j)) for j in (0, 1)], 1)

    hc = hash64(r, salt(cfg.seed, S_ROW_CAND))
    src = bits(hc, 0, 16) * (1.0 / 65536)  # which source the candidate's interest comes from
    p_long, p_cur, p_dec = cfg.cand_mix
    which = bits(hc, 16, 8)
    k = bits(hc, 24, 16) % cfg.interests  # uniform by default
    k = np.where(src < p_long + p_cur + p_dec, world.decoy[u, which % cfg.decoy_interests], k)
    k = np.where(src < p_long + p_cur, current[np.arange(len(u)), which & 1], k)
    k = np.where(src < p_long, world.long[u, which % cfg.long_interests], k)
    item = world.target.pick(k, bits(hc, 40, 24))
    in_long = (world.long[u] == k[:, None]).any(1)
    in_current = (current == k[:, None]).any(1)
    logit = (cfg.base_logit + cfg.w_long * in_long + cfg.w_current * in_current
             + world.item_bias[item] + world.user_bias[u])
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (unit(hash64(r, salt(cfg.seed, S_ROW_LABEL))) < p).astype(np.int8)
    return {"user_id": u, "ts": ts, "item_id": item, "item_cate": world.item_cate[item], "label": label,
            "n_src": n_src, "n_tgt": n_tgt, "interest": k, "in_long": in_long, "in_current": in_current, "p": p}

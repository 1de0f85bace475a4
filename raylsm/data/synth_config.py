"""The options of the synthetic generator, :class:`SynthConfig`, and their checks.

What each option plants in the data: the docstring of :mod:`raylsm.data.synth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    # Effect switches (each one isolates the mechanism that needs it; see raylsm.data.synth's docstring).
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

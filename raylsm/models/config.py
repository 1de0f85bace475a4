"""Typed model configs with the papers' defaults (LCN §5.1.4, CAIN §4–5).

``ModelConfig.lifelong`` names the lifelong-interest module (registry in
``raylsm.models``); the enhancement blocks (``crp``, ``context``, ``msia``,
``peg``) compose with any of them. Presets (``lcn``, ``cain`` and the
baselines) are partial dicts merged over these defaults, see :data:`PRESETS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raylsm.config import ConfigError

LIFELONG_NAMES = ("din", "sim_soft", "eta", "sdim", "twin", "lap")


@dataclass
class FeatureConfig:
    """Shared feature layer: one embedding table per id space."""

    emb_dim: int = 64
    # 0 = exact tables sized by the manifest vocab. N > 0 = any id space whose
    # vocab exceeds N is hashed into N buckets (id 0 stays padding), so
    # industrial-size vocabularies fit a worker.
    hash_buckets: int = 0

    def validate(self) -> None:
        if self.emb_dim < 1:
            raise ConfigError(f"model.features.emb_dim: must be >= 1, got {self.emb_dim}")
        if self.hash_buckets < 0 or self.hash_buckets == 1:
            raise ConfigError(f"model.features.hash_buckets: must be 0 (off) or >= 2, got {self.hash_buckets}")


@dataclass
class DinConfig:
    """DIN: local-activation target attention over the most recent ``max_len`` behaviours."""

    max_len: int = 200
    hidden: list[int] = field(default_factory=lambda: [80, 40])


@dataclass
class SimConfig:
    """SIM soft-search: inner-product GSU top-K, multi-head target-attention ESU."""

    k: int = 200
    heads: int = 4


@dataclass
class EtaConfig:
    """ETA: SimHash signatures, Hamming-distance top-K, ESU as SIM."""

    k: int = 200
    heads: int = 4
    n_bits: int = 64


@dataclass
class SdimConfig:
    """SDIM: ``n_hashes`` signatures of ``n_bits`` bits; per hash, mean of colliding behaviours."""

    n_hashes: int = 48
    n_bits: int = 3


@dataclass
class TwinConfig:
    """TWIN: CP-GSU with the ESU's own multi-head attention (cross part as per-head bias)."""

    k: int = 200
    heads: int = 4


@dataclass
class LapConfig:
    """Lifelong Attention Pyramid (LCN §4.2): CSA -> top-K1 -> MSA -> top-K2 -> FSA."""

    k1: int = 200
    k2: int = 50
    heads: int = 4
    att_dim: int = 64  # inner dimension d of MSA/FSA projections (per head in FSA)
    ffn_dim: int = 128  # hidden size of the FSA feed-forward layer, eq. (12)

    def validate(self) -> None:
        if self.k1 < 1 or self.k2 < 1:
            raise ConfigError(f"model.lap.k1/k2: must be >= 1, got k1={self.k1}, k2={self.k2}")
        if self.k2 > self.k1:
            raise ConfigError(f"model.lap.k2: must be <= model.lap.k1 ({self.k1}), got {self.k2}")


@dataclass
class CRPConfig:
    """Cross Representation Production (LCN §4.1), eqs. (3)–(6), weighted by ``weight`` (λ_CRP, eq. 14)."""

    enabled: bool = False
    weight: float = 0.1
    tau: float = 0.1
    m: int = 1024
    lambda_pt: float = 1.0
    lambda_ps: float = 1.0
    lambda_pc: float = 1.0

    def validate(self) -> None:
        if self.tau <= 0:
            raise ConfigError(f"model.crp.tau: must be > 0, got {self.tau}")
        if self.m < 1:
            raise ConfigError(f"model.crp.m: must be >= 1, got {self.m}")


@dataclass
class ContextConfig:
    """Context extraction over the lifelong sequence (CAIN §4.1): its output replaces the behaviour representation."""

    kind: Literal["none", "tcn", "gru", "self_attention"] = "none"
    cl: int = 7  # context length: TCN kernel 2*cl+1
    out_dim: int = 0  # 0 = same as the input representation size

    def validate(self) -> None:
        if self.cl < 0:
            raise ConfigError(f"model.context.cl: must be >= 0, got {self.cl}")


@dataclass
class MSIAConfig:
    """Multi-Scope Interest Aggregator (CAIN §4.2): stacked TCN layers, aux attentions eqs. (8)–(9)."""

    enabled: bool = False
    layers: int = 4
    # Context length of each later layer (kernel 2*cl+1); the first layer uses model.context.cl.
    later_cl: int = 2
    later_stride: int = 4
    att_dim: int = 64

    def validate(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"model.msia.layers: must be >= 1, got {self.layers}")
        if self.later_stride < 1:
            raise ConfigError(f"model.msia.later_stride: must be >= 1, got {self.later_stride}")


@dataclass
class PEGConfig:
    """Personalized Extractor Generation (CAIN §4.3), eqs. (10)–(12)."""

    enabled: bool = False
    hidden: int = 64
    aggregation: Literal["replace", "sum", "concat"] = "replace"
    layers: Literal["all", "first", "later"] = "all"


@dataclass
class ModelConfig:
    """One CTR model: feature layer + (context/MSIA) + lifelong module + head (+ CRP loss)."""

    lifelong: Literal["din", "sim_soft", "eta", "sdim", "twin", "lap"] = "lap"
    head: list[int] = field(default_factory=lambda: [256, 128])
    features: FeatureConfig = field(default_factory=FeatureConfig)
    din: DinConfig = field(default_factory=DinConfig)
    sim_soft: SimConfig = field(default_factory=SimConfig)
    eta: EtaConfig = field(default_factory=EtaConfig)
    sdim: SdimConfig = field(default_factory=SdimConfig)
    twin: TwinConfig = field(default_factory=TwinConfig)
    lap: LapConfig = field(default_factory=LapConfig)
    crp: CRPConfig = field(default_factory=CRPConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    msia: MSIAConfig = field(default_factory=MSIAConfig)
    peg: PEGConfig = field(default_factory=PEGConfig)

    def validate(self) -> None:
        if self.msia.enabled and self.context.kind != "tcn":
            raise ConfigError("model.msia.enabled: MSIA stacks TCN layers and needs model.context.kind=tcn")
        if self.peg.enabled and self.context.kind != "tcn":
            raise ConfigError("model.peg.enabled: PEG generates TCN filters and needs model.context.kind=tcn")


# Presets: partial model configs over the defaults. LCN = lap + crp; CAIN = lap + tcn + msia + peg.
PRESETS: dict[str, dict] = {
    "din": {"lifelong": "din"},
    "sim_soft": {"lifelong": "sim_soft"},
    "eta": {"lifelong": "eta"},
    "sdim": {"lifelong": "sdim"},
    "twin": {"lifelong": "twin"},
    "lap": {"lifelong": "lap"},
    "lcn": {"lifelong": "lap", "crp": {"enabled": True}},
    "cain": {
        "lifelong": "lap",
        "context": {"kind": "tcn"},
        "msia": {"enabled": True},
        "peg": {"enabled": True},
    },
}

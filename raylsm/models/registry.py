"""The model registry: lifelong-interest modules by name, the builders of a model's parts, and presets.

:func:`raylsm.models.ctr.build_model` assembles a :class:`~raylsm.models.ctr.CTRModel` from these parts.
The registry maps ``ModelConfig.lifelong`` names to module classes; each class
takes ``(cfg_block, query_dim, seq_dim, ctx_dim)`` and maps
``(query (B, Dq), seq (B, L, Ds), ctx (B, L, Dc), mask (B, L))`` to ``(B, out_dim)``.
"""

from __future__ import annotations

from torch import nn

from raylsm.config import from_dict, merge
from raylsm.models.config import PRESETS, ModelConfig


def lifelong_registry() -> dict[str, type[nn.Module]]:
    """Name -> lifelong-interest module class."""
    from raylsm.models.din import DIN
    from raylsm.models.lap import LAP
    from raylsm.models.sdim import SDIM
    from raylsm.models.sim import ETA, SIMSoft
    from raylsm.models.twin import TWIN

    return {"din": DIN, "sim_soft": SIMSoft, "eta": ETA, "sdim": SDIM, "twin": TWIN, "lap": LAP}


def build_lifelong(cfg: ModelConfig, query_dim: int, seq_dim: int, ctx_dim: int) -> nn.Module:
    cls = lifelong_registry()[cfg.lifelong]
    return cls(getattr(cfg, cfg.lifelong), query_dim, seq_dim, ctx_dim)


def build_context_encoder(cfg: ModelConfig, in_dim: int, query_dim: int, profile_dim: int) -> nn.Module | None:
    """TCN / GRU / self-attention (+ MSIA, PEG) encoder, or None when ``context.kind == 'none'``."""
    if cfg.context.kind == "none":
        return None
    from raylsm.models.cain import ContextEncoder

    return ContextEncoder(cfg, in_dim=in_dim, query_dim=query_dim, profile_dim=profile_dim)


def build_crp(cfg: ModelConfig) -> nn.Module | None:
    if not cfg.crp.enabled:
        return None
    from raylsm.models.crp import CRP

    return CRP(cfg.crp)


def preset_config(name: str, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig of a preset (``lcn``, ``cain``, ``din`` ...), with optional overrides merged on top."""
    if name not in PRESETS:
        from raylsm.config import ConfigError

        raise ConfigError(f"--model {name!r}: unknown model (choose from {', '.join(sorted(PRESETS))})")
    return from_dict(ModelConfig, merge(PRESETS[name], overrides or {}), "model")

"""The LCN paper's Figure 5 (LCN §5.2.2, "Consistency Analyses") from trained checkpoints: how much of the final
level's top-n each earlier level finds (see :mod:`raylsm.experiments.figures` for the method and Fig. 4)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from raylsm.config import ConfigError
from raylsm.data.collate import collate_spec, iter_local_batches
from raylsm.data.contract import Manifest, read_manifest
from raylsm.experiments.figures import CONSISTENCY_MODELS, finish, load_checkpoints, tracking_target
from raylsm.models.layers import masked_softmax


@dataclass
class Ranking:
    """One level's ranking of the lifelong positions, best first: ``idx (B, L)`` long, ``valid (B, L)`` bool.

    ``weight (B, L)``: for an attention level ranked by its weights, those weights in the same order (0 on padding).
    """

    idx: Tensor
    valid: Tensor
    weight: Tensor | None = None


def lifelong_inputs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``(query, seq, ctx, mask)`` the model hands its lifelong module (captured by a pre-hook, no copy of the wiring)."""
    seen: dict[str, tuple] = {}
    handle = model.lifelong.register_forward_pre_hook(lambda _m, args: seen.setdefault("args", args))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    return seen["args"][:4]  # (a retrieval module also gets the `gather` of its retrieved ids)


def _by_weight(idx: Tensor, valid: Tensor, weight: Tensor) -> Ranking:
    """Re-rank positions ``idx (B, M)`` by ``weight (B, M)``, invalid last."""
    order = torch.sort(weight.masked_fill(~valid, float("-inf")), dim=-1, descending=True, stable=True).indices
    ranked_valid = torch.gather(valid, 1, order)
    return Ranking(torch.gather(idx, 1, order), ranked_valid, torch.gather(weight, 1, order) * ranked_valid)


def level_rankings(model: nn.Module, batch: dict[str, Tensor]) -> tuple[dict[str, Ranking], dict[str, Ranking], dict[str, int]]:
    """Each level's ranking of the whole sequence, and the model's own cascade selections at its sizes.

    Returns ``(levels, cascade, sizes)``: ``levels`` in pyramid order, the final level last
    (LAP: csa, msa, fsa; SIM/ETA: gsu, esu); ``cascade`` maps a level to the positions it passes on
    at the configured size (LAP: csa -> top-K1, msa -> top-K2; SIM/ETA: gsu -> top-K).
    """
    from raylsm.models.lap import LAP
    from raylsm.models.sim import SIMSoft

    query, seq, ctx, mask = lifelong_inputs(model, batch)
    module, n = model.lifelong, seq.shape[1]
    with torch.no_grad():
        if isinstance(module, LAP):
            full = copy.copy(module)  # shares the weights; only the level sizes differ
            full.k1 = full.k2 = n
            lv = full.levels(query, seq, ctx, mask)  # every level over all L positions
            levels = {
                "csa": Ranking(lv.csa_idx, lv.csa_mask),  # topk by r, eq. (7)
                "msa": Ranking(lv.fsa_idx, lv.fsa_mask),  # topk by r^msa, eq. (9)
                "fsa": _by_weight(lv.fsa_idx, lv.fsa_mask, lv.fsa_weights.mean(1)),  # eq. (11) weights, mean over heads
            }
            own = module.levels(query, seq, ctx, mask)
            cascade = {"csa": Ranking(own.csa_idx, own.csa_mask), "msa": Ranking(own.fsa_idx, own.fsa_mask)}
            sizes = {"csa": module.k1, "msa": module.k2}
        elif isinstance(module, SIMSoft):  # SIM soft-search and ETA (same ESU, own GSU)
            q = module.query_proj(query)  # (B, Ds)
            full = copy.copy(module)
            full.k = n
            gsu = Ranking(*full.retrieve(q, seq, mask))
            weight = masked_softmax(module.esu.scores(q, module.esu_input(seq, ctx)), mask.unsqueeze(1)).mean(1)  # (B, L)
            positions = torch.arange(n).expand_as(mask)
            levels = {"gsu": gsu, "esu": _by_weight(positions, mask, weight)}
            cascade = {"gsu": Ranking(*module.retrieve(q, seq, mask))}
            sizes = {"gsu": module.k}
        else:
            raise ConfigError(f"Fig. 5 scores the levels of {', '.join(CONSISTENCY_MODELS)}; "
                              f"this checkpoint's lifelong module is {type(module).__name__}")
    return levels, cascade, sizes


def _members(r: Ranking, n: int | None, length: int) -> Tensor:
    """(B, L) bool: which positions are among the first ``n`` valid of the ranking (all selected when ``n`` is None)."""
    top = r.idx if n is None else r.idx[:, :n]
    valid = r.valid if n is None else r.valid[:, :n]
    m = torch.zeros(r.idx.shape[0], length, dtype=torch.bool)
    return m.scatter_(1, top, valid)


def consistency(real: Ranking, test: Ranking, n: int, eligible: Tensor) -> Tensor:
    """Per eligible row: share of the real set (top-n of ``real``) found in the top-n of ``test`` (B',)."""
    length = real.idx.shape[1]
    hit = _members(real, n, length) & _members(test, n, length)
    return hit[eligible].sum(1).double() / n


def recall(real: Ranking, selected: Ranking, n: int, eligible: Tensor) -> Tensor:
    """Per eligible row: share of the real top-n among the positions a cascade level selected (B',)."""
    length = real.idx.shape[1]
    hit = _members(real, n, length) & _members(selected, None, length)
    return hit[eligible].sum(1).double() / n


def held_out_batch(data: str, meta: dict, manifest: Manifest, rows: int) -> dict[str, Tensor]:
    """The first ``rows`` test rows, collated at the checkpoint's own sequence lengths."""
    job = meta["job"]
    spec = collate_spec(job["data"], manifest)
    batch = next(iter_local_batches(data, "test", spec, rows), None)
    if batch is None:
        raise ConfigError(f"{data}: the test split is empty")
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def plot_fig5(path: Path, models: list[dict], top_n: int) -> None:
    """(a) each earlier level's consistency with the final level; (b) the share the model's own cascade keeps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 + 1.6 * len(models), 4.2), layout="constrained")
    ax_a, ax_b = fig.subplots(1, 2)
    for ax, key, title in ((ax_a, "consistency", f"(a) consistency with the final level's top-{top_n}"),
                           (ax_b, "cascade_recall", f"(b) final top-{top_n} kept by the cascade")):
        x, ticks = 0.0, []
        for m in models:
            for level, value in m[key].items():
                size = f"\nK={m['sizes'][level]}" if key == "cascade_recall" else ""
                ax.bar(x, value, width=0.8, color="tab:blue" if m["lifelong"] == "lap" else "tab:orange")
                ax.text(x, value + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
                ticks.append((x, f"{m['label']}\n{level.upper()}{size}"))
                x += 1.0
            x += 0.6
        if key == "consistency":
            ax.axhline(float(np.mean([m["chance"] for m in models])), color="grey", linestyle="--", linewidth=1,
                       label="random top-n")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(title, fontsize=10)
    fig.suptitle("LCN Fig. 5: consistency between levels (final level: FSA for LAP, ESU for SIM)", fontsize=11)
    fig.savefig(path, dpi=110)


def fig5(checkpoints: Sequence[str], data: str, out: str, run_id: str | None = None, tracking_uri: str | None = None,
         rows: int = 512, top_n: int = 50) -> dict:
    """Fig. 5: consistency of each checkpoint's levels on ``rows`` test rows -> ``<out>/fig5.{png,json}``."""
    if rows < 1 or top_n < 1:
        raise ConfigError(f"--rows/--top-n: must be >= 1, got {rows}/{top_n}")
    uri = tracking_target(run_id, tracking_uri)
    manifest = read_manifest(data)
    loaded = load_checkpoints(checkpoints, manifest, data)
    for c in loaded:
        if c.lifelong not in CONSISTENCY_MODELS:
            raise ConfigError(f"{c.path}: Fig. 5 scores the levels of {', '.join(CONSISTENCY_MODELS)}; "
                              f"this checkpoint is {c.lifelong}")
    models = []
    for c in loaded:
        batch = held_out_batch(data, c.meta, manifest, rows)
        levels, cascade, sizes = level_rankings(c.model, batch)
        eligible = batch["ll_mask"].sum(1) > top_n
        if not eligible.any():
            raise ConfigError(f"--top-n {top_n}: no test row of {data} has more than {top_n} lifelong behaviours at "
                              f"{c.path}'s ll_len (longest {int(batch['ll_mask'].sum(1).max())}); choose a smaller --top-n")
        names = list(levels)
        final = levels[names[-1]]
        models.append({
            "checkpoint": c.path, "label": c.label, "preset": c.preset, "lifelong": c.lifelong,
            "final_level": names[-1], "rows": int(eligible.sum()), "sizes": sizes,
            "consistency": {k: float(consistency(final, levels[k], top_n, eligible).mean()) for k in names[:-1]},
            "cascade_recall": {k: float(recall(final, r, top_n, eligible).mean()) for k, r in cascade.items()},
            "chance": float((top_n / batch["ll_mask"].sum(1)[eligible].double()).mean()),  # a random top-n's share
            # The final level's attention mass on its own top-n: ~chance when its weights are flat (nothing to agree with).
            "final_top_mass": float(final.weight[eligible, :top_n].sum(1).double().mean()),
        })
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    png = outdir / "fig5.png"
    plot_fig5(png, models, top_n)
    result = {"figure": "fig5", "paper": "LCN §5.2.2 Consistency Analyses, Figure 5(a)", "data": str(data),
              "top_n": top_n, "models": models}
    return finish(result, png, outdir / "fig5.json", run_id, uri)

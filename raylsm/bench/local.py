"""``raylsm bench step``, ``memory`` and ``latency``: the presets timed in this process's children, no Ray."""

from __future__ import annotations

import argparse

from raylsm.bench.common import DEFAULT_VOCAB, csv_ints, csv_names, in_child, log, machine, median, random_batch, resolve_device, step_child, time_inference


def run_step(args: argparse.Namespace) -> dict:
    from raylsm.models.config import PRESETS

    device = resolve_device(args.device)
    models = csv_names(args.models, "--models", PRESETS)
    lens = csv_ints(args.ll_len, "--ll-len")
    dtypes = tuple(csv_names(args.dtypes, "--dtypes", ("fp32", "bf16")))
    if "bf16" in dtypes and device.type != "cuda":
        raise ValueError("--dtypes bf16: training uses bf16 autocast on CUDA only (train.bf16); use --device cuda")
    rows = []
    for model in models:
        for l in lens:
            row = in_child(step_child, model, args.batch, l, args.steps, args.overrides, args.threads, device.type,
                           dtypes, not args.no_infer, args.compile)
            figures = "  ".join(f"{d} train {row[f'train_ms_{d}']:.1f} ms" + (f" infer {row[f'infer_ms_{d}']:.1f} ms" if not args.no_infer else "")
                                for d in dtypes)
            log(f"{model:10s} B={args.batch} L={l:5d}  {figures}  peak RSS {row['peak_rss_mb']:.0f} MB")
            rows.append(row)
    first = [r for r in rows if r["model"] == models[0]]
    ratio = first[-1][f"train_ms_{dtypes[0]}"] / first[0][f"train_ms_{dtypes[0]}"]
    return {"bench": "step", "device": device.type, "ratio": round(ratio, 3),
            "ratio_is": f"{models[0]} {dtypes[0]} train step at L={lens[-1]} / at L={lens[0]}",
            "results": rows, "machine": machine()}


def run_memory(args: argparse.Namespace) -> dict:
    from raylsm.models.config import PRESETS

    device = resolve_device(args.device)
    models = csv_names(args.models, "--models", PRESETS)
    reference = "lap"
    todo = models + ([reference] if reference not in models else [])
    rows = {}
    for model in todo:
        row = in_child(step_child, model, args.batch, args.ll_len, args.steps, args.overrides, args.threads, device.type,
                       ("fp32",), False, False)
        key = "peak_gpu_mb" if device.type == "cuda" else "peak_rss_mb"
        log(f"{model:10s} B={args.batch} L={args.ll_len}  {key} {row[key]:.0f} ({row[key] - row['rss_before_steps_mb']:.0f} over the built model)  {row['params']:,} parameters")
        rows[model] = row
    key = "peak_gpu_mb" if device.type == "cuda" else "peak_rss_mb"
    ratio = rows[models[0]][key] / rows[reference][key]
    return {"bench": "memory", "device": device.type, "ratio": round(ratio, 3), "ratio_is": f"{models[0]} {key} / {reference}",
            "measure": key, "results": list(rows.values()), "machine": machine()}


def latency_child(models: list[str], l: int, candidates: int, repeats: int, overrides: list[str], threads: int,
                  device_name: str, st_len: int = 50) -> list[dict]:
    """Forward time of one user against ``candidates`` candidates, per model (the user's tensors expanded, not copied)."""
    import torch

    from raylsm.config import apply_overrides
    from raylsm.models.ctr import build_model
    from raylsm.models.registry import preset_config
    from raylsm.models.config import ModelConfig
    from raylsm.models.layers import Vocab
    from raylsm.train.step import to_device

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    user = to_device(random_batch(1, st_len, l, DEFAULT_VOCAB, seed=1), device)
    cands = to_device(random_batch(candidates, 1, 1, DEFAULT_VOCAB, seed=2), device)
    batch = {k: v.expand(candidates, *v.shape[1:]) for k, v in user.items()}  # one copy of the sequence, C views
    batch["item_id"], batch["item_cate"] = cands["item_id"], cands["item_cate"]
    nets = {}
    for model in models:
        torch.manual_seed(0)
        nets[model] = build_model(preset_config(model, apply_overrides({}, overrides, ModelConfig)), Vocab(**DEFAULT_VOCAB)).to(device)
    times: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(repeats):  # interleaved, so a noisy moment hits every model alike
        for model in models:
            times[model] += time_inference(nets[model], batch, device, steps=3, warmup=1)
    return [{"model": m, "candidates": candidates, "ll_len": l, "threads": torch.get_num_threads(),
             "ms": round(1000 * median(times[m]), 3)} for m in models]


def run_latency(args: argparse.Namespace) -> dict:
    from raylsm.models.config import PRESETS

    device = resolve_device(args.device)
    models = csv_names(args.models, "--models", PRESETS)
    todo = models + [m for m in ("sim_soft", "lap") if m not in models]
    rows = in_child(latency_child, todo, args.ll_len, args.candidates, args.repeats, args.overrides, args.threads, device.type)
    ms = {r["model"]: r["ms"] for r in rows}
    for r in rows:
        r["vs_sim_soft"] = round(r["ms"] / ms["sim_soft"], 3)
        r["vs_lap"] = round(r["ms"] / ms["lap"], 3)
        log(f"{r['model']:10s} 1 user x {args.candidates} candidates, L={args.ll_len}: {r['ms']:.2f} ms "
            f"({r['vs_sim_soft']:.2f}x sim_soft, {r['vs_lap']:.2f}x lap)")
    return {"bench": "latency", "device": device.type, "ratio": rows[0]["vs_sim_soft"],
            "ratio_is": f"{models[0]} / sim_soft", "results": rows, "machine": machine(),
            "note": "models score every candidate in one batch; the user's tensors are shared (expanded), "
                    "the models' forward still encodes the sequence per candidate"}

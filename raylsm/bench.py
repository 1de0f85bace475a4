"""``raylsm bench``: the figures of the input pipeline, the training step and the Ray run, each against a reference.

Subcommands (the Ray-side ones live in :mod:`raylsm.bench_ray`):

=========  ====================================================================  ===========================================
name       figure                                                                ``ratio``
=========  ====================================================================  ===========================================
ingest     rows/s of the Ray Data path with 1..N CPUs and of the one-process      Ray rows/s with the most CPUs ÷ (N × one
           reader (``iter_local_batches``), batches handed to the device         process)
step       train and inference step time per model, length and dtype            step time at the last length ÷ at the first
train      samples/s of a short Ray Train run and of the step alone              Ray ÷ step-only
latency    one user scored against C candidates (the sequence tensors shared)    first model ÷ ``sim_soft``
memory     peak RSS (CPU) / peak GPU memory of one training process per model   first model ÷ ``lap``
startup    seconds from ``raylsm train`` starting to its first training batch   Ray ÷ the in-process path
=========  ====================================================================  ===========================================

Every figure is the median of repeats, taken in the same run as its reference (the machine
may be shared and noisy). Progress goes to stderr; the result is the last stdout line and is
also logged to the MLflow experiment ``bench`` (params: the options; metrics: the numeric
figures, flattened; the JSON as an artifact). Model timings run in a spawned process per
(model, length), so peak RSS is that model's own. ``startup`` also times Ray's own floor in the
same run: a bare ``TorchTrainer`` streaming ``ray.data.range`` on a fresh local cluster
(``ray_floor_seconds``; ``over_floor`` = ours ÷ it).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

DEFAULT_VOCAB = {"item": 60001, "cate": 257, "ctx": 5, "gap": 64, "user": 2001,
                 "profile": {"age": 8, "gender": 3, "activity": 5}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def machine() -> dict:
    """What the figures were measured on."""
    import os

    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_1m": round(os.getloadavg()[0], 2)}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def resolve_device(name: str):
    """``--device``: cpu or cuda; cuda without a CUDA device is a user error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    return torch.device(name)


def sync(device) -> None:
    """Wait for the device, so a wall-clock timer measures the work and not its launch."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def csv_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option}: expected comma-separated integers >= 1, got {text!r}")
    return values


def csv_names(text: str, option: str, allowed) -> list[str]:
    names = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"{option}: unknown {', '.join(bad) or 'empty list'} (choose from {', '.join(sorted(allowed))})")
    return names


# ----------------------------------------------------------------------------- batches and step timing


def random_batch(b: int, s: int, l: int, vocab: dict, seed: int = 0) -> dict:
    """A collated batch (int64 ids, all behaviours valid) with random ids."""
    from raylsm.data.examples import example_batch

    return example_batch(b, s, l, vocab, seed, full=True)


def time_train_steps(net, batch: dict | list[dict], device, steps: int, bf16: bool = False, warmup: int = 1,
                     lr: float = 1e-3) -> list[float]:
    """Seconds of each of ``steps`` training steps after ``warmup`` ones, through the trainer's own epoch loop.

    ``batch`` (or a list of batches, cycled) should already be on ``device``: the step alone, no input pipeline.
    """
    import torch

    from raylsm.train.optim import build_optimizer
    from raylsm.train.step import train_epoch

    opt = build_optimizer(net, lr)
    times: list[float] = []
    last = [0.0]

    def on_step(_: int) -> None:
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    sync(device)
    last[0] = time.perf_counter()
    total = warmup + steps
    batches = itertools.cycle(batch) if isinstance(batch, list) else itertools.repeat(batch)
    train_epoch(net, opt, batches, device, max_steps=total, bf16=bf16, on_step=on_step)
    return times[warmup:]


def time_inference(net, batch: dict, device, steps: int, bf16: bool = False, warmup: int = 1) -> list[float]:
    """Seconds of each of ``steps`` forward passes (eval mode, no autograd) after ``warmup`` ones."""
    import torch

    net.eval()
    times = []
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(warmup + steps):
            sync(device)
            start = time.perf_counter()
            net(batch)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def peak_memory(device) -> dict:
    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def step_child(model: str, b: int, l: int, steps: int, overrides: list[str], threads: int, device_name: str,
               dtypes: tuple[str, ...] = ("fp32",), infer: bool = True, compile_: bool = False, st_len: int = 50,
               seed: int = 0) -> dict:
    """In a fresh process: train (and inference) step times of one model at batch ``b``, length ``l``."""
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
    torch.manual_seed(seed)
    extra = apply_overrides({}, overrides, ModelConfig)
    net = build_model(preset_config(model, extra), Vocab(**DEFAULT_VOCAB)).to(device)
    batch = to_device(random_batch(b, st_len, l, DEFAULT_VOCAB, seed), device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row: dict[str, Any] = {"model": model, "batch": b, "ll_len": l, "threads": torch.get_num_threads(),
                           "compile": compile_, "params": sum(p.numel() for p in net.parameters())}
    # Eager first; with compile_, the same model again after ``net.compile()`` (train.compile), keys suffixed _compiled.
    for suffix in ("", "_compiled") if compile_ else ("",):
        if suffix:
            net.compile()
        warmup = 3 if suffix else 1  # compiling happens in the first steps (and once more for eval mode)
        for dtype in dtypes:
            bf16 = dtype == "bf16"
            train = time_train_steps(net, batch, device, steps, bf16=bf16, warmup=warmup)
            row[f"train_ms_{dtype}{suffix}"] = round(1000 * median(train), 2)
            row[f"train_samples_per_s_{dtype}{suffix}"] = round(b / median(train), 1)
            if infer:
                row[f"infer_ms_{dtype}{suffix}"] = round(1000 * median(time_inference(net, batch, device, steps, bf16, warmup)), 2)
    row["rss_before_steps_mb"] = round(rss_before, 1)
    row.update(peak_memory(device))
    return row


def in_child(fn: Callable, *args) -> Any:
    """Run ``fn(*args)`` in a spawned process (its own peak RSS, torch threads and CUDA context)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ----------------------------------------------------------------------------- step / memory / latency


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


# ----------------------------------------------------------------------------- MLflow record


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of ``result`` as MLflow metric names (``results.0.train_ms_fp32`` ...)."""
    out: dict[str, float] = {}
    items = result.items() if isinstance(result, dict) else enumerate(result)
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and v == v:
            out[name] = float(v)
        elif isinstance(v, (dict, list)):
            out.update(flat_metrics(v, name + "."))
    return out


def log_result(result: dict, args: argparse.Namespace) -> str | None:
    """One run in the MLflow experiment (``--experiment``, default ``bench``); returns its id."""
    import json

    from raylsm.train.config import default_tracking_uri
    from raylsm.train.tracking import client as tracking_client, check_store, experiment_id

    uri = args.tracking_uri or default_tracking_uri()
    check_store(uri)
    client = tracking_client(uri)
    run = client.create_run(experiment_id(uri, args.experiment), run_name=f"bench-{args.bench}",
                            tags={"raylsm.bench": args.bench, "raylsm.device": result.get("device", "")})
    run_id = run.info.run_id
    try:
        params = {k: str(v) for k, v in vars(args).items() if k not in ("fn", "tracking_uri") and v is not None}
        for k, v in params.items():
            client.log_param(run_id, k, v[:500])
        for k, v in flat_metrics(result).items():
            client.log_metric(run_id, k.replace(":", "_"), v)
        client.log_text(run_id, json.dumps(result, indent=2), "bench.json")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id



def run_bench(args: argparse.Namespace) -> dict:
    """Run the subcommand named by ``args.bench``, log it to MLflow (unless ``--no-mlflow``), return its JSON."""
    from raylsm import bench_ray

    runners = {"step": run_step, "memory": run_memory, "latency": run_latency,
               "ingest": bench_ray.run_ingest, "train": bench_ray.run_train, "startup": bench_ray.run_startup}
    started = time.perf_counter()
    result = runners[args.bench](args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if not args.no_mlflow:
        try:
            result["mlflow_run_id"] = log_result(result, args)
        except Exception as e:  # the figures are printed whatever the store does
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log(f"raylsm: bench result not logged to MLflow ({reason})")
            result["mlflow_run_id"] = None
    return result


# ----------------------------------------------------------------------------- command line


def add_bench_parsers(bench: argparse.ArgumentParser) -> None:
    """The ``raylsm bench <name>`` subcommands and their options."""
    sub = bench.add_subparsers(dest="bench", required=True, metavar="{ingest,step,train,latency,memory,startup}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        p.add_argument("--experiment", default="bench", help="MLflow experiment (default: bench)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
        p.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")

    def models(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--models", default=default, help="comma-separated presets")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="model config override, e.g. --set features.emb_dim=32 (repeatable)")
        p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")

    def data(p: argparse.ArgumentParser, rows: int, ll_len: int) -> None:
        p.add_argument("--data", help="dataset directory; default: a synthetic one generated in a temporary directory")
        p.add_argument("--rows", type=int, default=rows, help="rows of the generated dataset")
        p.add_argument("--shards", type=int, default=8, help="shards of the generated dataset")
        p.add_argument("--ll-len", type=int, default=ll_len, help="lifelong length (generated and collated)")
        p.add_argument("--st-len", type=int, default=50, help="short-term length (generated and collated)")

    p = sub.add_parser("ingest", help="rows/s of the Ray Data path with 1..N CPUs vs the one-process reader")
    common(p)
    data(p, 60_000, 500)
    p.add_argument("--cpus", default="1,2", help="CPUs Ray Data may use, comma-separated (default 1,2)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--block-rows", type=int, default=8192, help="data.block_rows of the Ray path")
    p.add_argument("--prefetch", type=int, default=2, help="train.prefetch_batches of the Ray path")
    p.add_argument("--repeats", type=int, default=3)

    p = sub.add_parser("step", help="train and inference step time per model, length and dtype (synthetic batch)")
    common(p)
    models(p, "lcn,cain")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ll-len", default="500,2000", help="comma-separated lifelong lengths; ratio = last / first")
    p.add_argument("--dtypes", default="fp32", help="fp32,bf16 (bf16: CUDA only, as in training)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up); the median is reported")
    p.add_argument("--no-infer", action="store_true", help="training steps only")
    p.add_argument("--compile", action="store_true",
                   help="also time the model after torch.compile (train.compile), in the same process: *_compiled keys")

    p = sub.add_parser("train", help="samples/s of a short Ray Train run vs the training step alone")
    common(p)
    data(p, 20_000, 500)
    p.add_argument("--model", default="lcn")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="job config override, e.g. --set model.features.emb_dim=16 (repeatable)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="Ray epochs; the first (warm-up) is not counted")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=10, help="timed steps of the step-only reference")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the step-only reference")

    p = sub.add_parser("latency", help="scoring one user against C candidates, per model; ratios to sim_soft and lap")
    common(p)
    models(p, "lcn,cain,lap,sim_soft")
    p.add_argument("--ll-len", type=int, default=500)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)

    p = sub.add_parser("memory", help="peak RSS / GPU memory of one training process per model")
    common(p)
    models(p, "cain,lcn")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ll-len", type=int, default=500)
    p.add_argument("--steps", type=int, default=2)

    p = sub.add_parser("startup", help="seconds from `raylsm train` starting to its first training batch")
    common(p)
    data(p, 20_000, 500)
    p.add_argument("--model", default="lcn")
    p.add_argument("--cluster", choices=("fresh", "running"), default="fresh",
                   help="fresh: each run starts its own local cluster (timed); running: every run joins one local "
                        "loopback cluster started before the first (untimed), as `ray start` would leave one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="job config override for the measured `raylsm train` (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for one `raylsm train`")

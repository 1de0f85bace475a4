"""What every ``raylsm bench`` subcommand shares: the machine, devices, option parsing, example batches, step timing and child processes."""

from __future__ import annotations

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


_CHILDREN: Any = None


def child_context() -> Any:
    """Where :func:`in_child` starts its processes: a fork server (a fresh interpreter started once, with torch
    and the models imported, so each child is a fork of it: ~0.03 s instead of the ~2 s of a spawned
    interpreter importing torch). Never a fork of this process: that may hold Ray, CUDA or running threads."""
    global _CHILDREN
    if _CHILDREN is None:
        _CHILDREN = mp.get_context("forkserver")
        # torch._dynamo: what the first optimizer built in a process imports (~2 s here)
        _CHILDREN.set_forkserver_preload(["torch", "torch._dynamo", "raylsm.models.ctr", "raylsm.models.registry",
                                          "raylsm.train.optim", "raylsm.train.step", "raylsm.bench.common",
                                          "torch.distributed", "raylsm.models.sharded_embedding"])
    return _CHILDREN


def in_child(fn: Callable, *args) -> Any:
    """Run ``fn(*args)`` in a process of its own (its own peak RSS, torch threads and CUDA context)."""
    with child_context().Pool(1) as pool:
        return pool.apply(fn, args)

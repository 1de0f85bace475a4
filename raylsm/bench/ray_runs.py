"""``raylsm bench ingest|train``: the Ray-side figures (see :mod:`raylsm.bench` for the table; ``startup`` is in
:mod:`raylsm.bench.startup`)."""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

from raylsm.bench.common import csv_ints, in_child, log, machine, median, resolve_device, sync, time_train_steps


def bench_dataset(args: argparse.Namespace, tmp: str) -> str:
    """``--data``, or a synthetic dataset of ``--rows`` rows written under ``tmp``."""
    from raylsm.data.contract import read_manifest

    if args.data:
        read_manifest(args.data)  # a clear error for a directory that is not a dataset
        return args.data
    from raylsm.data.synth import SynthConfig, generate_config

    for name in ("rows", "shards", "ll_len", "st_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    out = os.path.join(tmp, "synth")
    log(f"generating {args.rows} rows (L={args.ll_len}, {args.shards} shards) in {out}")
    generate_config(out, SynthConfig(rows=args.rows, ll_len=args.ll_len, st_len=args.st_len, shards=args.shards), progress=False)
    return out


# ----------------------------------------------------------------------------- ingest


def _consume(batches, device) -> int:
    """Hand every batch to ``device`` (as training does); rows seen."""
    from raylsm.train.step import to_device

    rows = 0
    for batch in batches:
        if device.type == "cuda":
            batch = to_device(batch, device)  # host-to-device copy and widening, as in train_epoch
        rows += int(batch["label"].shape[0])
    sync(device)
    return rows


def local_rows_per_s(data: str, spec, batch: int, device) -> tuple[float, int]:
    """The one-process reader (``iter_local_batches``, Arrow on one thread) into tensors on ``device``."""
    import pyarrow as pa
    import torch

    from raylsm.data.collate import iter_local_batches

    before = pa.cpu_count()
    pa.set_cpu_count(1)  # one process, one CPU: the per-CPU reference the Ray figures scale against
    try:
        start = time.perf_counter()
        tensors = ({k: torch.from_numpy(v) for k, v in b.items()} for b in iter_local_batches(data, "train", spec, batch))
        if device.type == "cuda":
            tensors = ({k: v.pin_memory() for k, v in b.items()} for b in tensors)
        rows = _consume(tensors, device)
        return rows / (time.perf_counter() - start), rows
    finally:
        pa.set_cpu_count(before)


def ray_rows_per_s(data: str, spec, batch: int, device, cpus: int, block_rows: int, prefetch: int) -> tuple[float, int]:
    """The training path: ``read_split`` (one CPU per read task, at most ``cpus`` at once) -> ``torch_batches``."""
    import ray.data

    from raylsm.data.pipeline import read_split
    from raylsm.train.batches import torch_batches

    ray.data.DataContext.get_current().execution_options.resource_limits = ray.data.ExecutionResources(cpu=cpus)
    # Ray Data's CPU limit is a soft one (without the per-operator reservation, data.op_reservation, it lets a
    # second task start beside the first), so fewer CPUs than the cluster's are also a cap on the tasks at once.
    # (Not with all of them: Ray itself bounds those, and a cap makes Ray Data back off below it.)
    cap = cpus if cpus < ray.cluster_resources().get("CPU", cpus) else None
    ds = read_split(data, "train", spec, block_rows, shuffle_seed=0, task_cpus=1.0, concurrency=cap)
    start = time.perf_counter()
    rows = _consume(torch_batches(ds.iterator(), batch, device, prefetch=prefetch), device)
    return rows / (time.perf_counter() - start), rows


def run_ingest(args: argparse.Namespace) -> dict:
    import ray.data

    from raylsm.data.collate import collate_spec, narrow_id_dtypes
    from raylsm.data.contract import read_manifest
    from raylsm.train.cluster import ensure_ray

    device = resolve_device(args.device)
    cpus = csv_ints(args.cpus, "--cpus")
    if args.batch < 1 or args.repeats < 1 or args.block_rows < 1 or args.prefetch < 0:
        raise ValueError("--batch, --repeats, --block-rows: must be >= 1 (--prefetch >= 0)")
    with tempfile.TemporaryDirectory(prefix="raylsm-bench-") as tmp:
        data = bench_dataset(args, tmp)
        manifest = read_manifest(data)
        spec = collate_spec({"st_len": args.st_len, "ll_len": args.ll_len}, manifest, narrow_id_dtypes(manifest.vocab))
        rows = manifest.splits["train"]["rows"]
        ensure_ray(num_cpus=max(cpus), quiet=True)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        limits = ctx.execution_options.resource_limits
        try:
            log("warm-up: one pass of the Ray path (starts its workers)")
            ray_rows_per_s(data, spec, args.batch, device, max(cpus), args.block_rows, args.prefetch)
            single: list[float] = []
            by_cpus: dict[int, list[float]] = {n: [] for n in cpus}
            for r in range(args.repeats):  # interleaved: a noisy moment hits reference and Ray alike
                passes = [local_rows_per_s(data, spec, args.batch, device)]
                single.append(passes[0][0])
                for n in cpus:
                    passes.append(ray_rows_per_s(data, spec, args.batch, device, n, args.block_rows, args.prefetch))
                    by_cpus[n].append(passes[-1][0])
                if any(seen != rows for _, seen in passes):  # a rate is only a figure if every row was delivered
                    raise RuntimeError(f"ingest: a pass delivered {[seen for _, seen in passes]} rows, the split has {rows}")
                log(f"repeat {r + 1}/{args.repeats}: one process {single[-1]:,.0f} rows/s; "
                    + "; ".join(f"Ray Data {n} CPU {by_cpus[n][-1]:,.0f}" for n in cpus))
        finally:
            ctx.execution_options.resource_limits = limits
    one = median(single)
    ray_med = {str(n): round(median(v), 1) for n, v in by_cpus.items()}
    scaling = {str(n): round(median(v) / (n * one), 3) for n, v in by_cpus.items()}
    top = max(cpus)
    return {
        "bench": "ingest", "device": device.type, "rows": rows, "ll_len": args.ll_len, "batch": args.batch,
        "ratio": scaling[str(top)], "ratio_is": f"Ray Data rows/s with {top} CPUs / ({top} x one-process rows/s)",
        "single_process_rows_per_s": round(one, 1), "ray_rows_per_s": ray_med, "scaling": scaling,
        "repeats": {"single_process": [round(x, 1) for x in single],
                    "ray": {str(n): [round(x, 1) for x in v] for n, v in by_cpus.items()}},
        "machine": machine(),
    }


# ----------------------------------------------------------------------------- train


def step_only_child(job_dict: dict, data: str, steps: int, repeats: int, threads: int, device_name: str) -> list[float]:
    """Samples/s of the training step alone on a real batch of ``data`` (same model, batch and threads as a worker)."""
    import torch

    from raylsm.config import from_dict
    from raylsm.data.collate import collate_spec, iter_local_batches
    from raylsm.data.contract import read_manifest
    from raylsm.models.ctr import build_model
    from raylsm.models.layers import Vocab
    from raylsm.train.config import JobConfig
    from raylsm.train.step import seed_everything, to_device

    torch.set_num_threads(threads)
    job = from_dict(JobConfig, job_dict)
    manifest = read_manifest(data)
    device = torch.device(device_name)
    spec = collate_spec(job.data, manifest)
    # Distinct real batches, cycled: one repeated batch would keep its embedding rows in cache.
    first = itertools.islice(iter_local_batches(data, "train", spec, job.train.batch_size, shuffle_seed=job.train.seed), steps + 1)
    batches = [to_device({k: torch.from_numpy(v) for k, v in b.items()}, device) for b in first]
    batches = [b for b in batches if len(b["label"]) == job.train.batch_size] or batches
    rates = []
    for _ in range(repeats):
        seed_everything(job.train.seed)
        net = build_model(job.model, Vocab.from_manifest(manifest)).to(device)
        if job.train.compile:
            net.compile()
        times = time_train_steps(net, batches, device, steps, bf16=job.train.bf16 and device.type == "cuda",
                                 warmup=3 if job.train.compile else 1, lr=job.train.lr)
        rates.append(job.train.batch_size / median(times))
    return rates


def run_train(args: argparse.Namespace) -> dict:
    from mlflow.tracking import MlflowClient

    from raylsm.train.config import job_to_dict, resolve_job
    from raylsm.train.run import run_training

    device = resolve_device(args.device)
    if args.epochs < 2:
        raise ValueError("--epochs: must be >= 2 (the first epoch is warm-up and not counted)")
    with tempfile.TemporaryDirectory(prefix="raylsm-bench-") as tmp:
        data = bench_dataset(args, tmp)
        job = resolve_job(preset=args.model, overrides=[
            f"data.path={data}", f"data.ll_len={args.ll_len}", f"data.st_len={args.st_len}", "data.val_fraction=0",
            f"train.batch_size={args.batch}", f"train.epochs={args.epochs}", f"train.cpus_per_worker={args.cpus_per_worker}",
            f"train.use_gpu={device.type == 'cuda'}", f"storage={tmp}/runs", f"mlflow.tracking_uri=sqlite:///{tmp}/train.db",
            "mlflow.experiment=bench-train", *args.overrides])
        threads = max(1, int(job.train.cpus_per_worker))  # Ray gives a worker OMP_NUM_THREADS = its CPUs
        log(f"step-only reference: {args.model}, B={job.train.batch_size}, {threads} thread(s), {args.repeats} x {args.steps} steps")
        step_rates = in_child(step_only_child, job_to_dict(job), data, args.steps, args.repeats, threads, device.type)
        log(f"step only: {median(step_rates):,.0f} samples/s; Ray Train run, {args.epochs} epochs")
        result = run_training(job)
        history = MlflowClient(tracking_uri=result["tracking_uri"]).get_metric_history(result["mlflow_run_id"], "samples_per_s")
        epochs = [m.value for m in sorted(history, key=lambda m: m.step)]
    counted = epochs[1:]
    ray_rate = median(counted)
    step_rate = median(step_rates)
    log(f"Ray Train: {ray_rate:,.0f} samples/s (epochs 2..{len(epochs)}), step only {step_rate:,.0f}")
    return {
        "bench": "train", "device": device.type, "model": args.model, "batch": job.train.batch_size,
        "ll_len": job.data.ll_len, "workers": job.train.workers, "threads_per_worker": threads,
        "ratio": round(ray_rate / step_rate, 3), "ratio_is": "Ray Train samples/s / step-only samples/s",
        "ray_samples_per_s": round(ray_rate, 1), "step_only_samples_per_s": round(step_rate, 1),
        "ray_epochs_samples_per_s": [round(x, 1) for x in epochs], "step_only_repeats": [round(x, 1) for x in step_rates],
        "machine": machine(),
    }

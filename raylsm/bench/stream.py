"""``raylsm bench stream``: per-worker memory over a bounded training run that streams a dataset through Ray Data.

The training path itself (:func:`raylsm.data.pipeline.read_split` -> ``streaming_split`` -> each worker's
:func:`raylsm.train.batches.torch_batches` -> :func:`raylsm.train.step.train_epoch`) on ``--data`` (or a
generated dataset of ``--rows`` rows) for ``--steps`` steps per worker, one pass, no evaluation and no
checkpoint: what it measures is whether a worker's memory stays put while rows flow through it, whatever
the dataset's size. Every ``--sample-every`` steps (and before the first and after the last) each worker
samples its own process's resident memory (``rss_mb``; ``private_mb`` = RSS less the pages it shares, such as
the object store's blocks it maps) and the rows it has read; the samples are gathered to rank 0 and reported.

``ratio``: the largest, over the workers, of RSS at the end ÷ RSS once ``--warmup`` of the steps are done (the
model, the optimizer's moments and the first blocks allocated); ``thirds_ratio``: the same with the mean RSS of
the last and the first third of the samples after the warm-up (per worker ``rss_thirds_mb`` and
``private_thirds_mb``: start, middle, end), steadier on a curve that swings with the batches in flight;
``slope_mb_per_million_rows``: least-squares
growth of RSS against rows read after the warm-up (flat = about 0); ``private_ratio`` and
``private_slope_mb_per_million_rows``: the same for the private part. RSS also counts the pages of the node's
object store the worker has mapped while reading blocks zero-copy: that part rises towards the store's size
(``--object-store-mb`` for a local cluster) whatever the rows read; the private part is the worker's own. Progress (one line per sample, from rank 0)
goes to stderr; the JSON is the last stdout line.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

from raylsm.bench.common import log, machine


def _memory_mb() -> tuple[float, float]:
    """This process's resident memory and the part of it not shared with other processes, MiB."""
    import psutil

    info = psutil.Process().memory_info()
    return info.rss / 2**20, (info.rss - getattr(info, "shared", 0)) / 2**20


def stream_worker(config: dict) -> None:
    """Ray Train entry point: ``config["steps"]`` training steps on this worker's shard of ``train``, sampled."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from raylsm.models.ctr import build_model
    from raylsm.models.sharded_embedding import build_sharded_model
    from raylsm.train.batches import torch_batches
    from raylsm.train.optim import build_optimizer
    from raylsm.train.step import seed_everything, train_epoch, unused_parameters

    job, vocab, steps, every, progress = (config[k] for k in ("job", "vocab", "steps", "sample_every", "progress"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(job.train.seed + rank)
    device = ray.train.torch.get_device()
    if job.train.embedding_sharding == "row" and world > 1:
        model, _ = build_sharded_model(job.model, vocab, world, rank)
    else:
        model = build_model(job.model, vocab)
    optimizer = build_optimizer(model, job.train.lr, job.train.fused_adam, job.train.embedding_update,
                                job.train.weight_decay)
    find_unused = bool(unused_parameters(job, vocab)) if world > 1 else False
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True} if find_unused else None)
    started = time.perf_counter()
    samples: list[list[float]] = []
    read = {"rows": 0, "steps": 0}

    def sample() -> None:
        rss, private = _memory_mb()
        samples.append([round(time.perf_counter() - started, 2), read["steps"], read["rows"], round(rss, 1), round(private, 1)])
        if rank == 0 and progress is not None:
            progress.put_nowait(samples[-1])

    def on_step(n: int) -> None:
        read["rows"] += n
        read["steps"] += 1
        if read["steps"] % every == 0 and read["steps"] < steps:
            sample()

    sample()
    batches = torch_batches(ray.train.get_dataset_shard("train"), job.train.batch_size, device,
                            prefetch=job.train.prefetch_batches, pin_memory=job.train.pin_memory)
    stats = train_epoch(model, optimizer, batches, device, max_steps=steps, bf16=job.train.bf16, on_step=on_step)
    sample()
    everyone = [samples]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * world
        dist.all_gather_object(everyone, samples)
    metrics = {"samples": everyone, "train_loss": stats.train_loss, "seconds": stats.seconds}
    if rank == 0:  # Ray Train keeps a report's metrics with its checkpoint: one small file carries them
        import json
        import os

        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "samples.json"), "w") as f:
                json.dump(everyone, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def _fit_line(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 when xs do not vary)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0


def summarise(samples: list[list[float]], steps: int, warmup: float) -> dict:
    """One worker's samples ``[seconds, steps, rows, rss_mb, private_mb]`` -> start / middle / end and growth."""
    after = [s for s in samples if s[1] >= warmup * steps] or samples[-1:]
    start, end = after[0], samples[-1]
    middle = min(after, key=lambda s: abs(s[2] - (start[2] + end[2]) / 2))
    millions = [s[2] / 1e6 for s in after]
    slope = _fit_line(millions, [s[3] for s in after]) if len(after) > 1 else 0.0
    private_slope = _fit_line(millions, [s[4] for s in after]) if len(after) > 1 else 0.0

    def point(s: list[float]) -> dict:
        return {"seconds": s[0], "steps": int(s[1]), "rows": int(s[2]), "rss_mb": s[3], "private_mb": s[4]}

    # The mean of each third of the samples after the warm-up: on a curve that swings with the batches in
    # flight, a trend shows here, where two single samples may fall at the swing's bottom and top.
    thirds = [after[i * len(after) // 3:(i + 1) * len(after) // 3] or after for i in range(3)]
    rss_thirds = [round(sum(s[3] for s in t) / len(t), 1) for t in thirds]
    private_thirds = [round(sum(s[4] for s in t) / len(t), 1) for t in thirds]
    return {"start": point(start), "middle": point(middle), "end": point(end), "rows_read": int(end[2]),
            "rss_thirds_mb": rss_thirds, "private_thirds_mb": private_thirds,
            "thirds_ratio": round(rss_thirds[2] / rss_thirds[0], 3),
            "peak_rss_mb": max(s[3] for s in samples), "ratio": round(end[3] / start[3], 3),
            "slope_mb_per_million_rows": round(slope, 2), "private_ratio": round(end[4] / start[4], 3),
            "private_slope_mb_per_million_rows": round(private_slope, 2),
            "curve": [point(s) for s in samples]}


def run_stream(args: argparse.Namespace) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from raylsm.bench.common import resolve_device
    from raylsm.bench.ray_runs import bench_dataset
    from raylsm.data.collate import collate_spec
    from raylsm.data.contract import read_manifest
    from raylsm.data.pipeline import read_split
    from raylsm.models.layers import Vocab
    from raylsm.train.backend import torch_config
    from raylsm.train.cluster import ensure_ray
    from raylsm.train.config import resolve_job

    device = resolve_device(args.device)
    for name in ("steps", "workers", "batch", "sample_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.object_store_mb is not None and args.object_store_mb < 100:
        raise ValueError(f"--object-store-mb: must be >= 100 (Ray's own minimum is about 75 MiB), got {args.object_store_mb}")
    if not 0 <= args.warmup < 1:
        raise ValueError(f"--warmup: must be in [0, 1), got {args.warmup}")
    with tempfile.TemporaryDirectory(prefix="raylsm-bench-") as tmp:
        data = bench_dataset(args, tmp)
        manifest = read_manifest(data)
        ll_len = args.ll_len if args.data is None else manifest.max_len["ll"]
        st_len = args.st_len if args.data is None else manifest.max_len["st"]
        job = resolve_job(preset=args.model, overrides=[
            f"data.path={data}", f"data.ll_len={ll_len}", f"data.st_len={st_len}", f"train.batch_size={args.batch}",
            f"train.workers={args.workers}", f"train.cpus_per_worker={args.cpus_per_worker}",
            f"train.use_gpu={device.type == 'cuda'}", *args.overrides])
        rows = manifest.splits["train"]["rows"]
        if args.steps * args.batch * args.workers > rows:
            raise ValueError(f"--steps: {args.steps} steps x {args.batch} rows x {args.workers} workers is more than the "
                             f"{rows} training rows of {data}")
        ensure_ray(quiet=True, object_store_mb=args.object_store_mb)
        spec = collate_spec(job.data, manifest)
        dataset = read_split(data, "train", spec, job.data.block_rows, shuffle_seed=job.train.seed,
                             task_cpus=job.data.task_cpus, concurrency=job.data.read_concurrency or None,
                             narrow_ids=job.data.narrow_ids, op_reservation=job.data.op_reservation)
        progress = Queue()
        done = threading.Event()

        def show() -> None:
            while not done.is_set():
                try:
                    t, step, read, rss, private = progress.get(timeout=1)
                except Empty:
                    continue
                log(f"  {t:7.1f} s  step {int(step):>6}/{args.steps}  rows {int(read):>10,}  RSS {rss:8.1f} MiB  "
                    f"(private {private:.1f})")

        log(f"stream: {args.model}, {args.workers} worker(s), {args.steps} steps of {args.batch} rows each, "
            f"from {rows:,} training rows (L={ll_len}) in {data}")
        printer = threading.Thread(target=show, name="raylsm-stream-progress", daemon=True)
        printer.start()
        trainer = TorchTrainer(
            stream_worker, torch_config=torch_config(),
            train_loop_config={"job": job, "vocab": Vocab.from_manifest(manifest), "steps": args.steps,
                               "sample_every": args.sample_every, "progress": progress},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=device.type == "cuda",
                                                   resources_per_worker={"CPU": args.cpus_per_worker}),
            run_config=ray.train.RunConfig(name="bench-stream", storage_path=f"{tmp}/runs"),
            datasets={"train": dataset})
        started = time.perf_counter()
        try:
            result = trainer.fit()
        finally:
            done.set()
            printer.join()
        if result.error is not None:
            raise result.error
        seconds = time.perf_counter() - started
    workers = [summarise(s, args.steps, args.warmup) for s in result.metrics["samples"]]
    return {
        "bench": "stream", "device": device.type, "model": args.model, "data": args.data, "dataset_rows": rows,
        "object_store_mb": args.object_store_mb,
        "ll_len": ll_len, "batch": args.batch, "workers": args.workers, "steps": args.steps,
        "ratio": max(w["ratio"] for w in workers),
        "ratio_is": "largest over the workers of RSS at the end / RSS after the warm-up steps",
        "thirds_ratio": max(w["thirds_ratio"] for w in workers),
        "thirds_ratio_is": "largest over the workers of mean RSS in the last third of the samples after the "
                           "warm-up / in the first third",
        "slope_mb_per_million_rows": max(w["slope_mb_per_million_rows"] for w in workers),
        "private_ratio": max(w["private_ratio"] for w in workers),
        "private_slope_mb_per_million_rows": max(w["private_slope_mb_per_million_rows"] for w in workers),
        "rows_read": sum(w["rows_read"] for w in workers), "train_seconds": round(seconds, 1),
        "per_worker": workers, "machine": machine(),
    }


def add_stream_parser(sub, common) -> None:
    p = sub.add_parser("stream", help="per-worker memory over a bounded run streaming a dataset through Ray Data")
    common(p)
    p.add_argument("--data", help="dataset directory; default: a synthetic one generated in a temporary directory")
    p.add_argument("--rows", type=int, default=20_000, help="rows of the generated dataset")
    p.add_argument("--shards", type=int, default=8, help="shards of the generated dataset")
    p.add_argument("--ll-len", type=int, default=500, help="lifelong length of the generated dataset")
    p.add_argument("--st-len", type=int, default=50, help="short-term length of the generated dataset")
    p.add_argument("--model", default="lap")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="job config override, e.g. --set model.features.emb_dim=16 (repeatable)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="training steps per worker")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--sample-every", type=int, default=10, help="steps between memory samples")
    p.add_argument("--object-store-mb", type=int,
                   help="object store of the local cluster this starts, MiB (default: Ray's, 30 %% of the memory). "
                        "A worker's RSS counts the store's pages it has mapped (the blocks it read, zero-copy): "
                        "up to the store's size, however many rows flow")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="share of the steps before the reference sample of `ratio` (default 0.1)")

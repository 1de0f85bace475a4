"""``raylsm bench scale``: step time and per-worker memory against the item vocabulary and the embedding mode.

For every (embedding mode, worker count, item vocabulary) ``W`` fresh processes (forks of the bench's fork
server; ``torch.distributed`` on gloo over loopback when ``W`` > 1, DDP as :func:`ray.train.torch.prepare_model` sets it up) each
build the model (``--model``, default ``lap``; ``--emb``, default 64), its optimizer for the mode
(:func:`raylsm.train.optim.build_optimizer`) and a random batch of ``--batch`` rows (ids uniform over the
vocabulary: nearly every id distinct at 4 M, the costliest case for row-wise updates), then time
``--steps`` training steps (forward, backward, optimizer, through the trainer's own epoch loop) after
``--warmup``. Per worker: the median step (wall clock, and the process's CPU time, which other load on a
shared machine disturbs far less), peak RSS and the bytes of the embedding tables with their gradients
and optimizer state (``table_mb``). A row's step time is the slowest worker's.

Modes: ``dense`` (Adam over whole tables, DDP all-reduces them), ``sparse`` (``train.embedding_update =
sparse``: row-sparse gradients, row-wise Adam, table rows exchanged), ``sharded`` (sparse, and the item table
row-sharded over the workers, :mod:`raylsm.models.sharded_embedding`; built as the rank's shard only).

``ratio`` (per mode and worker count, ``"<mode>/<W>w"``): step time at the largest vocabulary ÷ at the
smallest; ``cpu_ratio`` the same in CPU time; ``memory_ratio``: the same for peak RSS per worker;
``table_memory_ratio`` for ``table_mb``.
Progress goes to stderr; the JSON is the last stdout line.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time
from typing import Any

from raylsm.bench.common import DEFAULT_VOCAB, child_context, csv_ints, csv_names, log, machine, median

MODES = ("dense", "sparse", "sharded")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tensor_mb(t: Any) -> float:
    """MiB held by a tensor (a sparse one: its indices and values)."""
    import torch

    if not isinstance(t, torch.Tensor):
        return 0.0
    if t.is_sparse:
        return (_tensor_mb(t._indices()) + _tensor_mb(t._values()))
    return t.numel() * t.element_size() / 2**20


def table_memory_mb(model, optimizer) -> float:
    """MiB of the embedding tables of ``model``: weights, gradients and their optimizer state."""
    from raylsm.train.optim import embedding_tables, sharded_tables

    total = 0.0
    state = optimizer.state
    for _, table in embedding_tables(model) + sharded_tables(model):
        w = table.weight
        total += _tensor_mb(w) + _tensor_mb(w.grad)
        total += sum(_tensor_mb(v) for v in state.get(w, {}).values())
    return total


def scale_worker(rank: int, world: int, port: int, spec: dict, results) -> None:
    """One worker of one (mode, workers, vocab) point: time ``spec['steps']`` steps, put its figures on ``results``."""
    import torch
    import torch.distributed as dist

    from raylsm.bench.common import random_batch
    from raylsm.config import apply_overrides
    from raylsm.models.ctr import build_model
    from raylsm.models.registry import preset_config
    from raylsm.models.config import ModelConfig
    from raylsm.models.layers import Vocab
    from raylsm.train.step import to_device, train_epoch
    from raylsm.train.optim import build_optimizer

    try:
        torch.set_num_threads(spec["threads"])
        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        vocab = dict(DEFAULT_VOCAB, item=spec["vocab"])
        torch.manual_seed(rank)
        extra = apply_overrides({}, [f"features.emb_dim={spec['emb']}", *spec["overrides"]], ModelConfig)
        cfg = preset_config(spec["model"], extra)
        if spec["mode"] == "sharded":  # the item table is built as this rank's shard only, never whole
            from raylsm.models.sharded_embedding import RowShardedEmbedding

            net = build_model(cfg, Vocab(**dict(vocab, item=2)))
            net.features.tables["item"] = RowShardedEmbedding(spec["vocab"], cfg.features.emb_dim,
                                                              init=cfg.features.emb_init, std=cfg.features.emb_std)
        else:
            net = build_model(cfg, Vocab(**vocab))
        opt = build_optimizer(net, spec["lr"], True, "dense" if spec["mode"] == "dense" else "sparse")
        model = net
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(net)
        device = torch.device("cpu")
        batch = to_device(random_batch(spec["batch"], spec["st_len"], spec["ll_len"], vocab, seed=rank), device)
        rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times: list[float] = []
        cpu: list[float] = []
        last = [time.perf_counter(), time.process_time()]

        def on_step(_: int) -> None:
            now, now_cpu = time.perf_counter(), time.process_time()
            times.append(now - last[0])
            cpu.append(now_cpu - last[1])
            last[:] = [now, now_cpu]

        def repeat():
            while True:
                yield batch

        if world > 1:
            dist.barrier()
        last[:] = [time.perf_counter(), time.process_time()]
        train_epoch(model, opt, repeat(), device, max_steps=spec["warmup"] + spec["steps"], on_step=on_step)
        results.put({"rank": rank, "step_s": median(times[spec["warmup"]:]), "cpu_s": median(cpu[spec["warmup"]:]),
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "rss_built_mb": rss_built, "table_mb": table_memory_mb(net, opt),
                     "table_rows": int(net.features.tables["item"].weight.shape[0])})
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    except BaseException as e:  # reported to the parent, which names the point that failed
        results.put({"rank": rank, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})
        raise


def run_point(spec: dict, world: int, timeout: float) -> dict:
    """``world`` fresh workers (forks of the fork server) for one point; the row: step time of the slowest,
    memory of the largest worker."""
    ctx = child_context()  # forks of a server with torch and the models imported: no interpreter start per point
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=scale_worker, args=(r, world, port, spec, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"bench scale: {spec['mode']} x{world} at {spec['vocab']:,} ids took over {timeout:.0f} s")
            try:
                got.append(results.get(timeout=min(remaining, 5.0)))
            except Exception:  # queue.Empty: check the workers are alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"bench scale: a worker of {spec['mode']} x{world} at {spec['vocab']:,} ids "
                                       f"exited with {dead[0].exitcode}") from None
        errors = [g["error"] for g in got if "error" in g]
        if errors:
            raise RuntimeError(f"bench scale: {spec['mode']} x{world} at {spec['vocab']:,} ids: {errors[0]}")
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return {"mode": spec["mode"], "workers": world, "item_vocab": spec["vocab"],
            "step_ms": round(1000 * max(g["step_s"] for g in got), 1),
            "step_cpu_ms": round(1000 * max(g["cpu_s"] for g in got), 1),
            "peak_rss_mb_per_worker": round(max(g["peak_rss_mb"] for g in got), 1),
            "built_rss_mb_per_worker": round(max(g["rss_built_mb"] for g in got), 1),
            "table_mb_per_worker": round(max(g["table_mb"] for g in got), 4),  # KiB-sized at tiny test vocabularies
            "item_rows_per_worker": max(g["table_rows"] for g in got)}


def run_scale(args: argparse.Namespace) -> dict:
    """Sweep vocabularies x modes x worker counts; ``ratio`` per ``"<mode>/<W>w"``: largest vocab ÷ smallest."""
    if args.device != "cpu":
        raise ValueError("--device: bench scale measures the CPU build (gloo workers); use --device cpu")
    vocabs = sorted(set(csv_ints(args.vocab, "--vocab")))
    modes = csv_names(args.modes, "--modes", MODES)
    workers = sorted(set(csv_ints(args.workers, "--workers")))
    cpus = os.cpu_count() or 1
    rows = []
    for mode in modes:
        for world in workers:
            for vocab in vocabs:
                spec = {"mode": mode, "vocab": vocab, "model": args.model, "emb": args.emb, "batch": args.batch,
                        "ll_len": args.ll_len, "st_len": args.st_len, "steps": args.steps, "warmup": args.warmup,
                        "lr": 1e-3, "overrides": list(args.overrides),
                        "threads": args.threads or max(1, cpus // max(workers))}
                row = run_point(spec, world, args.timeout)
                log(f"scale {mode:7s} x{world} item ids {vocab:>11,}  step {row['step_ms']:9.1f} ms (CPU "
                    f"{row['step_cpu_ms']:9.1f} ms)  peak RSS/worker "
                    f"{row['peak_rss_mb_per_worker']:8.0f} MB  tables/worker {row['table_mb_per_worker']:8.1f} MB")
                rows.append(row)
    ratio, cpu_ratio, memory_ratio, table_ratio = {}, {}, {}, {}
    for mode in modes:
        for world in workers:
            mine = {r["item_vocab"]: r for r in rows if r["mode"] == mode and r["workers"] == world}
            lo, hi = mine[vocabs[0]], mine[vocabs[-1]]
            key = f"{mode}/{world}w"
            ratio[key] = round(hi["step_ms"] / lo["step_ms"], 3)
            cpu_ratio[key] = round(hi["step_cpu_ms"] / max(lo["step_cpu_ms"], 1e-9), 3)
            memory_ratio[key] = round(hi["peak_rss_mb_per_worker"] / lo["peak_rss_mb_per_worker"], 3)
            table_ratio[key] = round(hi["table_mb_per_worker"] / max(lo["table_mb_per_worker"], 1e-9), 3)
    return {"bench": "scale", "device": "cpu", "ratio": ratio, "cpu_ratio": cpu_ratio, "memory_ratio": memory_ratio,
            "table_memory_ratio": table_ratio,
            "ratio_is": f"step time at {vocabs[-1]:,} item ids / at {vocabs[0]:,}, per mode and worker count",
            "model": args.model, "emb": args.emb, "batch": args.batch, "ll_len": args.ll_len,
            "vocabs": vocabs, "results": rows, "machine": machine()}


def add_scale_parser(sub, common) -> None:
    """The ``raylsm bench scale`` subcommand on ``sub`` (``common`` adds --device and the MLflow options)."""
    p = sub.add_parser("scale", help="step time and per-worker memory vs item vocabulary, embedding mode, 1/2 workers")
    common(p)
    p.add_argument("--vocab", default="10000,4000000",
                   help="comma-separated item vocabularies (e.g. 10000,1000000,4000000,10000000); ratio = largest / smallest")
    p.add_argument("--modes", default=",".join(MODES), help=f"embedding modes, comma-separated ({', '.join(MODES)})")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated (gloo on loopback)")
    p.add_argument("--model", default="lap")
    p.add_argument("--emb", type=int, default=64, help="features.emb_dim")
    p.add_argument("--batch", type=int, default=256, help="rows per worker per step")
    p.add_argument("--ll-len", type=int, default=300)
    p.add_argument("--st-len", type=int, default=50)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up); the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = CPUs / the most workers swept: the same for every point)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. --set lap.k1=100 (repeatable)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one point may take")

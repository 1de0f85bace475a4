"""``raylsm bench startup``: seconds from ``raylsm train`` starting to its first training batch, against the
in-process path and Ray's own floor (a bare ``TorchTrainer``), on a fresh or an already running local cluster."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raylsm.bench.common import log, machine, median, resolve_device
from raylsm.bench.ray_runs import bench_dataset


def local_first_batch(data: str, model: str, overrides: list[str], mark: str) -> None:
    """The in-process path up to its first training batch (manifest, model, first batch), then write the time."""
    import torch

    from raylsm.data.collate import collate_spec, iter_local_batches
    from raylsm.data.contract import read_manifest
    from raylsm.models.ctr import build_model
    from raylsm.models.layers import Vocab
    from raylsm.train.config import resolve_job

    job = resolve_job(preset=model, overrides=[f"data.path={data}", *overrides])
    manifest = read_manifest(data)
    build_model(job.model, Vocab.from_manifest(manifest))
    spec = collate_spec(job.data, manifest)
    batch = next(iter_local_batches(data, "train", spec, job.train.batch_size, shuffle_seed=job.train.seed))
    {k: torch.from_numpy(v) for k, v in batch.items()}
    Path(mark).write_text(repr(time.time()))


def bare_trainer_first_batch(mark: str, storage: str) -> None:
    """Ray's own floor: a fresh local cluster (as ``raylsm train`` starts it) and a bare ``TorchTrainer``
    streaming ``ray.data.range`` to one worker, up to its first batch; no model, data files or MLflow."""
    from raylsm.train.cluster import ensure_ray

    ensure_ray(quiet=True)  # before Ray is imported here: it reads the loopback setting at import
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        next(iter(ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=64)))
        Path(config["mark"]).write_text(repr(time.time()))

    TorchTrainer(loop, train_loop_config={"mark": mark}, datasets={"train": ray.data.range(1000)},
                 scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(storage_path=storage)).fit()


def hold_local_cluster(num_cpus: float | None = None) -> None:
    """Start a local cluster as ``raylsm train`` does, print its GCS address, keep it until stdin closes."""
    from raylsm.train.cluster import ensure_ray

    ensure_ray(num_cpus=num_cpus, quiet=True)  # before Ray is imported here: it reads the loopback setting at import
    import ray

    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()


@contextlib.contextmanager
def starting_local_cluster(num_cpus: int | None = None):
    """Start a local loopback cluster in a process of its own now, and keep it for the duration.

    ``num_cpus``: its logical CPUs (None: Ray's count of this machine's).

    Yields ``address(timeout)``, which waits (at most ``timeout`` seconds) for the cluster to be up and
    returns its address: whatever runs in between overlaps the cluster's start-up.
    """
    code = f"from raylsm.bench.startup import hold_local_cluster; hold_local_cluster({num_cpus!r})"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    known: list[str] = []

    def address(timeout: float) -> str:
        if not known:
            ready = select.select([proc.stdout], [], [], timeout)[0]
            line = proc.stdout.readline().strip() if ready else ""
            if not line:
                raise RuntimeError(f"the local cluster for `--cluster running` did not start within {timeout:.0f} s")
            log(f"local cluster running at {line}")
            known.append(line)
        return known[0]

    try:
        yield address
    finally:
        proc.stdin.close()  # the holder's driver exits and its local cluster stops with it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def running_local_cluster(timeout: float):
    """A local loopback cluster in a process of its own for the duration: yields its address once it is up."""
    with starting_local_cluster() as address:
        yield address(timeout)


def _time_to_mark(cmd: list[str], mark: Path, timeout: float, env: dict, grace: float = 60.0) -> float:
    """Seconds from starting ``cmd`` to the time it writes into ``mark``.

    What follows the first batch is not part of the figure, so the command is then interrupted as Ctrl-C
    would (SIGINT: ``raylsm train`` ends its MLflow run KILLED and stops its local cluster), and its
    processes (Ray's included) are waited for, so the next repeat starts on an idle machine; what is still
    running ``grace`` seconds later is killed.
    """
    start = time.time()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            while proc.poll() is None and _mark_time(mark) is None and time.time() - start < timeout:
                time.sleep(0.1)
            stamp = _mark_time(mark)
            if stamp is None:
                what = (f"wrote no first batch within {timeout:.0f} s" if proc.poll() is None
                        else f"exited {proc.returncode} before its first batch")
                err.seek(0)
                tail = err.read().strip().splitlines()[-3:]
                raise RuntimeError(f"`{' '.join(cmd[:4])} ...` {what}: {' | '.join(tail)}")
        finally:
            interrupt_and_reap(proc, grace)
    return stamp - start


def _mark_time(mark: Path) -> float | None:
    """The time written into ``mark``, or None while it is absent or still being written."""
    try:
        return float(mark.read_text())
    except (FileNotFoundError, ValueError):
        return None


def interrupt_and_reap(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT ``proc`` (if still running), then wait for it and every process it started; kill what outlives ``grace``."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, left = psutil.wait_procs(family, timeout=grace / 2)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    deadline = time.time() + 10
    while left and time.time() < deadline:  # SIGKILL lands asynchronously; an orphan may stay a zombie
        left = [p for p in left if _running(p)]
        time.sleep(0.05)


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_startup(args: argparse.Namespace) -> dict:
    resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="raylsm-bench-") as tmp:
        data = bench_dataset(args, tmp)
        sets = [f"data.ll_len={args.ll_len}", f"data.st_len={args.st_len}", *args.overrides]
        train_cmd = [sys.executable, "-m", "raylsm", "train", "--model", args.model, "--data", data, "--epochs", "1",
                     "--storage", f"{tmp}/runs", "--tracking-uri", f"sqlite:///{tmp}/train.db",
                     "--set", "train.max_steps_per_epoch=2", "--set", "data.val_fraction=0",
                     *(x for s in sets for x in ("--set", s))]
        if args.device == "cuda":
            train_cmd.append("--gpu")
        ray_s, local_s, floor_s = [], [], []
        with contextlib.ExitStack() as stack:
            # fresh: each `raylsm train` starts its own local cluster (its start-up is part of the figure);
            # running: they all join one local cluster started (untimed) before the first repeat.
            # (a cluster already named by RAY_ADDRESS, e.g. the quick suite's, is the running one)
            address = None
            if args.cluster == "running":
                address = os.environ.get("RAY_ADDRESS") or stack.enter_context(running_local_cluster(args.timeout))
            for r in range(args.repeats):
                for figures, x in zip((ray_s, local_s, floor_s), _startup_repeat(args, train_cmd, data, sets, tmp, r, address)):
                    figures.append(x)
        return {
            "bench": "startup", "device": args.device, "model": args.model, "cluster": args.cluster,
            "seconds_to_first_batch": round(median(ray_s), 2), "in_process_seconds": round(median(local_s), 2),
            "ray_floor_seconds": round(median(floor_s), 2),
            "ratio": round(median(ray_s) / median(local_s), 3), "ratio_is": "raylsm train (Ray) / in-process path",
            "over_floor": round(median(ray_s) / median(floor_s), 3),
            "repeats": {"ray": [round(x, 2) for x in ray_s], "in_process": [round(x, 2) for x in local_s],
                        "ray_floor": [round(x, 2) for x in floor_s]},
            "machine": machine(),
        }


def _startup_repeat(args: argparse.Namespace, train_cmd: list[str], data: str, sets: list[str], tmp: str, r: int,
                    address: str | None) -> tuple[float, float, float]:
    """One repeat of ``bench startup``: `raylsm train`, the in-process path, a bare TorchTrainer (seconds each)."""
    from raylsm.train.batches import FIRST_BATCH_FILE

    ray_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        ray_env["RAY_ADDRESS"] = address
    mark = Path(tmp) / f"ray-{r}"
    ray_s = _time_to_mark(train_cmd, mark, args.timeout, dict(ray_env, **{FIRST_BATCH_FILE: str(mark)}))
    mark = Path(tmp) / f"local-{r}"
    code = (f"from raylsm.bench.startup import local_first_batch; "
            f"local_first_batch({data!r}, {args.model!r}, {json.dumps(sets)}, {str(mark)!r})")
    local_s = _time_to_mark([sys.executable, "-c", code], mark, args.timeout, dict(os.environ))
    mark = Path(tmp) / f"floor-{r}"
    code = (f"from raylsm.bench.startup import bare_trainer_first_batch; "
            f"bare_trainer_first_batch({str(mark)!r}, {tmp + '/floor-runs'!r})")
    floor_s = _time_to_mark([sys.executable, "-c", code], mark, args.timeout, ray_env)
    log(f"repeat {r + 1}/{args.repeats}: raylsm train first batch after {ray_s:.1f} s; in-process "
        f"{local_s:.1f} s; bare TorchTrainer (Ray's floor) {floor_s:.1f} s")
    return ray_s, local_s, floor_s

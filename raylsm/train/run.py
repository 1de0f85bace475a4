"""Driver side of a training: validate data, open the MLflow run, build and fit the TorchTrainer.

``run_training(job)`` is what ``raylsm train`` and ``python -m jobs.train``
call; it returns the JSON-able result (``auc``, ``gauc``, ``logloss``,
``mlflow_run_id``, ``checkpoint``, ``samples_per_s`` ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from raylsm.config import ConfigError
from raylsm.data.collate import collate_spec
from raylsm.data.check import validate_dataset
from raylsm.data.contract import list_shards, shards_gone
from raylsm.data.splits import SplitPlan, SplitSource, plan_splits
from raylsm.models.layers import Vocab
from raylsm.storage import absolute, make_private_dir
from raylsm.train.config import JobConfig, default_tracking_uri
from raylsm.train.batches import FIRST_BATCH_FILE
from raylsm.train.cluster import ray_running, start_ray_checking_store
from raylsm.train.model_log import log_model
from raylsm.train.loop import train_loop_per_worker
from raylsm.train.tracking import (DRIVER_TAG, RecordWriter, driver_tag, end_run, fail_stale_runs, finish_run,
                                   real_uri, redact_uri, scrub, secret_env, start_run)

DATA_CPU_RESERVE = 0.5  # CPUs left for Ray Data read/collate tasks (docs/design.md, "Ray and MLflow notes")


def local_cpus() -> float:
    """CPUs a local cluster started by :func:`ensure_ray` gets (what Ray detects: the affinity mask)."""
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:
        return float(os.cpu_count() or 1)


def check_cpu_budget(job: JobConfig, total: float | None = None) -> None:
    """Refuse a worker layout that leaves Ray Data no CPU (it would hang at 0 rows, docs/design.md, "Ray and MLflow notes").

    ``total`` = the cluster's CPUs; None = ask the running cluster.
    """
    if total is None:
        import ray

        total = ray.cluster_resources().get("CPU", 0.0)
    needed = job.train.workers * job.train.cpus_per_worker
    if total and needed + DATA_CPU_RESERVE > total:
        raise ConfigError(
            f"train.cpus_per_worker: {job.train.workers} workers x {job.train.cpus_per_worker} CPU leaves less than "
            f"{DATA_CPU_RESERVE} of the cluster's {total:g} CPUs for Ray Data; lower train.cpus_per_worker or --workers"
        )


def gpus_needed(job: JobConfig) -> float:
    return job.train.workers * job.train.gpus_per_worker if job.train.use_gpu else 0.0


def check_local_gpus(job: JobConfig) -> None:
    """Before starting a local cluster: ``--gpu`` needs as many GPUs as the workers ask for (never wait forever)."""
    if not job.train.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < gpus_needed(job):
        raise ConfigError(
            f"--gpu: {job.train.workers} workers x {job.train.gpus_per_worker:g} GPU need {gpus_needed(job):g} GPUs "
            f"but this machine has {have}; drop --gpu or lower --workers / train.gpus_per_worker"
        )


def check_cluster_gpus(job: JobConfig) -> None:
    """After connecting: the cluster must hold the GPUs the workers ask for (the autoscaler could not place them)."""
    if not job.train.use_gpu:
        return
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if have < gpus_needed(job):
        raise ConfigError(
            f"--gpu: {job.train.workers} workers x {job.train.gpus_per_worker:g} GPU need {gpus_needed(job):g} GPUs "
            f"but the Ray cluster has {have:g}; drop --gpu or lower --workers / train.gpus_per_worker"
        )


def check_storage(storage: str) -> Path:
    """``--storage`` must be a directory this process can create and write (checked before Ray starts)."""
    path = Path(storage).expanduser()
    if "://" in storage:  # remote storage (s3://, gs://): Ray Train's pyarrow filesystem checks it
        return path
    try:
        path = path.resolve()
        make_private_dir(path)  # what it creates is owner-only (docs/security.md)
        probe = path / f".raylsm-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except (OSError, RuntimeError) as e:
        reason = e.strerror or str(e) if isinstance(e, OSError) else str(e)
        raise ConfigError(f"--storage {storage}: not a writable directory ({reason})") from None
    return path


def check_run_name(name: str, option: str = "--name") -> str:
    """A run or search name is one plain path component: it cannot point outside ``--storage``."""
    if not name:
        return name
    bad = ("/" in name or "\\" in name or name in (".", "..") or name.startswith("~") or "\0" in name
           or os.path.isabs(name) or name != name.strip())
    if bad:
        raise ConfigError(f"{option} {name!r}: must be a plain name (no '/', not '.' or '..', not absolute), "
                          "so that it stays inside --storage")
    return name


def check_resume_from(job: JobConfig, vocab: Vocab) -> None:
    """``--resume-from`` must be a raylsm checkpoint that loads and whose tables fit the dataset (before Ray starts)."""
    if not job.resume_from:
        return
    from raylsm.train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(job.resume_from, option="--resume-from")  # weights-only: a pickle payload is refused here
    theirs = meta["vocab"]
    for key, ours in {**{k: getattr(vocab, k) for k in ("item", "cate", "ctx", "gap", "user")},
                      **{f"profile.{k}": v for k, v in vocab.profile.items()}}.items():
        value = theirs["profile"].get(key[8:]) if key.startswith("profile.") else theirs[key]
        if value != ours:
            raise ConfigError(f"--resume-from {job.resume_from}: vocab.{key} is {value} there but {ours} in the "
                              f"dataset {job.data.path}")
    if set(theirs["profile"]) != set(vocab.profile):
        raise ConfigError(f"--resume-from {job.resume_from}: profile fields {sorted(theirs['profile'])} differ from the "
                          f"dataset's {sorted(vocab.profile)}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP do what Ctrl-C does (the SIGINT handler in force runs: Ray Train's
    graceful abort during ``fit``, Tune's stop, else KeyboardInterrupt), so the run ends KILLED with its
    checkpoints whole. Installed after Ray starts (``ray.init`` sets its own SIGTERM handler); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def as_interrupt(signum, frame) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, as_interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_trainer(job: JobConfig, vocab: Vocab, run_name: str, mlflow_run_id: str | None, tracking_uri: str,
                  callbacks=None, plan: SplitPlan | None = None):
    """The TorchTrainer for ``job``: datasets streamed by Ray Data, best-N checkpoints by validation AUC."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylsm.data.contract import read_manifest
    from raylsm.data.pipeline import read_split
    from raylsm.train.backend import torch_config

    manifest = read_manifest(job.data.path)
    plan = plan or plan_splits(job.data.path, manifest, job.data.val_fraction)
    spec = collate_spec(job.data, manifest)

    def source(src: SplitSource, shuffle_seed: int | None = None):
        return read_split(job.data.path, src.split, spec, job.data.block_rows,
                          shuffle_seed=shuffle_seed if job.data.shuffle else None, ts_range=src.ts_range,
                          task_cpus=job.data.task_cpus, concurrency=job.data.read_concurrency or None,
                          narrow_ids=job.data.narrow_ids, op_reservation=job.data.op_reservation)

    datasets = {"train": source(plan.train, job.train.seed), "test": source(plan.test)}
    if plan.val is not None:
        datasets["val"] = source(plan.val)
    resources = {"CPU": job.train.cpus_per_worker}
    if job.train.use_gpu:
        resources["GPU"] = job.train.gpus_per_worker
    # Without a validation split the latest epochs are kept: test metrics never choose a checkpoint.
    score = "val_auc" if plan.val is not None else "epoch"
    return TorchTrainer(
        train_loop_per_worker,
        torch_config=torch_config(),
        train_loop_config={
            "job": job,  # typed: built and checked once on the driver, pickled to the workers as it is
            "vocab": vocab,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": redact_uri(tracking_uri),
            # The credentialed URI travels in memory, as an argument of the workers' actors: a runtime env would do,
            # but Ray's runtime env agent writes every env var it sets into its session log on disk.
            "secret_env": secret_env(tracking_uri),
            "has_val": plan.val is not None,
            "first_batch_file": os.environ.get(FIRST_BATCH_FILE),  # `raylsm bench startup` only
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.train.workers, use_gpu=job.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=absolute(job.storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.train.keep_checkpoints,
                checkpoint_score_attribute=score,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )


def headline(metrics: dict) -> dict:
    """A run's headline figures: the test metrics of the checkpoint it keeps (chosen on validation)."""
    out = {k: metrics.get(f"test_{k}", float("nan")) for k in ("auc", "gauc", "logloss")}
    out.update(val_auc=metrics.get("val_auc", float("nan")), best_epoch=metrics.get("epoch", -1))
    return out


def preflight(job: JobConfig, validated: bool = False, check_tracking: bool = True) -> tuple:
    """Every check that needs no cluster, before Ray starts: data, splits, storage, GPUs, tracking store.

    ``validated``: the dataset was already validated by this process's caller (a tuning search checks it
    once, not once per trial), so only its manifest is read. ``check_tracking=False``: the caller checks
    the tracking store itself (:func:`run_training` does it while the local cluster starts).
    """
    from raylsm.data.contract import read_manifest
    from raylsm.train.tracking import check_store

    # docs/design.md, "Dataset contract": the whole dataset is validated before anything starts.
    check_run_name(job.name)
    manifest = read_manifest(job.data.path) if validated else validate_dataset(job.data.path)
    plan = plan_splits(job.data.path, manifest, job.data.val_fraction)
    check_resume_from(job, Vocab.from_manifest(manifest))
    check_storage(job.storage)
    check_local_gpus(job)
    if not validated:
        if ray_running():  # this process is already connected: ask the cluster itself
            check_cpu_budget(job)
            check_cluster_gpus(job)
        elif not os.environ.get("RAY_ADDRESS"):
            check_cpu_budget(job, local_cpus())  # the local cluster's size is known before it starts
    tracking_uri = real_uri(job.mlflow.tracking_uri or default_tracking_uri())
    if check_tracking:
        check_store(tracking_uri)
    return manifest, plan, tracking_uri


def _join_record(writer: RecordWriter, timeout: float = 300.0, uri: str = "") -> None:
    """Wait for the run's record; a part the store refused is named in one line (the training result stands)."""
    try:
        writer.join(timeout)
    except Exception as e:
        reason = scrub((str(e).splitlines() or [""])[0][:200], uri)
        print(f"raylsm: MLflow run record incomplete ({type(e).__name__}: {reason})", file=sys.stderr)


def run_training(job: JobConfig, parent_run_id: str | None = None, callbacks=None,
                 extra_tags: dict[str, str] | None = None, validated: bool = False) -> dict:
    """Check, track, train; return the result dict (the CLI prints it as the final JSON line).

    Every check runs before the MLflow run is opened, so a run that never started leaves nothing in
    MLflow. The run ends FINISHED, FAILED (training raised) or KILLED (Ctrl-C / the tuner stopped it).
    """
    manifest, plan, tracking_uri = preflight(job, validated, check_tracking=False)
    # From here on the job holds the redacted URI only (it reaches the workers, checkpoints and MLflow);
    # the credentialed one stays in this process's memory and the workers' environment.
    job = dataclasses.replace(job, mlflow=dataclasses.replace(job.mlflow, tracking_uri=redact_uri(job.mlflow.tracking_uri)))
    vocab = Vocab.from_manifest(manifest)
    start_ray_checking_store(tracking_uri)
    with stop_signals_interrupt():
        return _train(job, manifest, plan, vocab, tracking_uri, parent_run_id, callbacks, extra_tags)


def _train(job: JobConfig, manifest, plan: SplitPlan, vocab: Vocab, tracking_uri: str, parent_run_id: str | None,
           callbacks, extra_tags: dict[str, str] | None) -> dict:
    """:func:`run_training` once Ray is up: the MLflow run opened, the trainer fitted, the run closed."""
    check_cpu_budget(job)
    check_cluster_gpus(job)
    run_name = job.name or f"{job.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = str(check_storage(job.storage))
    run_path = f"{storage.rstrip('/')}/{run_name}"
    if job.name:  # a rerun of this name resumes: a run its killed driver left RUNNING is closed first
        fail_stale_runs(tracking_uri, job.mlflow.experiment,
                        lambda r: r.data.tags.get("raylsm.ray_run_path") == run_path,
                        f"its driver ended without closing it (killed?); marked FAILED when {run_name} started again "
                        f"at {time.strftime('%Y-%m-%d %H:%M:%S')}")
    mlflow_run_id, record = start_run(
        tracking_uri,
        job,
        manifest,
        run_name=job.mlflow.run_name or run_name,
        tags={"raylsm.ray_run_path": run_path, "raylsm.validation": plan.how,
              DRIVER_TAG: driver_tag(), **(extra_tags or {})},
        parent_run_id=parent_run_id,
    )
    shards = list_shards(job.data.path)
    writer = RecordWriter(record)  # params, job YAML, dataset input: written while the workers start
    try:
        trainer = build_trainer(job, vocab, run_name, mlflow_run_id, tracking_uri, callbacks, plan)
        result = trainer.fit()
        _join_record(writer, uri=tracking_uri)
        if result.error is not None:
            raise result.error
        score = "val_auc" if plan.val is not None else "epoch"
        best = result.get_best_checkpoint(score, "max") or result.checkpoint
        best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics)
        head = headline(best_metrics)
        model_uri = log_model(tracking_uri, mlflow_run_id, best.path, job, manifest)
        # Headline metrics under names of their own (val_auc stays the per-epoch series; the kept
        # checkpoint's validation AUC is the last point of best_val_auc).
        finish_run(tracking_uri, mlflow_run_id, {k: v for k, v in head.items() if k != "val_auc"},
                   {"raylsm.checkpoint": best.path, "raylsm.ray_run_path": result.path})
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C during fit() reaches Ray Train's own SIGINT handler, which aborts the run and calls
        # sys.exit(0) (SystemExit, not KeyboardInterrupt): both are the user stopping the run.
        _join_record(writer, timeout=30, uri=tracking_uri)
        end_run(tracking_uri, mlflow_run_id, "KILLED")
        raise KeyboardInterrupt from None
    except BaseException:
        _join_record(writer, timeout=30, uri=tracking_uri)
        end_run(tracking_uri, mlflow_run_id, "FAILED")
        gone = shards_gone(shards)  # a shard deleted mid-run: name it, not Ray's wrapped read error
        if gone is not None:
            raise gone from None
        raise
    end_run(tracking_uri, mlflow_run_id, "FINISHED")
    last = result.metrics
    return {
        "model": job.preset,
        **head,
        "epoch": head["best_epoch"],
        "epochs_run": int(last.get("epoch", -1)) + 1,
        "validation": plan.how,
        "samples_per_s": last["samples_per_s"],
        "mlflow_run_id": mlflow_run_id,
        "mlflow_model_uri": model_uri,
        "tracking_uri": redact_uri(tracking_uri),
        "checkpoint": best.path,
        "run_path": result.path,
    }

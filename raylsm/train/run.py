"""Driver side of a training: validate data, open the MLflow run, build and fit the TorchTrainer.

``run_training(job)`` is what ``raylsm train`` and ``python -m jobs.train``
call; it returns the JSON-able result (``auc``, ``gauc``, ``logloss``,
``mlflow_run_id``, ``checkpoint``, ``samples_per_s`` ...).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from raylsm.config import ConfigError
from raylsm.data.collate import CollateSpec
from raylsm.data.contract import validate_dataset
from raylsm.models.layers import Vocab
from raylsm.train.config import JobConfig, default_tracking_uri, job_to_dict
from raylsm.train.loop import model_from_checkpoint, train_loop_per_worker
from raylsm.train.tracking import end_run, log_model, start_run

DATA_CPU_RESERVE = 0.5  # CPUs left for Ray Data read/collate tasks (DESIGN §7)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster a job was submitted to (RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


def check_cpu_budget(job: JobConfig) -> None:
    """Refuse a worker layout that leaves Ray Data no CPU (it would hang at 0 rows, DESIGN §7)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    needed = 0.0 if job.train.use_gpu else job.train.workers * job.train.cpus_per_worker
    if total and needed + DATA_CPU_RESERVE > total:
        raise ConfigError(
            f"train.cpus_per_worker: {job.train.workers} workers x {job.train.cpus_per_worker} CPU leaves less than "
            f"{DATA_CPU_RESERVE} of the cluster's {total:g} CPUs for Ray Data; lower train.cpus_per_worker or --workers"
        )


def build_trainer(job: JobConfig, vocab: Vocab, run_name: str, mlflow_run_id: str | None, tracking_uri: str, callbacks=None):
    """The TorchTrainer for ``job`` (datasets streamed by Ray Data, best-N checkpoints by AUC, FailureConfig)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylsm.data.contract import read_manifest
    from raylsm.data.pipeline import read_split

    manifest = read_manifest(job.data.path)
    spec = CollateSpec(job.data.st_len, job.data.ll_len, tuple(manifest.profile_fields))
    datasets = {
        "train": read_split(job.data.path, "train", spec, shuffle_seed=job.train.seed),
        "test": read_split(job.data.path, "test", spec),
    }
    resources = {"CPU": job.train.cpus_per_worker}
    if job.train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job_to_dict(job),
            "vocab": vocab.__dict__,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.train.workers, use_gpu=job.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(Path(job.storage).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.train.keep_checkpoints,
                checkpoint_score_attribute="auc",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )


def run_training(job: JobConfig, parent_run_id: str | None = None, callbacks=None) -> dict:
    """Validate, track, train; return the result dict (the CLI prints it as the final JSON line)."""
    manifest = validate_dataset(job.data.path)  # before anything starts (DESIGN §2)
    vocab = Vocab.from_manifest(manifest)
    tracking_uri = job.mlflow.tracking_uri or default_tracking_uri()
    run_name = job.name or f"{job.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    mlflow_run_id = start_run(
        tracking_uri,
        job.mlflow.experiment,
        job.mlflow.run_name or run_name,
        params=job_to_dict(job),
        tags={"raylsm.model": job.preset, "raylsm.dataset": manifest.name, "raylsm.lifelong": job.model.lifelong},
        parent_run_id=parent_run_id,
    )
    try:
        ensure_ray()
        check_cpu_budget(job)
        trainer = build_trainer(job, vocab, run_name, mlflow_run_id, tracking_uri, callbacks)
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        best = result.get_best_checkpoint("auc", "max") or result.checkpoint
        best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics)
        model, _ = model_from_checkpoint(best.path)
        model_uri = log_model(tracking_uri, mlflow_run_id, model)
    except BaseException:
        end_run(tracking_uri, mlflow_run_id, "FAILED")
        raise
    end_run(tracking_uri, mlflow_run_id, "FINISHED")
    last = result.metrics
    return {
        "model": job.preset,
        "auc": best_metrics["auc"],
        "gauc": best_metrics["gauc"],
        "logloss": best_metrics["logloss"],
        "epoch": best_metrics["epoch"],
        "samples_per_s": last["samples_per_s"],
        "mlflow_run_id": mlflow_run_id,
        "mlflow_model_uri": model_uri,
        "tracking_uri": tracking_uri,
        "checkpoint": best.path,
        "run_path": result.path,
    }

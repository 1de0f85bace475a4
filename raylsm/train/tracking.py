"""MLflow record (DESIGN §5): one run per training, created and closed by the driver.

The driver opens the run before training (so an unreachable store fails fast),
logs the resolved config as flattened params and the ``raylsm.*`` tags; rank 0
of the training workers logs per-epoch metrics into that run id; the driver
logs the final model with ``mlflow.pytorch.log_model`` and ends the run as
FINISHED, or as FAILED when training raised. A tuning trial's run is created
with ``parent_run_id`` so the MLflow UI nests it under the tuning run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from raylsm.config import flatten

_PARAM_CHUNK = 100  # MLflow accepts at most 100 params per log_batch call


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def check_store(tracking_uri: str) -> None:
    """Fail with one clear line if the tracking store cannot be reached."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        _client(tracking_uri).search_experiments(max_results=1)
    except Exception as e:  # any failure here means training must not start
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(f"--tracking-uri {tracking_uri}: MLflow tracking store unreachable ({first[:200]})") from None


def experiment_id(tracking_uri: str, name: str) -> str:
    """Get or create the experiment; new ones keep artifacts under ./mlartifacts (absolute path)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if tracking_uri.startswith("sqlite:") or "://" not in tracking_uri:
        artifacts = (Path.cwd() / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:
        exp = client.get_experiment_by_name(name)  # created concurrently by another trial
        if exp is None:
            raise
        return exp.experiment_id


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create a run, log params (flattened, dotted) and tags; return its id."""
    from mlflow.entities import Param, RunTag

    check_store(tracking_uri)
    client = _client(tracking_uri)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(tracking_uri, experiment), tags=all_tags, run_name=run_name or None)
    run_id = run.info.run_id
    flat = [Param(k, str(v)) for k, v in flatten(params).items()]
    for i in range(0, len(flat), _PARAM_CHUNK):
        client.log_batch(run_id, params=flat[i : i + _PARAM_CHUNK])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items() if k.startswith("raylsm.")])
    return run_id


def log_epoch_metrics(tracking_uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log the numeric metrics of one epoch at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)  # NaN is logged as NaN, never dropped
    ]
    _client(tracking_uri).log_batch(run_id, metrics=batch)


def log_model(tracking_uri: str, run_id: str, model) -> str:
    """Log the model with ``mlflow.pytorch.log_model``; return its model URI."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        # "pickle": the model takes a dict batch, which the traced pt2 format cannot export without an example.
        info = mlflow.pytorch.log_model(model.cpu().eval(), name="model", serialization_format="pickle")
    return info.model_uri


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close the run as FINISHED / FAILED / KILLED."""
    _client(tracking_uri).set_terminated(run_id, status=status)

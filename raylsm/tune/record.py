"""A search's record: its own state file, its MLflow children reconciled with Tune's own trial states, the trials table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from raylsm.config import ConfigError


def read_state(state_path: Path) -> dict:
    """The search's own record (``raylsm-search.json``): an object naming its MLflow parent run; else ConfigError."""
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"--resume: {state_path}: cannot be read as JSON ({str(e).splitlines()[0][:120]})") from None
    run_id = state.get("parent_run_id") if isinstance(state, dict) else None
    if not isinstance(run_id, str) or not run_id.isalnum():
        raise ConfigError(f"--resume: {state_path}: must be an object with the search's 'parent_run_id'")
    return state


def children(client, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=5000)


def reconcile_children(tracking_uri: str, experiment_id: str, parent_run_id: str,
                       tune_status: dict[str, str]) -> dict[str, str]:
    """End every child run still RUNNING; tag each with how its trial ended. Returns {run_id: status tag}.

    ``tune_status``: Tune's final status per trial id (``TERMINATED``, ``ERROR``; anything else means
    the search was interrupted before the trial ended). A child still RUNNING whose trial Tune
    terminated was stopped by the scheduler: ASHA kills the trial's trainer, which cannot end its run.
    """
    from raylsm.train.tracking import NOTE_TAG
    from raylsm.train.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    _wait_for_trial_drivers(client, experiment_id, parent_run_id)
    out = {}
    for run in children(client, experiment_id, parent_run_id):
        status = run.info.status
        trial = tune_status.get(run.data.tags.get("raylsm.trial_id", ""), "")
        if NOTE_TAG in run.data.tags and status == "FAILED":  # closed when its dead driver's search resumed
            tag = "interrupted"
        elif status == "RUNNING" or (status == "FAILED" and trial == "TERMINATED"):
            # A trial Tune terminated whose run did not finish was stopped by the scheduler: its trainer
            # was killed (run left RUNNING) or its fit() was aborted mid-epoch (run ended FAILED).
            tag = {"TERMINATED": "stopped_by_scheduler", "ERROR": "failed"}.get(trial, "interrupted")
            client.set_terminated(run.info.run_id, status="FAILED" if tag == "failed" else "KILLED")
        elif status == "FINISHED":
            tag = "completed"
        elif status == "KILLED":
            tag = run.data.tags.get("raylsm.trial_status", "interrupted")
        else:
            tag = "failed"
        client.set_tag(run.info.run_id, "raylsm.trial_status", tag)
        out[run.info.run_id] = tag
    return out


def _wait_for_trial_drivers(client, experiment_id: str, parent_run_id: str, timeout: float = 30.0) -> None:
    """Wait (at most ``timeout``) until the trial processes that opened children still RUNNING have exited.

    A trial the scheduler stopped is torn down asynchronously once Tune returns; a trial process that is
    still ending would otherwise close its run (FAILED, KILLED) after it was reconciled here.
    """
    from raylsm.train.tracking import DRIVER_TAG, driver_alive

    deadline = time.time() + timeout
    while time.time() < deadline:
        running = [r for r in children(client, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
        if not any(driver_alive(r.data.tags.get(DRIVER_TAG, "")) for r in running):
            return
        time.sleep(0.5)


def tune_status(search_dir: Path) -> dict[str, str]:
    """Tune's status of every trial of the search, read back from its experiment state."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(search_dir)).trials}
    except Exception:  # no state written yet (interrupted while starting)
        return {}


def trials_table(client, runs: list, metric: str) -> list[dict]:
    rows = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric)
        values = [m.value for m in history if m.value == m.value]
        row = {"trial_id": run.data.tags.get("raylsm.trial_id", ""), "mlflow_run_id": run.info.run_id,
               "status": run.data.tags.get("raylsm.trial_status", run.info.status),
               "epochs": len(history), f"best_{metric}": (max(values) if values else float("nan")),
               **{k: run.data.metrics.get(k) for k in ("auc", "gauc", "logloss", "best_val_auc")}}
        row.update({f"param.{k}": v for k, v in json.loads(run.data.tags.get("raylsm.trial_config", "{}")).items()})
        rows.append(row)
    return rows


def fail_stale_search(tracking_uri: str, experiment: str, parent_run_id: str, name: str) -> list[str]:
    """Before a search resumes: a parent and children that a killed driver left RUNNING are marked FAILED with a
    ``raylsm.note`` (the parent is then reopened); a parent whose driver still runs is left alone."""
    from raylsm.train.tracking import DRIVER_TAG, NOTE_TAG, client as mlflow_client, driver_alive, fail_stale_runs

    parent = mlflow_client(tracking_uri).get_run(parent_run_id)
    if parent.info.status == "RUNNING" and driver_alive(parent.data.tags.get(DRIVER_TAG, "")):
        raise ConfigError(f"--name {name}: that search is still running (driver {parent.data.tags[DRIVER_TAG]})")
    note = (f"its driver ended without closing it (killed?); marked FAILED when search {name} resumed at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    failed = fail_stale_runs(tracking_uri, experiment, lambda r: r.info.run_id == parent_run_id, note)
    failed += fail_stale_runs(tracking_uri, experiment,
                              lambda r: r.data.tags.get("mlflow.parentRunId") == parent_run_id, note)
    if failed and NOTE_TAG not in mlflow_client(tracking_uri).get_run(parent_run_id).data.tags:
        mlflow_client(tracking_uri).set_tag(parent_run_id, NOTE_TAG, f"resumed; {len(failed)} run(s) of a killed driver marked FAILED")
    return failed

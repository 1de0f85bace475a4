"""Every run accounted for: SIGTERM and SIGHUP stop a training or a search as Ctrl-C does; a run whose driver
was killed with SIGKILL is marked FAILED (with a note) when the same name starts again.

Each test signals only the processes it started (its own ``raylsm`` child and that child's process tree).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import small_world_dataset
from tests.test_security import TINY, run_and_interrupt

NOTE = "raylsm.note"


def _alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return out


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(processes: list[psutil.Process]) -> None:
    for p in reversed(processes):
        try:
            p.kill()
        except psutil.Error:
            pass


def _registered_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders Ray Train registered (its snapshot names them), each to be whole."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    text = snapshot.read_text()
    return [p for p in run_dir.glob("checkpoint_*") if p.name in text]


def _all_runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "RAYLSM_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- the handler


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_run_the_sigint_handler_in_force(sig):
    """Inside the block SIGTERM/SIGHUP run whatever handles SIGINT (Ray Train's abort, Tune's stop), else raise
    KeyboardInterrupt; outside it the previous handlers are back."""
    from raylsm.train.run import stop_signals_interrupt

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    # Python's own Ctrl-C handler in force (an earlier test in the same process may have left another).
    saved_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_signals_interrupt():
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs between bytecodes
            seen = []
            previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
            try:
                os.kill(os.getpid(), sig)
                time.sleep(0.2)
            finally:
                signal.signal(signal.SIGINT, previous)
            assert seen == [signal.SIGINT]
        assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)} == {
            s: before[s] for s in (signal.SIGTERM, signal.SIGHUP)}
    finally:
        signal.signal(signal.SIGINT, saved_int)
    assert {s: signal.getsignal(s) for s in before} == before


# ----------------------------------------------------------------------------- SIGTERM on train


@pytest.mark.ray
def test_sigterm_stops_train_like_ctrl_c(tmp_path_factory):
    run = run_and_interrupt(tmp_path_factory, signal.SIGTERM)
    assert run.returncode == 130, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    # The driver's one line (Ray Data's progress bars on the same stream may run into it without a newline).
    ours = [line[line.index("raylsm: "):] for line in run.stderr.splitlines() if "raylsm: " in line]
    assert ours == ["raylsm: interrupted"], run.stderr[-3000:]
    runs = _all_runs(run.tracking_uri)
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    _wait_for(lambda: not _alive(run.processes), 30, "the run's Ray processes to exit")
    assert len(run.processes) >= 4  # the driver, GCS, raylet, a training worker at least
    import torch

    kept = _registered_checkpoints(run.run_dir)
    assert kept, sorted(p.name for p in run.run_dir.iterdir())
    for checkpoint in kept:  # whole: the weights load (weights only) and job.json parses, same epoch
        state = torch.load(checkpoint / "checkpoint.pt", weights_only=True)
        meta = json.loads((checkpoint / "job.json").read_text())
        assert state["model"] and state["epoch"] == meta["epoch"]


# ----------------------------------------------------------------------------- SIGKILL, then the same --name


@pytest.mark.ray
def test_sigkilled_train_run_is_marked_failed_when_its_name_starts_again(tmp_path: Path):
    data = small_world_dataset(tmp_path / "synth", rows=3000)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "raylsm", "train", "--model", "lcn", "--data", str(data), "--epochs", "2",
           "--storage", str(tmp_path / "runs"), "--name", "again", "--tracking-uri", uri, "--workers", "1"]
    for kv in TINY:
        cmd += ["--set", kv]
    run_dir = tmp_path / "runs" / "again"
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    tree: list[psutil.Process] = []
    try:
        _wait_for(lambda: bool(_registered_checkpoints(run_dir)) or first.poll() is not None, 600, "the first checkpoint")
        assert first.poll() is None, first.communicate()[1][-3000:]
        tree = _tree(first)
        first.send_signal(signal.SIGKILL)  # the driver only: nothing of it runs to close its MLflow run
        first.communicate(timeout=60)
    finally:
        _kill_tree(tree or _tree(first))  # then the Ray processes it had started, none other
    _wait_for(lambda: not _alive(tree), 60, "the killed run's processes to exit")
    (stale,) = _all_runs(uri)
    assert stale.info.status == "RUNNING"  # what SIGKILL leaves

    second = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    client = MlflowClient(tracking_uri=uri)
    old = client.get_run(stale.info.run_id)
    assert old.info.status == "FAILED" and "driver ended without closing it" in old.data.tags[NOTE], old.data.tags
    new = client.get_run(result["mlflow_run_id"])
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED" and NOTE not in new.data.tags
    assert result["epochs_run"] == 2  # resumed from the killed run's checkpoint


# ----------------------------------------------------------------------------- SIGTERM on tune


@pytest.mark.ray
def test_sigterm_stops_tune_like_ctrl_c(tmp_path: Path):
    import yaml

    data = small_world_dataset(tmp_path / "synth", rows=3000)
    fixed = {kv.split("=", 1)[0]: yaml.safe_load(kv.split("=", 1)[1]) for kv in TINY}
    space = tmp_path / "sig.yaml"
    space.write_text(yaml.safe_dump({
        "base": "lcn", "metric": "val_auc", "mode": "max", "trials": 1, "concurrency": 1,
        "searcher": {"kind": "grid", "seed": 0}, "scheduler": {"kind": "fifo"},
        "fixed": {**fixed, "train.epochs": 20, "train.cpus_per_worker": 0.5},
        "params": {"train.seed": {"grid": [0, 1]}}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "raylsm", "tune", "--space", str(space), "--data", str(data), "--storage",
           str(tmp_path / "runs"), "--tracking-uri", uri, "--name", "sig"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    client = MlflowClient(tracking_uri=uri)
    tree: list[psutil.Process] = []

    def a_trial_epoch_logged() -> bool:
        if proc.poll() is not None:
            return True
        try:
            exp = client.get_experiment_by_name("raylsm")
            runs = client.search_runs([exp.experiment_id], "tags.raylsm.trial_id != ''") if exp else []
            return any(client.get_metric_history(r.info.run_id, "train_loss") for r in runs)
        except Exception:  # the store is being created
            return False

    try:
        _wait_for(a_trial_epoch_logged, 600, "a trial's first epoch")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        tree = _tree(proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            _kill_tree(_tree(proc))
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "raylsm: interrupted" in err and "continue it with --resume --name sig" in err, err[-3000:]
    runs = _all_runs(uri)
    parent = [r for r in runs if r.data.tags.get("raylsm.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("raylsm.trial_id")]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    assert children and all(c.info.status == "KILLED" for c in children), [c.info.status for c in children]
    assert all(c.data.tags["raylsm.trial_status"] == "interrupted" for c in children)
    _wait_for(lambda: not _alive(tree), 30, "the search's Ray processes to exit")


def test_resumed_search_fails_the_runs_a_killed_driver_left_running(tmp_path: Path):
    """What ``tune --resume`` does first: the parent and children a SIGKILLed driver left RUNNING become FAILED
    with a note; a child that had finished stays as it was; a parent whose driver still runs is refused."""
    from raylsm.config import ConfigError
    from raylsm.train.tracking import DRIVER_TAG, driver_tag
    from raylsm.tune.record import fail_stale_search, reconcile_children

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("raylsm")
    dead = f"{driver_tag().rsplit(':', 1)[0]}:{2**22 + 7}"  # a pid above the kernel's limit: never running
    parent = client.create_run(exp, tags={DRIVER_TAG: dead, "raylsm.kind": "search"}).info.run_id
    running = client.create_run(exp, tags={"mlflow.parentRunId": parent, "raylsm.trial_id": "t1", DRIVER_TAG: dead})
    done = client.create_run(exp, tags={"mlflow.parentRunId": parent, "raylsm.trial_id": "t2", DRIVER_TAG: dead})
    client.set_terminated(done.info.run_id, "FINISHED")
    other = client.create_run(exp, tags={DRIVER_TAG: dead}).info.run_id  # not of this search

    assert sorted(fail_stale_search(uri, "raylsm", parent, "s")) == sorted([parent, running.info.run_id])
    for run_id in (parent, running.info.run_id):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "driver ended without closing it" in run.data.tags[NOTE]
    assert client.get_run(done.info.run_id).info.status == "FINISHED" and NOTE not in client.get_run(done.info.run_id).data.tags
    assert client.get_run(other).info.status == "RUNNING"
    # At the search's end the closed child keeps FAILED (not turned into "stopped by the scheduler").
    tags = reconcile_children(uri, exp, parent, {"t1": "TERMINATED", "t2": "TERMINATED"})
    assert tags[running.info.run_id] == "interrupted" and client.get_run(running.info.run_id).info.status == "FAILED"

    live = client.create_run(exp, tags={DRIVER_TAG: driver_tag()}).info.run_id  # this process: alive
    with pytest.raises(ConfigError, match="--name s: that search is still running"):
        fail_stale_search(uri, "raylsm", live, "s")

"""Every run accounted for: SIGTERM and SIGHUP stop a training or a search as Ctrl-C does; a run whose driver
was killed with SIGKILL is marked FAILED (with a note) when the same name starts again.

The end-to-end train checks read one shared sequence (the ``interrupted_run`` fixture: SIGKILL, the same
``--name`` again, SIGTERM); SIGTERM on ``raylsm tune`` is the interruption of the resumed search in
``tests/test_tune.py``. Each test signals only the processes it started (its own ``raylsm`` child and that
child's process tree).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tracebacks_outside_ray_benign

NOTE = "raylsm.note"


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


# ----------------------------------------------------------------------------- SIGKILL, then the same --name, then SIGTERM


def test_only_rays_documented_overload_warnings_may_carry_a_traceback():
    """The traceback check skips Ray's own "safe to ignore" overload warning and nothing else."""
    benign = ("(TrainController pid=7) Failed to send resource request for x. If this only happens transiently during"
              " network partition or CPU being overloaded, it's safe to ignore this error. If this error persists, file"
              " a GitHub issue.\n(TrainController pid=7) Traceback (most recent call last):\n"
              "(TrainController pid=7) ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.\n")
    ours = "raylsm: something\nTraceback (most recent call last):\n  File \"raylsm/cli.py\", line 1\nValueError: x\n"
    assert tracebacks_outside_ray_benign(benign) == []
    assert tracebacks_outside_ray_benign(ours) == ["raylsm: something\nTraceback (most recent call last):"]
    assert len(tracebacks_outside_ray_benign(benign + ours)) == 1
    assert tracebacks_outside_ray_benign("epoch 1\nraylsm: interrupted\n") == []


@pytest.mark.ray
def test_sigterm_stops_train_like_ctrl_c(interrupted_run):
    """SIGTERM on ``raylsm train``: exit 130 with one line, no traceback, every registered checkpoint whole.
    (Its MLflow run and processes: ``tests/test_faults.py``.)"""
    run = interrupted_run
    assert run.returncode == 130, run.stderr[-3000:]
    assert tracebacks_outside_ray_benign(run.stderr) == [], run.stderr[-3000:]
    # The driver's one line (Ray Data's progress bars on the same stream may run into it without a newline).
    ours = [line[line.index("raylsm: "):] for line in run.stderr.splitlines() if "raylsm: " in line]
    assert ours == ["raylsm: interrupted"], run.stderr[-3000:]
    import torch

    kept = _registered_checkpoints(run.run_dir)
    assert kept, sorted(p.name for p in run.run_dir.iterdir())
    for checkpoint in kept:  # whole: the weights load (weights only) and job.json parses, same epoch
        state = torch.load(checkpoint / "checkpoint.pt", weights_only=True)
        meta = json.loads((checkpoint / "job.json").read_text())
        assert state["model"] and state["epoch"] == meta["epoch"]


@pytest.mark.ray
def test_sigkilled_train_run_is_marked_failed_when_its_name_starts_again(interrupted_run):
    """The first start, SIGKILLed after its first checkpoint, left its run RUNNING; the second start of the same
    ``--name`` marked it FAILED with a note, opened a run of its own and resumed from the killed run's checkpoint."""
    run = interrupted_run
    (stale,) = run.killed_runs
    assert stale[1] == "RUNNING"  # what SIGKILL leaves
    client = MlflowClient(tracking_uri=run.tracking_uri)
    old = client.get_run(stale[0])
    assert old.info.status == "FAILED" and "driver ended without closing it" in old.data.tags[NOTE], old.data.tags
    (new,) = [r for r in _all_runs(run.tracking_uri) if r.info.run_id != stale[0]]
    assert new.info.status == "KILLED" and NOTE not in new.data.tags
    # Resumed: the second start's first checkpoint is the epoch after the killed run's last one.
    assert run.killed_checkpoints
    epochs = {meta.parent.name: json.loads(meta.read_text())["epoch"] for meta in run.run_dir.glob("checkpoint_*/job.json")
              if meta.parent.name not in run.killed_checkpoints}
    assert epochs and min(epochs.values()) == max(run.killed_checkpoints.values()) + 1, (run.killed_checkpoints, epochs)


# ----------------------------------------------------------------------------- a search's stale runs
# (SIGTERM on ``raylsm tune`` end to end: tests/test_tune.py, the interrupted search that resumes.)


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

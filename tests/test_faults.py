"""Faults beyond one worker: the MLflow store lost mid-run, a shard deleted mid-run, a node lost, Ctrl-C.

Each test harms only what it started: its own tracking store and dataset copy, its own simulated
cluster (``ray.cluster_utils.Cluster``, in a child process), its own ``raylsm train`` process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raylsm.train.config import resolve_job
from tests.conftest import small_world_dataset

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = [
    "data.ll_len=40", "data.st_len=10", "model.features.emb_dim=8", "model.head=[32,16]", "model.lap.k1=16",
    "model.lap.k2=8", "model.lap.att_dim=8", "model.lap.heads=2", "model.lap.ffn_dim=16", "model.crp.m=64",
    "train.batch_size=128", "train.eval_batch_size=512", "train.cpus_per_worker=0.5", "train.lr=0.005",
]


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory) -> Path:
    return small_world_dataset(tmp_path_factory.mktemp("faults") / "synth", rows=4000)


def _job(data: Path, tmp: Path, *extra: str):
    return resolve_job(
        preset="lcn",
        overrides=[f"data.path={data}", *TINY, f"storage={tmp / 'runs'}",
                   f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra],
    )


def _checkpoints(run_dir: Path) -> int:
    return sum(1 for p in run_dir.iterdir() if p.name.startswith("checkpoint_")) if run_dir.exists() else 0


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- MLflow store lost


def test_epoch_logger_with_unreachable_store_keeps_training_and_names_lost_epochs(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from raylsm.train.epoch_log import EpochLogger

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    logger = EpochLogger(uri, run_id, finish_attempts=2, finish_wait_s=0.1)
    logger({"auc": 0.6, "epoch": 0}, 0)

    _store_away(db)
    start = time.time()
    logger({"auc": 0.7, "epoch": 1}, 1)
    logger({"auc": 0.8, "epoch": 2}, 2)
    assert time.time() - start < 10  # training is not held up
    assert logger.finish() == [1, 2]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raylsm:")]
    assert len(err) == 2, err  # the outage once, what was lost once
    assert "unreachable" in err[0] and "epoch(s) [1]" in err[0]
    assert "epoch(s) [1, 2] could not be logged" in err[1] and run_id in err[1]

    _store_back(db)
    assert logger.finish() == []  # the store is back: the record is reconciled
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "auc")] == [(0, 0.6), (1, 0.7), (2, 0.8)]
    assert "reachable again" in capsys.readouterr().err


def test_restarted_worker_logs_the_checkpoint_epoch_the_lost_worker_did_not(tmp_path):
    """A worker lost after its checkpoint was registered but before it logged the epoch: the replacement logs it
    from the checkpoint, once, and only into the run that wrote the checkpoint."""
    from mlflow.tracking import MlflowClient

    from raylsm.train.epoch_log import EpochLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e")
    run_id, other_id = (client.create_run(exp).info.run_id for _ in range(2))
    ckpt = tmp_path / "checkpoint_000000"
    ckpt.mkdir()
    (ckpt / "job.json").write_text(json.dumps({"epoch": 0, "metrics": {"train_loss": 0.5, "epoch": 0}, "mlflow_run_id": run_id}))
    assert EpochLogger(uri, other_id).log_if_missing(str(ckpt)) is False  # another run's checkpoint (a new run resumed)
    logger = EpochLogger(uri, run_id)
    assert logger.log_if_missing(str(ckpt)) is True
    assert logger.log_if_missing(str(ckpt)) is False  # already there: never twice
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [(0, 0.5)]
    assert client.get_metric_history(other_id, "train_loss") == []


def _store_away(db: Path) -> None:
    """The SQLite store becomes unusable: its file moves away and a directory takes its name."""
    db.rename(db.with_suffix(".away"))
    db.mkdir()


def _store_back(db: Path) -> None:
    db.rmdir()
    db.with_suffix(".away").rename(db)


@pytest.mark.ray
def test_mlflow_store_lost_mid_run_training_goes_on_and_record_is_reconciled(ray_local, fault_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from raylsm.train.run import run_training

    db = tmp_path / "mlflow.db"
    run_dir = tmp_path / "runs" / "outage"
    outage: list[str] = []

    def break_then_mend() -> None:
        _wait_for(lambda: _checkpoints(run_dir) >= 1, 300, "the first checkpoint")
        _store_away(db)
        outage.append("away")
        try:
            _wait_for(lambda: _checkpoints(run_dir) >= 2, 300, "a checkpoint written while the store was away")
        finally:
            _store_back(db)
            outage.append("back")

    watcher = threading.Thread(target=break_then_mend)
    watcher.start()
    # early stopping off: the run must reach an epoch after the outage whatever its validation AUC does. The run
    # also rolls back each epoch without a better validation AUC (train.on_plateau), checked through its lr.
    result = run_training(_job(fault_data, tmp_path, "train.epochs=3", "train.early_stop_patience=0", "name=outage",
                               "train.on_plateau=rollback", "train.plateau_lr_factor=0.5"))
    watcher.join()
    assert outage == ["away", "back"]
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    history = client.get_metric_history(result["mlflow_run_id"], "train_loss")
    series = {name: {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], name)}
              for name in ("lr", "epochs_since_best")}
    # Epoch 1 logged after the outage; a rollback after the budget's last epoch brings its fine-tune epoch
    # (train.rollback_finetune).
    epochs = 4 if series["epochs_since_best"][2] else 3
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(epochs))
    stamps = {m.step: m.timestamp for m in history}
    assert all(stamps[e - 1] < stamps[e] for e in range(1, epochs))  # each epoch keeps the time it was measured
    # The rate each epoch trained at: halved after each epoch without a better validation AUC, else kept.
    assert series["lr"][0] == pytest.approx(0.005)
    for e in range(1, epochs):
        assert series["lr"][e] == pytest.approx(series["lr"][e - 1] * (0.5 if series["epochs_since_best"][e - 1] else 1.0))


# ----------------------------------------------------------------------------- a stopped run

@pytest.mark.ray
def test_stopped_run_leaves_no_running_mlflow_run_and_no_ray_processes(interrupted_run):
    """The restarted run stopped by SIGTERM (the Ctrl-C path): its MLflow run KILLED, the run its SIGKILLed
    first start left RUNNING now FAILED, no run RUNNING; every process of the stopped run gone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=interrupted_run.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert sorted(r.info.status for r in runs) == ["FAILED", "KILLED"], [(r.info.run_name, r.info.status) for r in runs]

    def alive() -> list[str]:
        out = []
        for p in interrupted_run.processes:
            try:
                if p.is_running() and p.status() != "zombie":
                    out.append(f"{p.pid} {p.name()}")
            except Exception:  # gone between the two calls
                pass
        return out

    _wait_for(lambda: not alive(), 30, "the run's Ray processes to exit")
    assert len(interrupted_run.processes) >= 4  # the driver, GCS, raylet, a training worker at least


# ----------------------------------------------------------------------------- node lost


def _node_loss_child(data: Path, tmp: Path) -> dict:
    """In a child process: a head and two worker nodes (loopback, ``ray.cluster_utils.Cluster``); the node
    running the training worker is removed after the first checkpoint; the run joins the cluster through
    RAY_ADDRESS as a submitted job would."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import psutil
    from ray.cluster_utils import Cluster

    from raylsm.train.run import run_training

    # The head has 1 CPU (Ray Data), each worker node 2: the 2-CPU training worker fits on a worker node only.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    run_dir = tmp / "runs" / "node-loss"
    removed: list[str] = []

    def hosts_training(node) -> bool:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        return any("RayTrainWorker" in " ".join(p.cmdline()) for p in raylet.children(recursive=True))

    def remove_training_node() -> None:
        # Registered by the controller (its snapshot written), not only written to storage.
        _wait_for(lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(), 300, "the first registered checkpoint")
        victim = next(n for n in nodes if hosts_training(n))
        cluster.remove_node(victim, allow_graceful=False)
        removed.append(victim.node_id)

    watcher = threading.Thread(target=remove_training_node, daemon=True)
    watcher.start()
    try:
        job = _job(data, tmp, "train.epochs=3", "name=node-loss", "train.cpus_per_worker=2", "train.max_failures=2",
                   "train.early_stop_patience=0", "train.rollback_finetune=false")  # every epoch of the budget
        # runs and no more: the replaced worker must reach the last
        result = run_training(job)
        watcher.join(timeout=5)
        survivor = [n.node_id for n in nodes if n.node_id not in removed]
        return {"result": result, "removed": removed, "survivor": survivor,
                "survivor_alive": all(n.remaining_processes_alive() for n in nodes if n.node_id in survivor)}
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


@pytest.mark.ray
def test_node_lost_mid_training_run_resumes_on_remaining_node(fault_data, tmp_path):
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = (f"import json; from pathlib import Path; from tests.test_faults import _node_loss_child; "
            f"print(json.dumps(_node_loss_child(Path({str(fault_data)!r}), Path({str(tmp_path)!r}))))")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["removed"]) == 1 and out["survivor_alive"], out
    result = out["result"]
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    # Resumed from the last registered checkpoint, not from scratch: epoch 0 (checkpointed before the node went)
    # is logged once, and all three epochs finished. The epoch the node was lost in may have been re-run.
    steps = sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], "train_loss"))
    assert steps.count(0) == 1 and sorted(set(steps)) == [0, 1, 2] and len(steps) <= 4, steps
    # The replaced worker carried the run to its last epoch and the kept checkpoint learned.
    assert result["epochs_run"] == 3 and result["epoch"] in (0, 1, 2) and result["auc"] > 0.5, result


# ----------------------------------------------------------------------------- shard deleted


@pytest.mark.ray
def test_shard_deleted_mid_run_is_one_clear_line_naming_the_file(fault_data, tmp_path, ray_address):
    data = tmp_path / "data"
    shutil.copytree(fault_data, data)  # this test's own copy: deleting a shard harms no other test
    shard = sorted((data / "train").rglob("*.parquet"))[-1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["RAY_ADDRESS"] = ray_address  # a job on the session's running cluster (no cluster start-up of its own)
    cmd = [PYTHON, "-m", "raylsm", "train", "--model", "lcn", "--data", str(data), "--epochs", "5", "--workers", "1",
           "--storage", str(tmp_path / "runs"), "--name", "deleted", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for kv in TINY:
        cmd += ["--set", kv]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _checkpoints(tmp_path / "runs" / "deleted") >= 1 or proc.poll() is not None, 600,
                  "the first checkpoint")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        shard.unlink()
        deleted_at = time.time()
        out, err = proc.communicate(timeout=240)  # an error, not a hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.time() - deleted_at < 240
    assert proc.returncode == 2, err[-3000:]
    # The driver's verdict is one line naming the file (Ray's forwarded worker logs may surround it).
    ours = [line for line in err.splitlines() if line.startswith("raylsm: error: ")]
    assert ours == [f"raylsm: error: {shard}: shard deleted or moved while training read the dataset"], err[-3000:]
    assert out.strip() == "" or '"mlflow_run_id"' not in out.strip().splitlines()[-1]

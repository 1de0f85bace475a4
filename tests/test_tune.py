"""Searches end to end on a local 2-CPU Ray: parent/child MLflow runs, ASHA stopping, best config, --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import small_world_dataset

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data.ll_len": 40, "data.st_len": 10, "model.features.emb_dim": 8, "model.head": [32, 16],
    "model.lap.k1": 16, "model.lap.k2": 8, "model.lap.att_dim": 8, "model.lap.heads": 2, "model.lap.ffn_dim": 16,
    "model.crp.m": 64, "train.batch_size": 128, "train.eval_batch_size": 1024,
}


def _space(tmp: Path, name: str, scheduler: str, params: dict, epochs: int, metric="val_logloss", mode="min") -> Path:
    import yaml

    text = {"base": "lcn", "metric": metric, "mode": mode, "trials": 1, "concurrency": 1,
            "searcher": {"kind": "grid", "seed": 0}, "scheduler": {"kind": scheduler, "grace_period": 1, "reduction_factor": 2},
            "fixed": {**TINY, "train.epochs": epochs}, "params": params}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_world_dataset(tmp_path_factory.mktemp("tune") / "synth", rows=3000)


def _cli(*args: str, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raylsm", "tune", *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_search_asha_children_and_best(data: Path, tmp_path: Path):
    """2 trials run one after the other (lr 1e-2, then 1e-8), 2 epochs, ASHA after epoch 1: the 1e-8 trial's
    validation logloss stays at its initial value while the 1e-2 trial's has dropped, so ASHA must stop it.

    The tracking URI carries a token (``sqlite:///...?token=S3CRET``, a query MLflow's SQL store accepts): the
    search is recorded, and the token is in no file of the storage, the store or the artifacts, nor in the output."""
    from tests.test_security import SECRET, _files_holding

    space = _space(tmp_path, "asha", "asha", {"train.lr": {"grid": [0.01, 1.0e-8]}}, 2)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    proc = _cli("--space", str(space), "--data", str(data), "--storage", str(tmp_path / "runs"), "--tracking-uri",
                f"{uri}?token={SECRET}", "--experiment", "t", tmp=tmp_path)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert SECRET not in out and SECRET not in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tracking_uri"] == f"{uri}?token=***"
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = _children(client, parent.info.run_id)
    assert len(children) == 2 and len({c.data.tags["raylsm.trial_id"] for c in children}) == 2
    assert all(c.info.status != "RUNNING" for c in children)
    statuses = sorted(c.data.tags["raylsm.trial_status"] for c in children)
    assert statuses == ["completed", "stopped_by_scheduler"], statuses
    stopped = [c for c in children if c.data.tags["raylsm.trial_status"] == "stopped_by_scheduler"]
    assert all(json.loads(c.data.tags["raylsm.trial_config"])["train.lr"] == 1e-8 for c in stopped)
    assert all(c.info.status == "KILLED" for c in stopped)
    assert result["counts"]["stopped"] == len(stopped) == 1 and result["counts"]["trials"] == 2
    # The best config in the JSON is the child with the lowest validation logloss over its epochs.
    def best_of(run):
        return min(m.value for m in client.get_metric_history(run.info.run_id, "val_logloss"))
    best_child = min(children, key=best_of)
    assert result["best"]["mlflow_run_id"] == best_child.info.run_id
    assert result["best"]["config"] == json.loads(best_child.data.tags["raylsm.trial_config"])
    assert result["best"]["config"]["train.lr"] == 0.01
    assert result["best"]["best_val_logloss"] == pytest.approx(best_of(best_child))
    # The child is a full training record: used params, headline metrics, dataset input, model.
    assert best_child.data.params["train.lr"] == "0.01" and "model.twin.k" not in best_child.data.params
    assert best_child.data.params["mlflow.tracking_uri"] == result["tracking_uri"]
    assert best_child.data.metrics["auc"] == pytest.approx(result["best"]["auc"])
    assert best_child.inputs.dataset_inputs and best_child.inputs.dataset_inputs[0].dataset.digest
    # The parent holds the space file, the trials table and the best config.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"asha.yaml", "trials.csv", "best.json"} <= artifacts
    assert parent.data.params["best.train.lr"] == "0.01" and parent.data.params["search.scheduler"] == "asha"
    assert list((tmp_path / "runs").rglob("job.json")) and (tmp_path / "mlartifacts").is_dir()
    assert _files_holding(tmp_path, SECRET.encode()) == [], "secret written to disk"


def _tree(proc: subprocess.Popen) -> list:
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list) -> list[str]:
    import psutil

    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return out


def test_interrupted_search_resumes_without_rerunning_finished_trials(data: Path, tmp_path: Path):
    """SIGTERM once a trial has finished and the next one trains (as Ctrl-C): exit 130 with one line, the parent
    and the interrupted child KILLED, the search's Ray processes gone. ``--resume`` then trains only the rest."""
    space = _space(tmp_path, "resume", "fifo", {"train.seed": {"grid": [0, 1]}}, 1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--space", str(space), "--data", str(data), "--storage", str(tmp_path / "runs"), "--tracking-uri", uri,
            "--name", "small-search"]
    proc = _cli(*args, tmp=tmp_path)
    client = MlflowClient(tracking_uri=uri)
    deadline = time.time() + 600
    finished: list = []
    tree: list = []
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                exp = client.get_experiment_by_name("raylsm")
                runs = client.search_runs([exp.experiment_id], filter_string="tags.raylsm.trial_id != ''") if exp else []
            except Exception:  # the store is being created
                continue
            finished = [r for r in runs if r.info.status == "FINISHED"]
            if finished and any(r.info.status == "RUNNING" for r in runs):
                tree = _tree(proc)
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            for p in reversed(_tree(proc)):
                p.kill()
    assert finished and tree and proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert "raylsm: interrupted" in err and "continue it with --resume --name small-search" in err, err[-3000:]
    first = {r.data.tags["raylsm.trial_id"] for r in finished}
    parent_id = finished[0].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "KILLED"
    stopped = [c for c in _children(client, parent_id) if c.data.tags["raylsm.trial_id"] not in first]
    assert stopped and all(c.info.status == "KILLED" for c in stopped), [c.info.status for c in stopped]
    assert all(c.data.tags["raylsm.trial_status"] == "interrupted" for c in stopped)
    deadline = time.time() + 30
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.3)
    assert not _alive(tree), _alive(tree)

    proc = _cli(*args, "--resume", tmp=tmp_path)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["parent_run_id"] == parent_id and client.get_run(parent_id).info.status == "FINISHED"
    children = _children(client, parent_id)
    done = [c for c in children if c.info.status == "FINISHED"]
    assert len({c.data.tags["raylsm.trial_id"] for c in done}) == 2
    for trial_id in first:  # finished before the interruption: never trained again
        assert sum(c.data.tags["raylsm.trial_id"] == trial_id for c in children) == 1
    assert result["counts"]["trials"] == 2


def test_a_trial_whose_run_already_finished_hands_back_its_recorded_epochs(tmp_path: Path):
    """The window the resume test can hit: a trial's run FINISHED in MLflow but the search interrupted before
    Tune recorded the trial as ended. On resume that trial reports its recorded epochs instead of training."""
    from raylsm.tune.search import finished_trial_epochs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("raylsm")
    parent = client.create_run(exp).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "raylsm.trial_id": "t1"}).info.run_id
    other = client.create_run(exp, tags={"mlflow.parentRunId": parent, "raylsm.trial_id": "t2"}).info.run_id
    for epoch, (auc, loss) in enumerate([(0.61, 0.52), (0.65, 0.50)]):
        client.log_metric(child, "val_auc", auc, step=epoch)
        client.log_metric(child, "val_logloss", loss, step=epoch)
        client.log_metric(other, "val_auc", 0.7, step=epoch)
    client.log_metric(child, "auc", 0.64)  # a headline figure, not an epoch's
    client.set_terminated(child, "FINISHED")  # t2 stays RUNNING: interrupted mid-training, trains again
    assert finished_trial_epochs(uri, parent, "t1") == [
        {"epoch": 0, "val_auc": 0.61, "val_logloss": 0.52}, {"epoch": 1, "val_auc": 0.65, "val_logloss": 0.50}]
    assert finished_trial_epochs(uri, parent, "t2") == []
    assert finished_trial_epochs(uri, parent, "t3") == []

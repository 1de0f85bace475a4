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

from tests.conftest import small_world_dataset, tracebacks_outside_ray_benign

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


def _cli(*args: str, tmp: Path, address: str | None = None) -> subprocess.Popen:
    """``raylsm tune`` in a child process: on a local cluster of its own, or joining the one at ``address``."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.Popen([sys.executable, "-m", "raylsm", "tune", *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


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


def _trial_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("raylsm")
    return client.search_runs([exp.experiment_id], filter_string="tags.raylsm.trial_id != ''") if exp else []


def _lr(run) -> float | None:
    config = run.data.tags.get("raylsm.trial_config")
    return json.loads(config)["train.lr"] if config else None


def test_asha_search_interrupted_and_resumed(data: Path, tmp_path: Path, ray_address: str, ray_local_session: Path):
    """One search serves the scheduler, the interruption and the resume.

    Three trials one after the other, 2 epochs, ASHA after epoch 1: lr 1e-2 completes; lr 1e-8 (its validation
    logloss stays at its initial value while the first's dropped) must be stopped by ASHA; once the third
    (lr 3e-3) trains, SIGTERM (as Ctrl-C): exit 130 with one line, the parent and the interrupted child
    KILLED, the search's Ray processes gone. ``--resume`` then trains only the third, and the search ends
    with every child closed and tagged, and the best config that of the child with the lowest logloss.

    The first command starts a local cluster of its own; the resume joins a running one (``RAY_ADDRESS``, the
    test session's), as a search submitted to a cluster does.

    The tracking URI carries a token (``sqlite:///...?token=S3CRET``, a query MLflow's SQL store accepts): the
    search is recorded, and the token is in no file of the storage, the store, the artifacts or either Ray
    cluster's session logs (a joined cluster's runtime env agent would log a secret passed in a runtime env),
    nor in the output."""
    from tests.test_security import SECRET, _files_holding, ray_sessions

    space = _space(tmp_path, "asha", "asha", {"train.lr": {"grid": [0.01, 1.0e-8, 0.003]}}, 2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # --data relative to the command's directory: the trials run in directories of Ray Tune's choosing.
    args = ["--space", str(space), "--data", os.path.relpath(data, tmp_path), "--storage", str(tmp_path / "runs"),
            "--tracking-uri", f"{uri}?token={SECRET}", "--experiment", "raylsm", "--name", "small-search"]
    sessions = ray_sessions()
    proc = _cli(*args, tmp=tmp_path)
    client = MlflowClient(tracking_uri=uri)
    deadline = time.time() + 600
    runs: list = []
    tree: list = []
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                runs = _trial_runs(client)
            except Exception:  # the store is being created
                continue
            if any(_lr(r) == 0.003 and r.info.status == "RUNNING" for r in runs):  # the third trial trains
                tree = _tree(proc)
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            for p in reversed(_tree(proc)):
                p.kill()
    assert tree and proc.returncode == 130, (proc.returncode, err[-3000:])
    assert SECRET not in out and SECRET not in err
    assert tracebacks_outside_ray_benign(err) == [], err[-3000:]
    assert "raylsm: interrupted" in err and "continue it with --resume --name small-search" in err, err[-3000:]
    runs = {_lr(r): r for r in _trial_runs(client)}
    parent_id = runs[0.01].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "KILLED"
    assert runs[0.01].info.status == "FINISHED"
    # ASHA stopped the 1e-8 trial: its trainer was killed, so the search closed its run KILLED and tagged it.
    assert runs[1e-8].info.status == "KILLED" and runs[1e-8].data.tags["raylsm.trial_status"] == "stopped_by_scheduler"
    assert runs[0.003].info.status == "KILLED" and runs[0.003].data.tags["raylsm.trial_status"] == "interrupted"
    deadline = time.time() + 30
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.3)
    assert not _alive(tree), _alive(tree)

    # The resume is the command the interruption printed: the search's own options (data, --set, store) come from
    # its record, which keeps the store's URI redacted; the token is given again, as a user of a credentialed
    # store gives it.
    proc = _cli("--resume", "--name", "small-search", "--storage", str(tmp_path / "runs"), "--space", str(space),
                "--tracking-uri", f"{uri}?token={SECRET}", tmp=tmp_path, address=ray_address)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert SECRET not in out and SECRET not in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tracking_uri"] == f"{uri}?token=***"
    parent = client.get_run(parent_id)
    assert result["parent_run_id"] == parent_id and parent.info.status == "FINISHED"
    children = _children(client, parent_id)
    assert all(c.info.status != "RUNNING" for c in children)
    trained = {}
    for c in children:
        trained.setdefault(c.data.tags["raylsm.trial_id"], []).append(c)
    assert len(trained) == 3 and result["counts"]["trials"] == 3
    # Finished before the interruption, or stopped by the scheduler: never trained again.
    for lr in (0.01, 1e-8):
        assert len(trained[runs[lr].data.tags["raylsm.trial_id"]]) == 1
    again = [c for c in trained[runs[0.003].data.tags["raylsm.trial_id"]] if c.info.status == "FINISHED"]
    assert len(again) == 1 and again[0].data.tags["raylsm.trial_status"] == "completed"
    stopped = [c for c in children if c.data.tags["raylsm.trial_status"] == "stopped_by_scheduler"]
    assert [_lr(c) for c in stopped] == [1e-8] and all(c.info.status == "KILLED" for c in stopped)
    assert result["counts"]["stopped"] == 1 and result["counts"]["finished"] == 2
    # The best config in the JSON is the child with the lowest validation logloss over its epochs.
    finished = [c for c in children if c.info.status == "FINISHED"]

    def best_of(run):
        return min(m.value for m in client.get_metric_history(run.info.run_id, "val_logloss"))
    best_child = min(finished, key=best_of)
    assert result["best"]["mlflow_run_id"] == best_child.info.run_id
    assert result["best"]["config"] == json.loads(best_child.data.tags["raylsm.trial_config"])
    assert result["best"]["config"]["train.lr"] in (0.01, 0.003)
    assert result["best"]["best_val_logloss"] == pytest.approx(best_of(best_child))
    # The child is a full training record: used params, headline metrics, dataset input, model.
    assert best_child.data.params["train.lr"] == str(result["best"]["config"]["train.lr"])
    assert "model.twin.k" not in best_child.data.params
    assert best_child.data.params["mlflow.tracking_uri"] == result["tracking_uri"]
    assert best_child.data.metrics["auc"] == pytest.approx(result["best"]["auc"])
    assert best_child.inputs.dataset_inputs and best_child.inputs.dataset_inputs[0].dataset.digest
    # The parent holds the space file, the trials table and the best config.
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"asha.yaml", "trials.csv", "best.json"} <= artifacts
    assert parent.data.params["best.train.lr"] == str(result["best"]["config"]["train.lr"])
    assert parent.data.params["search.scheduler"] == "asha"
    assert list((tmp_path / "runs").rglob("job.json")) and (tmp_path / "mlartifacts").is_dir()
    assert _files_holding(tmp_path, SECRET.encode()) == [], "secret written to disk"
    searches = ray_sessions() - sessions  # the interrupted search's own cluster; the resume joined the session's
    assert len(searches) == 1
    assert all(_files_holding(d, SECRET.encode()) == [] for d in [*searches, ray_local_session]), "secret in Ray's logs"


def test_a_resumed_search_keeps_the_options_it_started_with(tmp_path: Path, monkeypatch):
    """``--resume`` trains the trials left with the first command's data, --set and store: an option left out is
    taken from the search's record, the same one given again is accepted, a different one is a one-line error."""
    from raylsm.config import ConfigError
    from raylsm.tune.request import SearchRequest, kept_options, resumed

    monkeypatch.chdir(tmp_path)
    first = SearchRequest(space="s.yaml", data="data/demo", overrides=["data.ll_len=100", "model.features.emb_dim=16"],
                          tracking_uri="sqlite:////tmp/m.db?token=S3CRET", workers_per_trial=1, trials=4)
    kept = kept_options(first)
    assert kept["data"] == str(tmp_path / "data" / "demo") and kept["tracking_uri"] == "sqlite:////tmp/m.db?token=***"
    bare = resumed(SearchRequest(space="s.yaml", name="x", resume=True), kept)
    assert (bare.data, bare.overrides, bare.workers_per_trial, bare.trials, bare.name) == (
        kept["data"], first.overrides, 1, 4, "x")
    assert bare.tracking_uri == "sqlite:////tmp/m.db?token=***"
    again = resumed(SearchRequest(space="s.yaml", data=str(tmp_path / "data/demo"), tracking_uri=first.tracking_uri,
                                  resume=True), kept)
    assert again.tracking_uri == first.tracking_uri  # the credentialed one, given again
    with pytest.raises(ConfigError, match=r"^--resume: --set \['data.ll_len=500'\] is not what the search started with"):
        resumed(SearchRequest(space="s.yaml", overrides=["data.ll_len=500"], resume=True), kept)
    with pytest.raises(ConfigError, match=r"^--resume: --data "):
        resumed(SearchRequest(space="s.yaml", data="other", resume=True), kept)
    legacy = SearchRequest(space="s.yaml", overrides=["a=1"], resume=True)
    assert resumed(legacy, None) is legacy  # a record without its options: the resuming command's own


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

"""Safe defaults: the local Ray cluster that ``raylsm train`` starts listens on loopback only.

The check reads the process table: every process of the run (the ``raylsm train`` process and all its
descendants: GCS, raylet, agents, dashboard, training workers) and every socket they listen on. The same
run is then stopped with SIGTERM; ``tests/test_faults.py`` and ``tests/test_signals.py`` check what that
leaves behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import ray_session_dirs as ray_sessions, small_world_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.ll_len=40", "data.st_len=10", "model.features.emb_dim=8", "model.head=[32,16]", "model.lap.k1=16",
    "model.lap.k2=8", "model.lap.att_dim=8", "model.lap.heads=2", "model.lap.ffn_dim=16", "model.crp.m=64",
    "train.batch_size=64", "train.eval_batch_size=512", "train.cpus_per_worker=0.5",
]


@dataclass
class InterruptedRun:
    """What a ``raylsm train`` run looked like while training, and after it was stopped (see :func:`run_and_interrupt`)."""

    listeners: list[tuple[str, int, str]] = field(default_factory=list)  # (ip, port, process name)
    processes: list[psutil.Process] = field(default_factory=list)  # the run's process tree, seen while training
    names: list[str] = field(default_factory=list)  # their process names
    returncode: int | None = None
    stderr: str = ""
    tracking_uri: str = ""
    seconds_to_exit: float = 0.0
    run_dir: Path | None = None  # the Ray Train run's storage folder (its checkpoints)
    killed_checkpoints: dict[str, int] = field(default_factory=dict)  # the SIGKILLed first start's: folder -> epoch
    killed_runs: list[tuple[str, str]] = field(default_factory=list)  # (MLflow run id, status) right after SIGKILL


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        out += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _checkpoint_epochs(run_dir: Path) -> dict[str, int]:
    """Checkpoint folder name -> its epoch, for every whole checkpoint (its job.json written) in ``run_dir``."""
    out = {}
    for meta in run_dir.glob("checkpoint_*/job.json") if run_dir.exists() else []:
        try:
            out[meta.parent.name] = json.loads(meta.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            pass  # being written
    return out


def _kill_tree(processes: list[psutil.Process]) -> None:
    for p in reversed(processes):
        try:
            p.kill()
        except psutil.Error:
            pass


def _gone(processes: list[psutil.Process], timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes):
                return True
        except psutil.Error:
            continue
        time.sleep(0.3)
    return False


def _registered(run_dir: Path) -> set[str]:
    """Checkpoint folders Ray Train has registered (its snapshot names them): the ones a restart resumes from."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return set()
    return {name for name in _checkpoint_epochs(run_dir) if name in text}


def _until_checkpoint(proc: subprocess.Popen, root: psutil.Process, run_dir: Path, seen: set[str],
                      deadline: float) -> None:
    """Wait until ``proc`` has a registered checkpoint not in ``seen`` while its training worker runs."""
    while time.time() < deadline and proc.poll() is None:
        if _registered(run_dir) - seen and any("RayTrainWorker" in _cmdline(p) for p in _tree(root)):
            return
        time.sleep(0.5)
    assert proc.poll() is None, f"raylsm train ended before it was stopped: {proc.communicate()[1][-3000:]}"
    raise AssertionError("raylsm train did not reach a new checkpoint")


def run_and_interrupt(tmp_path_factory, sig: int = signal.SIGTERM) -> InterruptedRun:
    """Two starts of one ``raylsm train --name interrupted`` in child processes, watched while they train.

    The first is killed with SIGKILL after its first checkpoint (its driver, then the Ray processes it
    started), which leaves its MLflow run RUNNING. The second, the same command, must mark that run
    FAILED, resume from its checkpoint, and is stopped with ``sig`` after its own first checkpoint
    (SIGTERM runs the Ctrl-C handler: ``tests/test_signals.py``).

    Behind the session fixture ``interrupted_run`` (tests/conftest.py): one sequence serves this file,
    test_signals and test_faults."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("interrupted")
    data = small_world_dataset(tmp / "synth", rows=6000)
    out = InterruptedRun(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "RAYLSM_"))}  # a user's plain shell
    cmd = [sys.executable, "-m", "raylsm", "train", "--model", "lcn", "--data", str(data), "--epochs", "20",
           "--storage", str(tmp / "runs"), "--name", "interrupted", "--tracking-uri", out.tracking_uri, "--workers", "1"]
    for kv in TINY:
        cmd += ["--set", kv]
    run_dir = out.run_dir = tmp / "runs" / "interrupted"
    deadline = time.time() + 600

    killed = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = [psutil.Process(killed.pid)]
    try:
        _until_checkpoint(killed, tree[0], run_dir, set(), deadline)
        tree = _tree(tree[0])
        killed.send_signal(signal.SIGKILL)  # the driver only: nothing of it runs to close its MLflow run
        killed.communicate(timeout=60)
    finally:
        _kill_tree(tree)  # then the Ray processes it had started, none other
    assert _gone(tree, 60), "the killed run's processes did not exit"
    out.killed_checkpoints = {name: epoch for name, epoch in _checkpoint_epochs(run_dir).items()
                              if name in _registered(run_dir)}
    out.killed_runs = [(r.info.run_id, r.info.status) for r in MlflowClient(tracking_uri=out.tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=out.tracking_uri).search_experiments()])]

    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    try:
        _until_checkpoint(proc, root, run_dir, set(out.killed_checkpoints), deadline)
        out.processes = _tree(root)
        out.names = [_name(p) for p in out.processes]
        out.listeners = _listening(out.processes)
        start = time.time()
        proc.send_signal(sig)
        _, out.stderr = proc.communicate(timeout=120)
        out.seconds_to_exit = time.time() - start
        out.returncode = proc.returncode
    finally:
        if proc.poll() is None:  # only this run's own tree, never a process by name
            _kill_tree(_tree(root))
    return out


@pytest.mark.ray
def test_local_cluster_listens_on_loopback_only(interrupted_run):
    names = interrupted_run.names
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    assert len(interrupted_run.listeners) >= 3, interrupted_run.listeners  # GCS, raylet, workers at least
    exposed = [entry for entry in interrupted_run.listeners if not is_loopback(entry[0])]
    # torch.distributed's rendezvous included: on a loopback cluster it goes through a file store, not a TCPStore.
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_joining_a_cluster_leaves_auth_mode_as_the_user_set_it(monkeypatch):
    import ray

    from raylsm.train import cluster

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((dict(kw), os.environ.get("RAY_AUTH_MODE"))))
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    cluster.ensure_ray()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    cluster.ensure_ray()
    assert [(kw["address"], mode) for kw, mode in calls] == [("10.1.2.3:6379", None), ("10.1.2.3:6379", "token")]
    assert "RAY_AUTH_MODE" in os.environ and os.environ["RAY_AUTH_MODE"] == "token"


def test_local_cluster_is_started_on_loopback(monkeypatch):
    import ray

    from raylsm.train import cluster

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(dict(kw)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    cluster.ensure_ray(num_cpus=2)
    (kw,) = calls
    assert kw["address"] == "local" and kw["_node_ip_address"] == "127.0.0.1" and kw["dashboard_host"] == "127.0.0.1"
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{kw['dashboard_port']}"
    assert os.environ["RAY_AUTH_MODE"] == "token"  # the user's choice stands


def test_joining_a_loopback_cluster_keeps_the_loopback_node_address(monkeypatch):
    import ray

    from raylsm.train import cluster

    assert cluster._is_loopback_address("127.0.0.1:6379") and cluster._is_loopback_address("ray://localhost:10001")
    assert cluster._is_loopback_address("[::1]:6379")
    assert not cluster._is_loopback_address("10.1.2.3:6379") and not cluster._is_loopback_address("auto")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((kw["address"], os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    cluster.ensure_ray()
    assert calls[-1] == ("10.1.2.3:6379", "1")  # a real cluster: untouched
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cluster.ensure_ray()
    assert calls[-1] == ("127.0.0.1:6379", "0")


# ----------------------------------------------------------------------------- credentials never at rest

SECRET = "S3CRET"


@pytest.mark.parametrize("address, kept", [(None, True), ("127.0.0.1:6379", True), ("ray://localhost:10001", True),
                                            ("10.1.2.3:6379", False)])
def test_commands_keep_a_loopback_node_address_before_they_import_ray(monkeypatch, address, kept):
    """The command line sets Ray's loopback setting before any command runs (a command may import ``ray.data``
    before it joins), for a local or loopback cluster only; a remote cluster's node address is left to Ray."""
    from raylsm.cli import main

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert main(["data", "check", "/nonexistent/raylsm-data"]) == 1  # any command; this one fails fast
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == ("0" if kept else None)


def test_redact_uri_strips_userinfo_every_query_value_and_the_fragment():
    from raylsm.train.tracking import real_uri, redact_uri, scrub

    cases = {
        "https://alice:S3CRET@mlflow.example.com:5000/api": "https://***@mlflow.example.com:5000/api",
        "http://alice:S3CRET@127.0.0.1:5000/?token=S3CRET&x=1#S3CRET": "http://***@127.0.0.1:5000/?token=***&x=***",
        "sqlite:////tmp/m.db?token=S3CRET": "sqlite:////tmp/m.db?token=***",
        "http://h:1/#S3CRET": "http://h:1/",
        "https://S3CRET@h/p": "https://***@h/p",
        "sqlite:////tmp/mlflow.db": "sqlite:////tmp/mlflow.db",
        "databricks://profile": "databricks://profile",
    }
    for uri, shown in cases.items():
        assert redact_uri(uri) == shown and redact_uri(shown) == shown, uri
    full = "http://alice:S3CRET@127.0.0.1:5000/?token=S3CRET"
    assert scrub(f"refused {full} (token S3CRET)", full).count(SECRET) == 0
    assert real_uri(redact_uri(full)) == redact_uri(full)  # nothing in the environment: stays redacted
    os.environ["RAYLSM_TRACKING_URI"] = full
    try:
        assert real_uri(redact_uri(full)) == full
        assert real_uri("http://***@other:5000/") == "http://***@other:5000/"  # another store: never swapped
    finally:
        del os.environ["RAYLSM_TRACKING_URI"]


_LOG_GUARD_CHILD = """
import io, logging, sys
from raylsm.train.uri import real_uri, redact_uri
full = "http://alice:S3CRET@127.0.0.1:5000/?token=T0KEN"
out = io.StringIO()
log = logging.getLogger("mlflow.utils.rest_utils")  # where MLflow reports a failed request
log.addHandler(logging.StreamHandler(out))
log.propagate = False


def report():
    try:
        raise ConnectionError(f"API request to {full}/api/2.0/mlflow/runs/get failed")
    except ConnectionError:
        log.warning("retrying %s (token T0KEN)", full, exc_info=True)


report()
if sys.argv[1] == "on":
    real_uri(full)  # resolving the credentialed URI guards this process's logs
    logging.getLogger("raylsm.later").addHandler(logging.StreamHandler(out))  # a handler made afterwards
    logging.getLogger("raylsm.later").error("store %s refused", "https://bob:PW99@h/x")
    report()
print(out.getvalue())
"""


@pytest.mark.parametrize("guard", ["off", "on"])
def test_mlflow_log_records_never_show_the_credentials_of_a_resolved_tracking_uri(guard):
    """Once a process resolves a credentialed tracking URI, a log record quoting it (message and traceback) shows
    ``***`` in its place; before, the same record shows it (the mechanism switched off)."""
    out = subprocess.run([sys.executable, "-c", _LOG_GUARD_CHILD, guard], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1], env=_clean_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("retrying http") == (2 if guard == "on" else 1)
    if guard == "off":
        assert "alice:S3CRET@" in out.stdout and out.stdout.count("T0KEN") >= 2
        return
    before, later = out.stdout.split("store ", 1)
    assert "alice:S3CRET@" in before  # the record made before the guard is left as it was made
    assert "S3CRET" not in later and "T0KEN" not in later and "PW99" not in later, later
    assert later.startswith("https://***@h/x refused") and "http://***@127.0.0.1:5000/?token=***" in later
    assert "ConnectionError: API request to http://***@127.0.0.1:5000/?token=***/api" in later  # the traceback


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path.relative_to(root)))
            except OSError:
                pass
    return hits




def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(root: Path) -> tuple[subprocess.Popen, int]:
    """A local MLflow tracking server on loopback (SQLite store, proxied artifacts under ``root``)."""
    import urllib.request

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner process: the runs API is all this needs
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "server-artifacts")]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the MLflow server did not start")


def _stop_server(proc: subprocess.Popen) -> None:
    """The server and the workers it forked: its own session only."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "RAYLSM_"))}


def test_credentialed_tracking_uri_is_never_written_or_printed(tmp_path_factory, ray_address, ray_local_session):
    """``raylsm train`` against a real MLflow server through ``http://alice:S3CRET@...`` (basic auth in the URI),
    submitted to a running Ray cluster (``RAY_ADDRESS``, as under ``ray job submit``: a secret handed to the
    workers in a runtime env would be logged by the cluster's runtime env agent): the run is recorded (params,
    job YAML, model artifact, metrics from the worker), and ``S3CRET`` appears in no file under the storage, the
    server's store and artifacts, the working directory, the cluster's session logs, nor in stdout/stderr."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("secret")
    data = small_world_dataset(tmp / "synth", rows=1500)
    server, port = _mlflow_server(tmp)
    try:
        uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "raylsm", "train", "--model", "lcn", "--data", str(data), "--epochs", "1",
               "--storage", str(tmp / "runs"), "--name", "secret", "--tracking-uri", uri, "--workers", "1",
               "--set", "train.max_steps_per_epoch=3"]
        for kv in TINY:
            cmd += ["--set", kv]
        sessions = ray_sessions()
        env = {**_clean_env(), "RAY_ADDRESS": ray_address}
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert SECRET not in proc.stdout and SECRET not in proc.stderr
        assert ray_sessions() == sessions  # it joined the running cluster
        assert _files_holding(ray_local_session, SECRET.encode()) == [], "secret in Ray's session logs"
        assert result["tracking_uri"] == f"http://***@127.0.0.1:{port}"
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params["mlflow.tracking_uri"] == result["tracking_uri"]
        assert client.get_metric_history(run.info.run_id, "train_loss")  # the worker reached the store
        assert "job.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert all(SECRET not in f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
    finally:
        _stop_server(server)
    checkpoints = list((tmp / "runs" / "secret").glob("checkpoint_*/job.json"))
    assert checkpoints and all("***@" in p.read_text() for p in checkpoints)
    assert list((tmp / "server-artifacts").rglob("MLmodel")) and (tmp / "server.db").is_file()  # the logged model
    assert _files_holding(tmp, SECRET.encode()) == [], "secret written to disk"


# ----------------------------------------------------------------------------- names, --resume-from, crafted checkpoints


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return small_world_dataset(tmp_path_factory.mktemp("crafted") / "synth", rows=1200)


def _one_line(argv: list[str], capsys) -> tuple[int, str, float]:
    """Run the CLI in process: the exit code, its only stderr line, the seconds it took; Ray never started."""
    from raylsm.cli import main

    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == ray_before, "Ray started"
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylsm: error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err
    return code, lines[0], seconds


def _no_runs(db: Path) -> bool:
    if not db.exists():
        return True
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


def _checkpoint(directory: Path, data: Path) -> Path:
    """A real checkpoint of a tiny ``din`` for ``data`` (no Ray), as a run would write it."""
    from raylsm.data.contract import read_manifest
    from raylsm.models.ctr import build_model
    from raylsm.models.layers import Vocab
    from raylsm.train.config import resolve_job
    from raylsm.train.checkpoint import save_checkpoint
    from raylsm.train.optim import build_optimizer

    job = resolve_job(preset="din", overrides=[f"data.path={data}", "data.ll_len=40", "data.st_len=10",
                                                "model.features.emb_dim=8", "model.head=[16]"])
    vocab = Vocab.from_manifest(read_manifest(data))
    model = build_model(job.model, vocab)
    directory.mkdir(parents=True)
    save_checkpoint(str(directory), model, build_optimizer(model, 1e-3), 0, job, vocab, {"epoch": 0})
    return directory


class _Payload:
    """Unpickling this would run a command (it must never be unpickled)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_written_before_a_model_key_existed_loads_as_the_model_it_is(tiny_data: Path, tmp_path: Path):
    """A checkpoint of a model without the head's count inputs (``match_counts`` off), its ``job.json`` lacking the
    key as checkpoints written before it existed do, loads as that model; with the key dropped from an on-model's
    ``job.json`` the weights no longer match, and that is one clear line."""
    import torch

    from raylsm.data.contract import read_manifest
    from raylsm.models.ctr import build_model
    from raylsm.models.layers import Vocab
    from raylsm.train.checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
    from raylsm.train.config import resolve_job
    from raylsm.train.optim import build_optimizer

    vocab = Vocab.from_manifest(read_manifest(tiny_data))
    for counts in (False, True):
        job = resolve_job(preset="din", overrides=[f"data.path={tiny_data}", "data.ll_len=40", "data.st_len=10",
                                                    "model.features.emb_dim=8", "model.head=[16]",
                                                    f"model.match_counts={str(counts).lower()}"])
        model = build_model(job.model, vocab)
        directory = tmp_path / f"counts-{counts}"
        directory.mkdir()
        save_checkpoint(str(directory), model, build_optimizer(model, 1e-3), 0, job, vocab, {"epoch": 0})
        meta = json.loads((directory / "job.json").read_text())
        assert meta["job"]["model"].pop("match_counts") is counts
        (directory / "job.json").write_text(json.dumps(meta))
        if counts:
            with pytest.raises(CheckpointError, match="weight head.0.weight has shape"):
                model_from_checkpoint(str(directory))
        else:
            loaded, meta = model_from_checkpoint(str(directory))
            assert loaded.cfg.match_counts is False and meta["job"]["model"]["match_counts"] is False
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_meta_build_leaves_meta_tensors_undrawn_and_draws_every_other_tensor():
    """Inside the block a meta tensor passes through ``normal_`` untouched while a CPU tensor is drawn as always;
    outside it (the mechanism off) torch's own ``normal_`` is back."""
    import torch

    from raylsm.train.checkpoint import meta_tensors_skip_normal_init

    real = torch.nn.init.normal_
    with meta_tensors_skip_normal_init():
        meta = torch.empty(3, 4, device="meta")
        assert torch.nn.init.normal_(meta) is meta
        torch.manual_seed(0)
        drawn = torch.nn.init.normal_(torch.zeros(3, 4), std=2.0)
    torch.manual_seed(0)
    assert torch.equal(drawn, real(torch.zeros(3, 4), std=2.0)) and drawn.abs().sum() > 0
    assert torch.nn.init.normal_ is real


def test_loading_a_checkpoint_in_a_fresh_process_does_not_import_torch_dynamo(tiny_data: Path, tmp_path: Path):
    """The shape check's meta-device build draws nothing: the process that loads a checkpoint (``raylsm eval``,
    the driver logging the model) does not pay ``torch._dynamo``'s import, and the weights load whole."""
    directory = _checkpoint(tmp_path / "ckpt", tiny_data)
    code = ("import sys, torch; from raylsm.train.checkpoint import model_from_checkpoint, load_checkpoint; "
            f"m, _ = model_from_checkpoint({str(directory)!r}); s, _ = load_checkpoint({str(directory)!r}); "
            "assert all(torch.equal(m.state_dict()[k], v) for k, v in s['model'].items()); "
            "print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_crafted_checkpoints_are_one_line_for_eval(tiny_data: Path, tmp_path: Path, capsys):
    import shutil

    import torch

    good = _checkpoint(tmp_path / "good", tiny_data)
    from raylsm.cli import main

    assert main(["eval", "--checkpoint", str(good), "--data", str(tiny_data)]) == 0  # the untouched one scores
    capsys.readouterr()

    def crafted(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    marker = tmp_path / "pwned"
    pickle = crafted("pickle")
    torch.save({"model": _Payload(marker), "epoch": 0}, pickle / "checkpoint.pt")
    meta = json.loads((good / "job.json").read_text())

    def with_meta(name: str, **change) -> Path:
        d = crafted(name)
        (d / "job.json").write_text(json.dumps({**meta, **change}) if change else "{not json")
        return d

    huge = with_meta("huge", vocab={**meta["vocab"], "item": 2**40})
    bigger = with_meta("bigger", vocab={**meta["vocab"], "item": meta["vocab"]["item"] * 4})
    cases = {
        "pickle payload": (pickle, "checkpoint.pt refused by torch.load(weights_only=True)"),
        "bad json": (with_meta("badjson"), "job.json: not valid JSON"),
        "vocab beyond bound": (huge, "vocab.item must be an integer in [1, 2^31]"),
        "table the weights do not match": (bigger, "but the job.json vocab and model ask for"),
        "vocab not a number": (with_meta("strvocab", vocab={**meta["vocab"], "cate": "x"}), "vocab.cate must be an integer"),
        "unknown top-level key": (with_meta("extra", bogus_top={"a": 1}), "job.json: unknown key 'bogus_top'"),
        "job of a wrong type": (with_meta("badjob", job={**meta["job"], "train": {"lr": "fast"}}), "train.lr: must be a number"),
        "no job.json": (crafted("nometa"), "no job.json"),
        "not a directory": (tmp_path / "missing", "no such directory"),
    }
    (tmp_path / "nometa" / "job.json").unlink()
    for case, (directory, expected) in cases.items():
        code, line, seconds = _one_line(["eval", "--checkpoint", str(directory), "--data", str(tiny_data)], capsys)
        assert code == 2 and f"--checkpoint {directory}" in line and expected in line, (case, line)
        assert seconds < 20, (case, seconds)
    assert not marker.exists(), "the pickle payload ran"


def test_run_names_cannot_escape_storage(tiny_data: Path, tmp_path: Path, capsys):
    db = tmp_path / "mlflow.db"
    common = ["--data", str(tiny_data), "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{db}"]
    space = REPO / "tune_spaces" / "lcn.yaml"
    for name in ("../x", "/tmp/abs", "a/b", "..", "."):
        for argv in (["train", "--model", "din", *common, "--name", name],
                     ["tune", "--space", str(space), *common, "--name", name]):
            code, line, seconds = _one_line(argv, capsys)
            assert code == 2 and f"--name {name!r}: must be a plain name" in line, line
            assert seconds < 20
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()
    assert _no_runs(db)


def test_resume_from_is_checked_before_ray_and_mlflow(tiny_data: Path, tmp_path: Path, capsys):
    good = _checkpoint(tmp_path / "good", tiny_data)
    other = small_world_dataset(tmp_path / "other", rows=600, users=50)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(good, bad)
    (bad / "job.json").write_text("[]")
    import torch

    pickle = tmp_path / "pickle"
    shutil.copytree(good, pickle)
    torch.save({"model": _Payload(tmp_path / "pwned"), "epoch": 0}, pickle / "checkpoint.pt")
    db = tmp_path / "mlflow.db"
    cases = {
        tmp_path / "missing": "no such directory",
        empty: "not a raylsm checkpoint (no checkpoint.pt)",
        bad: "job.json: must be an object",
        pickle: "checkpoint.pt refused by torch.load(weights_only=True)",
    }
    argv = ["train", "--model", "din", "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{db}"]
    for directory, expected in cases.items():
        code, line, _ = _one_line([*argv, "--data", str(tiny_data), "--resume-from", str(directory)], capsys)
        assert code == 2 and line.startswith(f"raylsm: error: --resume-from {directory}") and expected in line, line
    code, line, _ = _one_line([*argv, "--data", str(other), "--resume-from", str(good)], capsys)
    assert code == 2 and f"--resume-from {good}: vocab." in line and "in the dataset" in line, line
    assert _no_runs(db) and not (tmp_path / "pwned").exists()


# ``raylsm tune`` with a token in its tracking URI: tests/test_tune.py (the ASHA search).

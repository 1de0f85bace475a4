"""Safe defaults: the local Ray cluster that ``raylsm train`` starts listens on loopback only.

The check reads the process table: every process of the run (the ``raylsm train`` process and all its
descendants: GCS, raylet, agents, dashboard, training workers) and every socket they listen on. The same
run is then stopped with SIGINT (Ctrl-C); ``tests/test_faults.py`` checks what that leaves behind.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import small_world_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.ll_len=40", "data.st_len=10", "model.features.emb_dim=8", "model.head=[32,16]", "model.lap.k1=16",
    "model.lap.k2=8", "model.lap.att_dim=8", "model.lap.heads=2", "model.lap.ffn_dim=16", "model.crp.m=64",
    "train.batch_size=64", "train.eval_batch_size=512", "train.cpus_per_worker=0.5",
]


@dataclass
class InterruptedRun:
    """What a ``raylsm train`` run looked like while training, and after SIGINT."""

    listeners: list[tuple[str, int, str]] = field(default_factory=list)  # (ip, port, process name)
    processes: list[psutil.Process] = field(default_factory=list)  # the run's process tree, seen while training
    names: list[str] = field(default_factory=list)  # their process names
    returncode: int | None = None
    stderr: str = ""
    tracking_uri: str = ""
    seconds_to_exit: float = 0.0


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


def run_and_interrupt(tmp_path_factory) -> InterruptedRun:
    """One ``raylsm train`` in a child process: watched while it trains, then stopped with SIGINT.

    Behind the session fixture ``interrupted_run`` (tests/conftest.py): one run serves this file and test_faults."""
    tmp = tmp_path_factory.mktemp("interrupted")
    data = small_world_dataset(tmp / "synth", rows=6000)
    out = InterruptedRun(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}  # a user's plain shell
    cmd = [sys.executable, "-m", "raylsm", "train", "--model", "lcn", "--data", str(data), "--epochs", "20",
           "--storage", str(tmp / "runs"), "--name", "interrupted", "--tracking-uri", out.tracking_uri, "--workers", "1"]
    for kv in TINY:
        cmd += ["--set", kv]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    run_dir = tmp / "runs" / "interrupted"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            checkpoints = run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir())
            if checkpoints and any("RayTrainWorker" in _cmdline(p) for p in _tree(root)):
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"raylsm train ended before it was interrupted: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "raylsm train did not reach its first checkpoint"
        out.processes = _tree(root)
        out.names = [_name(p) for p in out.processes]
        out.listeners = _listening(out.processes)
        start = time.time()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, out.stderr = proc.communicate(timeout=120)
        out.seconds_to_exit = time.time() - start
        out.returncode = proc.returncode
    finally:
        if proc.poll() is None:  # only this run's own tree, never a process by name
            for p in reversed(_tree(root)):
                p.kill()
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

    from raylsm.train import run

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((dict(kw), os.environ.get("RAY_AUTH_MODE"))))
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    run.ensure_ray()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    run.ensure_ray()
    assert [(kw["address"], mode) for kw, mode in calls] == [("10.1.2.3:6379", None), ("10.1.2.3:6379", "token")]
    assert "RAY_AUTH_MODE" in os.environ and os.environ["RAY_AUTH_MODE"] == "token"


def test_local_cluster_is_started_on_loopback(monkeypatch):
    import ray

    from raylsm.train import run

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(dict(kw)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    run.ensure_ray(num_cpus=2)
    (kw,) = calls
    assert kw["address"] == "local" and kw["_node_ip_address"] == "127.0.0.1" and kw["dashboard_host"] == "127.0.0.1"
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{kw['dashboard_port']}"
    assert os.environ["RAY_AUTH_MODE"] == "token"  # the user's choice stands


def test_joining_a_loopback_cluster_keeps_the_loopback_node_address(monkeypatch):
    import ray
    import ray._private.ray_constants as ray_constants

    from raylsm.train import run

    assert run._is_loopback_address("127.0.0.1:6379") and run._is_loopback_address("ray://localhost:10001")
    assert run._is_loopback_address("[::1]:6379")
    assert not run._is_loopback_address("10.1.2.3:6379") and not run._is_loopback_address("auto")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((kw["address"], os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    run.ensure_ray()
    assert calls[-1] == ("10.1.2.3:6379", "1") and ray_constants.ENABLE_RAY_CLUSTER  # a real cluster: untouched
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    run.ensure_ray()
    assert calls[-1] == ("127.0.0.1:6379", "0") and not ray_constants.ENABLE_RAY_CLUSTER

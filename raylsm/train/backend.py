"""The process group of a run on a loopback-only cluster: no socket beyond 127.0.0.1.

Ray Train's torch backend rendezvous through ``env://``: rank 0 hosts a c10d TCPStore, which binds the
wildcard address (torch has no bind-address setting for it), and gloo/NCCL pick the interface the host name
resolves to. On a cluster whose every node is on 127.0.0.1 (the one :func:`raylsm.train.cluster.ensure_ray`
starts) all workers share one host, so the rendezvous goes through a file store instead (``file://``, no
listening socket) and gloo/NCCL are pinned to the loopback interface. A cluster with real node addresses
keeps Ray's own ``env://`` setup unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend



def loopback_interface() -> str:
    """The name of this host's loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def _pin_to_loopback(interface: str) -> None:
    # Read by torch's gloo device and by NCCL's bootstrap when the process group is created.
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    os.environ["NCCL_SOCKET_IFNAME"] = interface


class _LoopbackTorchBackend(_TorchBackend):
    _store_dir: str | None = None

    def _remove_store(self) -> None:
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None

    def on_shutdown(self, worker_group, backend_config: "LoopbackTorchConfig"):
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            self._remove_store()  # the group is gone: its rendezvous directory goes with it

    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig"):
        if backend_config.backend is not None:
            backend = backend_config.backend
        else:
            resources = worker_group.get_resources_per_worker()
            backend = "nccl" if resources.get("GPU", 0) > 0 else "gloo"
        # A fresh, empty file per group start (a restarted group after a worker loss gets its own).
        self._remove_store()  # a restarted group: the previous group's directory
        self._store_dir = tempfile.mkdtemp(prefix="raylsm-pg-")
        store = os.path.join(self._store_dir, "store")
        worker_group.execute(_pin_to_loopback, interface=backend_config.interface)
        worker_group.execute(_set_torch_distributed_env_vars)
        import ray

        ray.get([
            worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                              world_size=len(worker_group), init_method=f"file://{store}",
                                              timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """:class:`TorchConfig` for a one-host loopback cluster: file rendezvous, gloo/NCCL on ``interface``."""

    interface: str = "lo"

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def loopback_cluster() -> bool:
    """True when every alive node of the connected cluster has a loopback address (one host, nothing exposed)."""
    import ipaddress

    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    try:
        return bool(nodes) and all(ipaddress.ip_address(n["NodeManagerAddress"]).is_loopback for n in nodes)
    except (KeyError, ValueError):
        return False


def torch_config() -> TorchConfig:
    """The process-group setup for the connected cluster (see the module docstring)."""
    return LoopbackTorchConfig(interface=loopback_interface()) if loopback_cluster() else TorchConfig()

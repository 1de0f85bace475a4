"""Ray for a run: join the cluster a job was submitted to, or start a local one bound to loopback
(docs/design.md, "Ray and MLflow notes")."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Callable


LOOPBACK = "127.0.0.1"
LOCAL_HEALTH_CHECK_INTERVAL_S = "0.5"  # Ray Train controller poll interval on a local cluster (Ray: 2 s)


def ensure_ray(num_cpus: int | None = None, quiet: bool = False, before_start: Callable[[], object] | None = None,
               object_store_mb: int | None = None) -> None:
    """Connect to the cluster a job was submitted to (RAY_ADDRESS), or start a local one bound to loopback.

    Joining a cluster: the user's ``RAY_AUTH_MODE`` and token are used as they are (never forced off).
    Starting one: every process of it (GCS, raylet, workers, agents, dashboard) listens on 127.0.0.1 only,
    so nothing outside this host can reach it. Ray turns a 127.0.0.1 node address into the host's external
    one while multi-node support is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), which a one-node cluster
    does not need: it is turned off for this process and the Ray processes it starts. ``RAY_AUTH_MODE``
    defaults to ``disabled`` for this loopback-only cluster (docs/design.md, "Ray and MLflow notes": explicit, so behaviour doesn't flip
    once ``~/.ray/auth_token`` exists); a user's setting wins. So does ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER``,
    off by default here (no spot nodes on a loopback cluster), and ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 0.5 s
    here instead of Ray's 2 s (a finished or lost worker is noticed sooner), and ``RAY_USAGE_STATS_ENABLED``,
    off here (nothing is reported off the host). No secret goes through here: a
    runtime env's variables are written to Ray's logs, and a local cluster's processes would inherit them
    (a credentialed tracking URI travels as an actor's or a trainable's argument instead).

    The dashboard runs (on loopback) because Ray Train's placement-group cleaner asks its state API
    whether the training controller is alive; ``RAY_API_SERVER_ADDRESS`` names it, since with several Ray
    instances on one host (other users, tests) address discovery fails and the cleaner logs a traceback
    every few seconds. ``quiet`` (the demo): Ray's own INFO logs, the workers' output and Ray Data's
    progress bars are not shown. ``object_store_mb``: the object store of a local cluster started here, MiB
    (Ray's default: 30 % of the memory); a joined cluster keeps its own. ``before_start``: called after Ray
    is imported, before it starts or joins a cluster (a check that must fail before Ray prints anything).
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    prepare_ray_import()
    import ray

    if ray.is_initialized():
        return
    if before_start is not None:
        before_start()
    if address:
        ray.init(address=address, logging_level=logging.WARNING if quiet else logging.INFO)
        return

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train's preemption watcher polls for spot-node preemption notices, which a one-node loopback
    # cluster never gets; it is one more actor process to start before the first batch (a user's setting wins).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's controller polls its workers every 2 s: a finished or failed worker waits up to that long to be
    # noticed. Polling a one-node cluster's workers is cheap, so it polls every half second here.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_HEALTH_CHECK_INTERVAL_S)
    # Ray's usage statistics (a report to Ray's servers, and Ray Data's collection actor, one more process
    # per cluster) are off for a loopback cluster started here: it sends nothing off this host. A user's
    # setting wins.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    dashboard_port = _free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{dashboard_port}"
    if quiet:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        # A small machine runs the controller, its helpers, the workers and Ray Data's tasks at once: more
        # Python workers than 4x the CPUs, which the raylet reports as a warning on the driver.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(4, 2 * (num_cpus or os.cpu_count() or 1))))
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
        include_dashboard=True,
        dashboard_host=LOOPBACK,
        dashboard_port=dashboard_port,
        _node_ip_address=LOOPBACK,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=not quiet,
    )


def prepare_ray_import() -> None:
    """Before this process first imports Ray: keep a loopback node address when the cluster is (or will be) on
    this host's loopback. No Ray import; the command line calls it before any command runs, since a command may
    import Ray (``ray.data``, ``ray.train``) before it reaches :func:`ensure_ray`.

    A local cluster, or one on this host's loopback (`ray start --node-ip-address 127.0.0.1`, another raylsm):
    this driver's node address must stay 127.0.0.1, or it waits on a GCS address nothing serves. Ray reads the
    setting at import; the Ray processes a local cluster starts inherit it."""
    address = os.environ.get("RAY_ADDRESS")
    if not address or _is_loopback_address(address):
        _keep_loopback_node_address()


def _keep_loopback_node_address() -> None:
    """Stop Ray swapping a 127.0.0.1 node address for the host's external one (multi-node support off).

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is first imported: the entry points import Ray
    only after this (``ensure_ray``); the Ray processes of a local cluster inherit it.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``[v6]:port``, ``ray://host:port``) names a loopback host."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "auto", a host name: not known to be loopback


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def start_ray_checking_store(tracking_uri: str) -> None:
    """:func:`ensure_ray` while the tracking store is checked in a thread (opening a new SQL store creates
    its tables: ~2 s), overlapping Ray's import; Ray starts once the store answered, so an unreachable
    store is one line on stderr, before Ray prints anything or anything is trained or recorded."""
    from concurrent.futures import ThreadPoolExecutor

    from raylsm.train.tracking import check_store

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylsm-store-check") as pool:
        store = pool.submit(check_store, tracking_uri)
        ensure_ray(before_start=store.result)  # TrackingError: one line naming --tracking-uri

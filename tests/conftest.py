"""Shared test fixtures: a small vocabulary and a seeded random collated batch factory."""

from __future__ import annotations

import os
from pathlib import Path

# Ray reads this when first imported: the local test clusters keep their node address on 127.0.0.1
# (as raylsm.train.cluster.ensure_ray does for `raylsm train`).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402
import torch

from raylsm.data.examples import example_batch
from raylsm.models.layers import Vocab
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

SMALL_VOCAB = Vocab(item=101, cate=21, ctx=6, gap=10, user=31, profile={"age": 5, "gender": 3})


def make_batch(
    b: int = 8,
    s: int = 6,
    l: int = 40,
    vocab: Vocab = SMALL_VOCAB,
    seed: int = 0,
    ll_lengths: list[int] | None = None,
    st_lengths: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """A collated batch (left-padded, masks) with random ids; row i has ``ll_lengths[i]`` real behaviours."""
    return example_batch(b, s, l, vocab, seed, ll_lengths=ll_lengths, st_lengths=st_lengths)


@pytest.fixture
def small_vocab() -> Vocab:
    return SMALL_VOCAB


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (docs/design.md, "Ray and MLflow notes": address='local', num_cpus=2)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # As ensure_ray's local cluster: no preemption watcher actor, workers polled every 0.5 s, no usage statistics.
    from raylsm.train.cluster import LOCAL_HEALTH_CHECK_INTERVAL_S

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_HEALTH_CHECK_INTERVAL_S)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Loopback only, as raylsm.train.cluster.ensure_ray: the node address stays 127.0.0.1 (set at the top of
    # this file, before any test imports Ray).
    before = ray_session_dirs()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    RAY_LOCAL_SESSION.extend(ray_session_dirs() - before)  # its logs (tests look for secrets there)
    yield ray
    ray.shutdown()


RAY_LOCAL_SESSION: list[Path] = []  # the session directory of the ``ray_local`` cluster, once it started


@pytest.fixture(scope="session")
def ray_local_session(ray_local) -> Path:
    """The session directory (Ray's logs) of the ``ray_local`` cluster."""
    assert len(RAY_LOCAL_SESSION) == 1, RAY_LOCAL_SESSION
    return RAY_LOCAL_SESSION[0]


def ray_session_dirs() -> set[Path]:
    """The session directories of the local Ray clusters started on this host so far (Ray's logs live there)."""
    import tempfile

    return set(Path(tempfile.gettempdir(), "ray").glob("session_2*"))


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The address a ``raylsm`` subprocess joins the session's local Ray at (RAY_ADDRESS), as a submitted job would."""
    return ray_local.get_runtime_context().gcs_address


# A small world (8 interests, one category each, few items) that tiny models learn in seconds;
# the default world of the generator needs far more rows.
SMALL_WORLD = {"interests": 8, "cates_per_interest": 1, "tgt_items": 200, "src_items": 800}


def small_world_dataset(out, rows: int, seed: int = 1, ll_len: int = 40, st_len: int = 10, users: int = 200, **extra):
    """Write a small-world synthetic dataset (contract v1) and return its directory."""
    from raylsm.data.synth import SynthConfig, generate_config

    cfg = SynthConfig(users=users, rows=rows, ll_len=ll_len, st_len=st_len, shards=2, seed=seed, **{**SMALL_WORLD, **extra})
    generate_config(out, cfg, progress=False)
    return out


# Ray's own warnings that it documents as safe to ignore when the CPU is overloaded; they log with a traceback
# (``logger.warning(..., exc_info=True)`` in Ray Train's autoscaling client) from inside Ray's actors.
RAY_BENIGN_WARNINGS = ("it's safe to ignore this error",)


def tracebacks_outside_ray_benign(stderr: str) -> list[str]:
    """Each traceback in ``stderr`` (the line that starts it, with the one before) except those that follow one of
    Ray's own overload warnings, which Ray itself documents as safe to ignore."""
    lines = stderr.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        before = "\n".join(lines[max(0, i - 3):i])
        if not any(w in before for w in RAY_BENIGN_WARNINGS):
            found.append("\n".join(lines[max(0, i - 1):i + 1]))
    return found


class OffMetaSpy(TorchDispatchMode):
    """Records every aten op whose output is a tensor off the meta device (e.g. a CPU ``arange``)."""

    def __init__(self):
        super().__init__()
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.offenders.append(str(func))
        return out


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory):
    """A ``raylsm train`` killed with SIGKILL, then started again under its name and stopped with SIGTERM, watched
    (processes, sockets) and shared by the security, signal and fault tests."""
    from tests.test_security import run_and_interrupt

    return run_and_interrupt(tmp_path_factory)


# Fixtures that start (or are) a Ray cluster: a test that asks for one is a `ray` test even without the mark,
# so `make test-fast` (-m "not ray") never starts Ray.
RAY_FIXTURES = {"ray_local", "ray_address", "ray_local_session", "interrupted_run", "cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)

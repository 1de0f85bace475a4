"""The checkpoint format: weights, optimizer, epoch and every rank's RNG state (``checkpoint.pt``) beside the
job, vocab and metrics (``job.json``); see ``docs/design.md``, "Checkpoint format".

Writing (:func:`save_checkpoint`), checked reading (:func:`read_meta`, :func:`load_checkpoint`: anything this
project did not write is one :class:`CheckpointError` line), rebuilding the model (:func:`model_from_checkpoint`)
and resuming (:func:`restore_checkpoint`, :func:`previous_metrics`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import threading

import numpy as np
import torch
from torch import Tensor, nn

from raylsm.config import from_dict
from raylsm.models.layers import Vocab
from raylsm.models.ctr import build_model
from raylsm.train.config import JobConfig, job_to_dict
from raylsm.train.step import seed_everything, unwrap
from raylsm.train.uri import redact_uri

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "job.json"


def rng_state() -> dict:
    """This process's random generators: torch (CPU and the current CUDA device), NumPy, Python's ``random``.

    Plain tensors, ints and tuples only, so that a checkpoint holding it loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def gather_rng_states() -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)  # the ranks of this run's own process group, in memory
    return states


def gather_train_state(model: nn.Module, optimizer) -> dict:
    """``{"model", "optimizer"}`` state dicts in the unsharded layout (a collective: every rank calls it).

    Row-sharded tables (``train.embedding_sharding = row``) and their row-wise Adam moments are assembled
    whole from every rank's shard, so the checkpoint is the one an unsharded run writes: it resumes on any
    number of workers and loads into a one-process model. Without sharded tables nothing is exchanged.
    """
    from raylsm.models.sharded_embedding import full_state_dict
    from raylsm.train.optim import whole_optimizer_state

    net = unwrap(model)
    return {"model": full_state_dict(net), "optimizer": whole_optimizer_state(net, optimizer)}


def save_checkpoint(directory: str, model: nn.Module, optimizer, epoch: int, job: JobConfig, vocab: Vocab, metrics: dict,
                    rng_states: list[dict] | None = None, mlflow_run_id: str | None = None,
                    train_state: dict | None = None) -> None:
    """Everything needed to resume or score: weights, optimizer, epoch, every rank's RNG, job config, vocab.

    ``train_state``: the model and optimizer states from :func:`gather_train_state`, which every rank must
    call when tables are row-sharded (rank 0 then writes); without it this process's own states are written.
    The job is stored with its tracking URI redacted: no credential is ever written to a checkpoint.
    """
    if train_state is None:
        train_state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
    state = {
        "model": train_state["model"],
        "optimizer": train_state["optimizer"],
        "epoch": epoch,
        "rng": rng_states if rng_states is not None else [rng_state()],
    }
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    job_dict = job_to_dict(job)
    job_dict["mlflow"]["tracking_uri"] = redact_uri(job_dict["mlflow"]["tracking_uri"])
    meta = {"job": job_dict, "vocab": vocab.__dict__, "epoch": epoch, "metrics": metrics,
            "mlflow_run_id": mlflow_run_id}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


MAX_VOCAB_ROWS = 2**31  # a table larger than this is no checkpoint this project wrote
MAX_META_BYTES = 16 * 2**20
META_KEYS = {"job", "vocab", "epoch", "metrics", "mlflow_run_id"}  # what save_checkpoint writes
_VOCAB_KEYS = ("item", "cate", "ctx", "gap", "user")


# Model keys added after checkpoints were first written, with the value a checkpoint without the key was
# trained with (its architecture): such a checkpoint keeps loading as the model it is.
KEYS_ADDED_SINCE = {"match_counts": False}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, not a raylsm checkpoint, or refuses to load; one line."""


def _vocab_count(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VOCAB_ROWS:
        raise CheckpointError(f"{where}: vocab.{key} must be an integer in [1, 2^31], got {str(value)[:40]}")
    return value


def read_meta(directory: str, option: str = "--checkpoint") -> dict:
    """The checked ``job.json`` of a checkpoint: a valid job config, a bounded vocab, an epoch; else CheckpointError."""
    from raylsm.config import ConfigError

    where = f"{option} {directory}: {META_FILE}"
    path = os.path.join(directory, META_FILE)
    try:
        if os.path.getsize(path) > MAX_META_BYTES:
            raise CheckpointError(f"{where}: larger than {MAX_META_BYTES >> 20} MiB")
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("job"), dict) or not isinstance(meta.get("vocab"), dict):
        raise CheckpointError(f"{where}: must be an object with 'job' and 'vocab' objects")
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0][:40]!r} (expected {', '.join(sorted(META_KEYS))})")
    vocab = meta["vocab"]
    if set(vocab) != {*_VOCAB_KEYS, "profile"} or not isinstance(vocab["profile"], dict):
        raise CheckpointError(f"{where}: vocab must have exactly {', '.join(_VOCAB_KEYS)} and a profile object")
    for key in _VOCAB_KEYS:
        _vocab_count(vocab[key], key, where)
    for key, value in vocab["profile"].items():
        _vocab_count(value, f"profile.{key}", where)
    epoch = meta.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(f"{where}: epoch must be an integer >= 0, got {str(epoch)[:40]}")
    model = meta["job"].get("model")
    if isinstance(model, dict):  # a checkpoint written before a model key existed was trained without it
        for key, value in KEYS_ADDED_SINCE.items():
            model.setdefault(key, value)
    try:
        meta["job"] = job_to_dict(from_dict(JobConfig, meta["job"]))  # parsed and checked, back to plain data
    except (ConfigError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{where}: job {(str(e).splitlines() or [type(e).__name__])[0][:160]}") from None
    return meta


def check_checkpoint(directory: str, option: str = "--checkpoint") -> dict:
    """A directory holding a raylsm checkpoint (``checkpoint.pt`` and a valid ``job.json``); returns the meta."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{option} {directory}: no such directory")
    if not os.path.isfile(os.path.join(directory, CHECKPOINT_FILE)):
        raise CheckpointError(f"{option} {directory}: not a raylsm checkpoint (no {CHECKPOINT_FILE})")
    if not os.path.isfile(os.path.join(directory, META_FILE)):
        raise CheckpointError(f"{option} {directory}: not a raylsm checkpoint (no {META_FILE})")
    return read_meta(directory, option)


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu",
                    option: str = "--checkpoint") -> tuple[dict, dict]:
    """(state, meta) of a checkpoint directory; the state loads with ``weights_only=True``.

    Anything that is not a checkpoint this project wrote (a pickle payload, a bad ``job.json``, a vocab
    beyond :data:`MAX_VOCAB_ROWS`) raises :class:`CheckpointError`, one line naming ``option``.
    """
    meta = check_checkpoint(directory, option)
    try:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for a pickle payload, RuntimeError for a corrupt archive, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{option} {directory}: {CHECKPOINT_FILE} refused by torch.load(weights_only=True) "
                              f"({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "epoch" not in state:
        raise CheckpointError(f"{option} {directory}: {CHECKPOINT_FILE} holds no model state and epoch")
    return state, meta


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def meta_tensors_skip_normal_init():
    """Within the block, ``torch.nn.init.normal_`` leaves a meta tensor as it is (it has no values to draw).

    On the meta device torch's ``normal_`` runs a Python decomposition that imports ``torch._dynamo`` on first
    use, about 2 s of a process's start (the driver logging a model, ``raylsm eval``). Tensors on any other
    device are drawn as always, so a model built elsewhere in the process meanwhile is unaffected.
    """
    real = torch.nn.init.normal_

    def normal_(tensor: Tensor, *args, **kwargs) -> Tensor:
        return tensor if tensor.is_meta else real(tensor, *args, **kwargs)

    with _INIT_LOCK:
        torch.nn.init.normal_ = normal_
        try:
            yield
        finally:
            torch.nn.init.normal_ = real


def model_from_checkpoint(directory: str, map_location: str | torch.device = "cpu",
                          option: str = "--checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint and load its weights.

    The model is first built on the meta device (no memory) and its tensor shapes compared with the
    weights, so a vocab the weights do not match is one line, never a huge allocation.
    """
    state, meta = load_checkpoint(directory, map_location, option)
    job = from_dict(JobConfig, meta["job"])
    vocab = Vocab(**meta["vocab"])
    weights = state["model"]
    with torch.random.fork_rng(devices=[]), torch.device("meta"), meta_tensors_skip_normal_init():
        expected = build_model(job.model, vocab).state_dict()
    for key, tensor in expected.items():
        got = weights.get(key)
        if not isinstance(got, Tensor):
            raise CheckpointError(f"{option} {directory}: {CHECKPOINT_FILE} lacks weight {key} of a {job.preset} model")
        if tuple(got.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{option} {directory}: weight {key} has shape {tuple(got.shape)} but the "
                                  f"{META_FILE} vocab and model ask for {tuple(tensor.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"{option} {directory}: {CHECKPOINT_FILE} has weight {extra[0]} that a {job.preset} model lacks")
    model = build_model(job.model, vocab)
    model.load_state_dict(weights)
    return model, meta


def restore_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                       world_size: int = 1, seed: int = 0) -> int:
    """Load weights, optimizer state and this rank's RNG state of a checkpoint; return the epoch to start at.

    A checkpoint written by as many ranks as now run restores each rank's generators exactly. With another
    number of ranks there is no exact continuation: each rank is seeded afresh from ``seed``, the rank and the
    epoch, and the run says so on stderr. A row-sharded table (and its optimizer moments) takes this rank's
    rows of the checkpoint's whole table.
    """
    from raylsm.train.optim import local_optimizer_state

    state, _ = load_checkpoint(directory, option="checkpoint")
    model.load_state_dict(state["model"])  # a sharded table's load hook keeps its own rows
    optimizer.load_state_dict(local_optimizer_state(unwrap(model), optimizer, state["optimizer"]))
    start = int(state["epoch"]) + 1
    states = state.get("rng") or [{"torch": state["torch_rng"], "cuda": None, "numpy": None, "python": None}]
    if len(states) == world_size:
        mine = states[rank]
        if mine.get("numpy") is None:  # a checkpoint of an older layout: the torch generator only
            torch.set_rng_state(mine["torch"])
        else:
            set_rng_state(mine)
    else:
        seed_everything(seed + rank + 100_003 * start)
        if rank == 0:
            print(f"raylsm: {directory} was written by {len(states)} worker(s), resumed on {world_size}: random "
                  f"generators seeded afresh (weights and optimizer restored exactly)", file=sys.stderr)
    return start


def previous_metrics(resume_dir: str | None) -> dict | None:
    """The metrics saved with the checkpoint a run resumes from (carries the early-stopping state)."""
    if not resume_dir or not os.path.isfile(os.path.join(resume_dir, META_FILE)):
        return None
    with open(os.path.join(resume_dir, META_FILE)) as f:
        return json.load(f).get("metrics")

"""The per-worker training function run by Ray Train's ``TorchTrainer``.

Each worker: build the model (``prepare_model`` wraps it in DDP and places it
on the worker's device), restore the latest checkpoint if Ray hands one over
(after a worker failure, or a re-run with the same name), then per epoch:
stream its shard of ``train`` -> BCE + Σ λ·aux -> Adam; evaluate its shard of
``test``; gather scores to every rank for exact AUC/GAUC/logloss over the whole
split; rank 0 writes the checkpoint and logs the epoch's metrics to MLflow;
every rank calls ``ray.train.report``.

The same epoch/eval code serves the in-process path (:func:`fit_local`,
no Ray) used by tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from raylsm.config import from_dict
from raylsm.data.collate import CollateSpec, iter_local_batches
from raylsm.models import build_model
from raylsm.models.layers import Vocab
from raylsm.train.config import JobConfig, job_to_dict
from raylsm.train.metrics import evaluate_arrays, gather_arrays
from raylsm.train.optim import build_optimizer  # noqa: F401 (re-exported)

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "job.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@dataclass
class EpochStats:
    train_loss: float
    crp_loss: float
    rows: int
    seconds: float


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, Tensor]],
    device: torch.device,
    max_steps: int = 0,
    bf16: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass: loss = BCE(logits, label) + Σ_name w_name · aux_name (LCN eq. 14)."""
    model.train()
    weights = unwrap(model).aux_weights
    loss_sum = torch.zeros((), device=device)
    crp_sum = torch.zeros((), device=device)
    rows = steps = 0
    start = time.perf_counter()
    for batch in batches:
        batch = to_device(batch, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits, aux = model(batch)
        # The loss in fp32, outside autocast (no-op casts when the model ran in fp32).
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"])  # Eq. (2)
        total = loss + sum((weights[k] * v.float() for k, v in aux.items()), torch.zeros((), device=device))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        n = batch["label"].shape[0]
        loss_sum += total.detach() * n  # accumulated on device: no host sync per step
        if "crp" in aux:
            crp_sum += aux["crp"].detach() * n
        rows += n
        steps += 1
        if on_step is not None:
            on_step(n)
        if max_steps and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    denom = max(rows, 1)
    return EpochStats(float(loss_sum) / denom, float(crp_sum) / denom, rows, seconds)


_NARROW_IDS = (torch.int8, torch.int16, torch.int32, torch.uint8)


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move a collated batch to ``device`` and widen narrow id tensors to int64 there.

    The pipeline ships ids in the narrowest dtype their vocabulary allows; the models index
    embeddings and hash ids in int64. Widening after the copy keeps the host-to-device transfer
    narrow; masks (bool) and labels (float32) pass as they are. Non-blocking from pinned memory.
    """
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        out[k] = v.long() if v.dtype in _NARROW_IDS else v
    return out


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device) -> dict[str, np.ndarray]:
    """Logits, labels and users of every row of ``batches``."""
    model.eval()
    logits, labels, users = [], [], []
    for batch in batches:
        batch = to_device(batch, device)
        out, _ = model(batch)
        logits.append(out.float())
        labels.append(batch["label"])
        users.append(batch["user_id"])
    if not logits:
        return {"logits": np.zeros(0, np.float32), "labels": np.zeros(0, np.float32), "users": np.zeros(0, np.int64)}
    return {  # one device-to-host copy per array, after the loop
        "logits": torch.cat(logits).cpu().numpy(),
        "labels": torch.cat(labels).cpu().numpy(),
        "users": torch.cat(users).cpu().numpy(),
    }


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


def save_checkpoint(directory: str, model: nn.Module, optimizer, epoch: int, job: JobConfig, vocab: Vocab, metrics: dict,
                    rng_states: list[dict] | None = None, mlflow_run_id: str | None = None) -> None:
    """Everything needed to resume or score: weights, optimizer, epoch, every rank's RNG, job config, vocab.

    The job is stored with its tracking URI redacted: no credential is ever written to a checkpoint.
    """
    from raylsm.train.tracking import redact_uri

    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
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
_VOCAB_KEYS = ("item", "cate", "ctx", "gap", "user")


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
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
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
    epoch, and the run says so on stderr.
    """
    state, _ = load_checkpoint(directory, option="checkpoint")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
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


def _meta_batch(b: int, st_len: int, ll_len: int, profile_fields: int) -> dict[str, Tensor]:
    """A collated batch (see ``raylsm.data.collate``) of shape-only tensors on the meta device."""
    def ids(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.int64, device="meta")

    def mask(*shape: int) -> Tensor:
        return torch.ones(shape, dtype=torch.bool, device="meta")

    batch = {"user_id": ids(b), "item_id": ids(b), "item_cate": ids(b), "profile": ids(b, profile_fields),
             "label": torch.zeros(b, device="meta")}
    for name in ("st_tgt", "st_src"):
        batch.update({f"{name}_items": ids(b, st_len), f"{name}_cates": ids(b, st_len), f"{name}_mask": mask(b, st_len)})
    batch.update(ll_items=ids(b, ll_len), ll_cates=ids(b, ll_len), ll_ctx=ids(b, ll_len), ll_gap=ids(b, ll_len),
                 ll_mask=mask(b, ll_len))
    return batch


def unused_parameters(job: JobConfig, vocab: Vocab) -> list[str]:
    """Names of the parameters that the model of ``job`` never uses to compute its loss.

    Found with one forward and backward of a copy of the model on the meta device (no memory, no
    random numbers drawn): where that runs, the graph cannot depend on the data's values, so the set is
    the same for every batch. DDP needs ``find_unused_parameters=True`` exactly when it is not empty
    (it otherwise stops at the second step waiting for their gradients); the flag costs a graph walk
    per step, so it is only paid then. A model whose forward does not run on meta counts as having
    unused parameters (safe, slower).
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        probe = build_model(job.model, vocab)
    probe.train()
    try:
        logits, aux = probe(_meta_batch(2, job.data.st_len, job.data.ll_len, len(vocab.profile)))
        loss = logits.float().sum() + sum((v.float().sum() for v in aux.values()), torch.zeros((), device="meta"))
        loss.backward()
    except Exception:  # data-dependent control flow: cannot tell from shapes alone
        return [name for name, _ in probe.named_parameters()]
    return [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]


# ----------------------------------------------------------------------------- Ray Train worker


def _torch_batches(shard, batch_size: int, device: torch.device, shuffle_buffer: int = 0, seed: int | None = None,
                   prefetch: int = 2, pin_memory: bool = True, first_batch_file: str | None = None) -> Iterator:
    """Batches of a Ray Data shard as tensors on ``device``.

    Rows arrive collated and already shuffled by the read tasks (``raylsm.data.pipeline``), so
    the consumer only slices blocks into batches and hands them over; ``prefetch`` batches are
    prepared ahead in Ray's background thread, in pinned memory when the device is CUDA (so the
    host-to-device copy is asynchronous). ``shuffle_buffer`` > 0 adds Ray's local shuffle buffer
    (a copy of every row in this process: only for extra mixing across shards).
    """
    kwargs = {}
    if shuffle_buffer:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    batches = shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=False, prefetch_batches=prefetch,
                                       pin_memory=pin_memory and device.type == "cuda", **kwargs)
    return _mark_first_batch(batches, first_batch_file) if first_batch_file else batches


# `raylsm bench startup`: where to note when the first batch arrives. The driver reads it and passes it in
# the train loop's config, so it reaches the workers on an already running cluster too (whose worker
# processes do not inherit the driver's environment).
_FIRST_BATCH_FILE = "RAYLSM_FIRST_BATCH_FILE"


def _mark_first_batch(batches: Iterable, path: str) -> Iterator:
    """Pass ``batches`` through; write the wall-clock time the first one arrived to ``path`` (once)."""
    first = True
    for batch in batches:
        if first:
            first = False
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(repr(time.time()))
        yield batch


class _FirstFetched:
    """Iterate ``batches``, its first item already being fetched in a background thread.

    The worker starts its first epoch's data stream before it builds the model, loads the MLflow
    logger and starts the system-metrics monitor, so Ray Data's split coordinator and read tasks
    start while the worker sets up (they otherwise start at the first ``next``). The items and
    their order are the iterator's own; an error raised while fetching is raised on iteration.
    """

    def __init__(self, batches: Iterable):
        self._it = iter(batches)
        self._first: tuple = ()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="raylsm-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = (next(self._it),)
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the consuming thread
            self._error = e

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._it


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` = {"job": JobConfig dict, "vocab": Vocab dict, "mlflow_run_id", "tracking_uri"}."""
    import ray.train
    import ray.train.torch

    job = from_dict(JobConfig, config["job"])
    vocab = Vocab(**config["vocab"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    seed_everything(job.train.seed + rank)
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return _torch_batches(train_shard, job.train.batch_size, device, job.train.shuffle_buffer, job.train.seed + epoch,
                              job.train.prefetch_batches, job.train.pin_memory, config.get("first_batch_file"))

    checkpoint = ray.train.get_checkpoint()
    # A fresh run starts its first epoch's stream now, so the data arrives while the model is built.
    first_epoch = _FirstFetched(epoch_batches(0)) if checkpoint is None and not job.resume_from and job.train.epochs > 0 else None

    model = build_model(job.model, vocab)
    if job.train.compile:
        model.compile()  # in place: the module, its state_dict keys and DDP wrapping stay as they are
    optimizer = build_optimizer(model, job.train.lr, job.train.fused_adam, job.train.embedding_update)
    start_epoch = 0
    resume_dir = None
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory()
    elif job.resume_from:
        resume_dir = job.resume_from
    if resume_dir is not None:
        start_epoch = restore_checkpoint(resume_dir, model, optimizer, rank, ctx.get_world_size(), job.train.seed)
    # DDP needs to know when the forward leaves parameters without a gradient (din, sdim: the ctx/gap tables).
    unused = unused_parameters(job, vocab) if ctx.get_world_size() > 1 else []
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True} if unused else None)
    # Adam's state tensors were loaded on CPU; move them next to the parameters (the fused kernel keeps
    # its step counters there too; the per-parameter loop wants them on the CPU).
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and (k != "step" or job.train.fused_adam):
                st[k] = v.to(device)

    logger = _rank_zero_logger(config) if rank == 0 else None
    if logger is not None and checkpoint is not None:
        # Restarted after a failure: the epoch of the checkpoint may have been lost with its worker between
        # the checkpoint being registered and its metrics being logged; log them from the checkpoint.
        logger.log_if_missing(resume_dir)
    monitor = _system_metrics(config) if rank == 0 else None
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    test_shard = ray.train.get_dataset_shard("test")
    selection = EarlyStopping(job.train.early_stop_patience, _previous_metrics(resume_dir))
    for epoch in range(start_epoch, job.train.epochs):
        with tqdm(desc=f"epoch {epoch}", unit=" rows", disable=rank != 0, file=sys.stderr, mininterval=10) as bar:
            stats = train_epoch(
                model,
                optimizer,
                first_epoch if epoch == 0 and first_epoch is not None else epoch_batches(epoch),
                device,
                max_steps=job.train.max_steps_per_epoch,
                bf16=job.train.bf16,
                on_step=bar.update,
            )
        metrics: dict = {}
        for prefix, shard in (("val", val_shard), ("test", test_shard)):
            if shard is None:
                continue
            preds = gather_arrays(predict(model, _torch_batches(shard, job.train.eval_batch_size, device,
                                                                prefetch=job.train.prefetch_batches), device))
            metrics.update({f"{prefix}_{k}": v for k, v in evaluate_arrays(preds["labels"], preds["logits"], preds["users"]).items()})
        rows, seconds = _global_throughput(stats.rows, stats.seconds, device)
        metrics.update(
            epoch=epoch,
            train_loss=stats.train_loss,
            crp_loss=stats.crp_loss,
            samples_per_s=rows / max(seconds, 1e-9),
            train_rows=rows,
        )
        stop = selection.update(metrics)  # adds best_val_auc / epochs_since_best; same on every rank
        rngs = gather_rng_states()
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, optimizer, epoch, job, vocab, metrics, rngs, config.get("mlflow_run_id"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        # Logged once the epoch's checkpoint is persisted: an epoch lost with its worker before that is re-run
        # from the previous checkpoint and logged once. (A loss in the short window between persisting and the
        # controller registering the checkpoint re-runs the epoch; MLflow then holds both, same step.)
        if logger is not None:
            logger(metrics, epoch)
        if stop:
            if rank == 0:
                print(f"early stop after epoch {epoch}: no better val_auc for {job.train.early_stop_patience} epochs", file=sys.stderr)
            break
    if logger is not None:
        logger.finish()
    if monitor is not None:
        monitor.finish()


def _system_metrics(config: dict):
    """CPU/memory/GPU of rank 0's node into the run (MLflow's system metrics monitor)."""
    if not config.get("mlflow_run_id"):
        return None
    from raylsm.train.tracking import start_system_metrics

    return start_system_metrics(config["tracking_uri"], config["mlflow_run_id"])


class EarlyStopping:
    """Tracks the best validation AUC; ``update`` says when ``patience`` epochs passed without a better one.

    Metrics are gathered over all ranks before this runs, so every rank takes the same decision.
    """

    def __init__(self, patience: int, previous: dict | None = None):
        self.patience = patience
        previous = previous or {}
        self.best = float(previous.get("best_val_auc", float("-inf")))
        self.since = int(previous.get("epochs_since_best", 0))

    def update(self, metrics: dict) -> bool:
        val = metrics.get("val_auc")
        if val is None:
            return False
        if val == val and val > self.best:  # NaN never counts as better
            self.best, self.since = float(val), 0
        else:
            self.since += 1
        metrics["best_val_auc"] = self.best
        metrics["epochs_since_best"] = self.since
        return bool(self.patience) and self.since >= self.patience


def _previous_metrics(resume_dir: str | None) -> dict | None:
    """The metrics saved with the checkpoint a run resumes from (carries the early-stopping state)."""
    if not resume_dir or not os.path.isfile(os.path.join(resume_dir, META_FILE)):
        return None
    with open(os.path.join(resume_dir, META_FILE)) as f:
        return json.load(f).get("metrics")


def _global_throughput(rows: int, seconds: float, device: torch.device) -> tuple[int, float]:
    """Rows summed over workers, time = the slowest worker (tensors on ``device``: NCCL needs CUDA tensors)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rows, seconds
    rows_t = torch.tensor([float(rows)], dtype=torch.float64, device=device)
    secs_t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(rows_t, op=dist.ReduceOp.SUM)
    dist.all_reduce(secs_t, op=dist.ReduceOp.MAX)
    return int(rows_t.item()), float(secs_t.item())


class EpochLogger:
    """Per-epoch metrics into the driver-created MLflow run (DESIGN §5: rank 0 only), never stopping training.

    An epoch whose metrics the store does not take (unreachable, read-only, ...) is kept, with the time it
    was measured, and the outage is reported in one line on stderr; each later epoch first logs what is
    kept, so the record is whole again once the store is back. :meth:`finish` tries a few more times and
    names, in one line, the epochs that could not be logged (their metrics stay in the checkpoints' job.json).
    """

    def __init__(self, tracking_uri: str, run_id: str, finish_attempts: int = 3, finish_wait_s: float = 2.0):
        from raylsm.train.tracking import redact_uri

        self.uri, self.run_id = tracking_uri, run_id
        self.shown_uri = redact_uri(tracking_uri)
        self.finish_attempts, self.finish_wait_s = finish_attempts, finish_wait_s
        self.pending: list[tuple[int, dict, int]] = []  # (epoch, metrics, measured at ms)
        self.failing: str | None = None  # the first line of the current outage's error
        # One quick try per epoch against an HTTP store: MLflow's default retries would hold up training for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def __call__(self, metrics: dict, epoch: int) -> None:
        self.pending.append((epoch, dict(metrics), int(time.time() * 1000)))
        self._flush()

    def _flush(self) -> bool:
        from raylsm.train.tracking import log_epoch_metrics

        while self.pending:
            epoch, metrics, at_ms = self.pending[0]
            try:
                log_epoch_metrics(self.uri, self.run_id, metrics, epoch, timestamp_ms=at_ms)
            except Exception as e:  # any store failure: keep the metrics, keep training
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                if self.failing is None:
                    print(f"raylsm: MLflow store {self.shown_uri} unreachable ({reason}); metrics of epoch(s) "
                          f"{self.epochs()} kept to log when it is back", file=sys.stderr, flush=True)
                self.failing = reason
                return False
            self.pending.pop(0)
        if self.failing is not None:
            print(f"raylsm: MLflow store {self.shown_uri} reachable again; kept metrics logged", file=sys.stderr, flush=True)
            self.failing = None
        return True

    def log_if_missing(self, checkpoint_dir: str) -> bool:
        """Log a checkpoint's epoch metrics when this run wrote it but the store lacks that epoch; True if logged."""
        path = os.path.join(checkpoint_dir, META_FILE)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            meta = json.load(f)
        if meta.get("mlflow_run_id") != self.run_id or not meta.get("metrics"):
            return False
        try:
            from raylsm.train.tracking import client

            logged = {m.step for m in client(self.uri).get_metric_history(self.run_id, "train_loss")}
        except Exception:  # store unreachable: the epoch goes to the pending list below and is retried
            logged = set()
        epoch = int(meta["epoch"])
        if epoch in logged:
            return False
        self(meta["metrics"], epoch)
        return True

    def epochs(self) -> list[int]:
        return [epoch for epoch, _, _ in self.pending]

    def finish(self) -> list[int]:
        """Last attempts at what is kept; returns (and names in one line) the epochs still not logged."""
        for attempt in range(self.finish_attempts):
            if self._flush():
                return []
            if attempt + 1 < self.finish_attempts:
                time.sleep(self.finish_wait_s)
        print(f"raylsm: metrics of epoch(s) {self.epochs()} could not be logged to MLflow run {self.run_id} at "
              f"{self.shown_uri} ({self.failing}); they are in the checkpoints' job.json", file=sys.stderr, flush=True)
        return self.epochs()


def _rank_zero_logger(config: dict) -> EpochLogger | None:
    """Per-epoch metrics into the driver-created MLflow run (DESIGN §5: rank 0 only); None when not tracked."""
    run_id = config.get("mlflow_run_id")
    if not run_id:
        return None
    return EpochLogger(config["tracking_uri"], run_id)


# ----------------------------------------------------------------------------- in-process path


def fit_local(job: JobConfig, vocab: Vocab, progress: bool = False) -> tuple[nn.Module, list[dict]]:
    """Train and evaluate in this process (no Ray): the reference loop for tests, screens and benchmarks.

    The same model selection as a Ray run: rows are split by :func:`~raylsm.data.splits.plan_splits`
    (the manifest's ``val`` split, else the latest ``data.val_fraction`` of train by time); every epoch is
    evaluated on validation (``val_*``) and test (``auc``, ``gauc``, ``logloss``);
    ``train.early_stop_patience`` stops after that many epochs without a better validation AUC; the
    returned model holds the weights of the validation-chosen epoch (the last one without a validation
    split), which :func:`chosen_epoch` picks from the history.
    """
    from raylsm.data.contract import read_manifest
    from raylsm.data.splits import plan_splits

    seed_everything(job.train.seed)
    manifest = read_manifest(job.data.path)
    plan = plan_splits(job.data.path, manifest, job.data.val_fraction)
    spec = CollateSpec(job.data.st_len, job.data.ll_len, tuple(manifest.profile_fields))
    device = torch.device("cuda" if job.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(job.model, vocab).to(device)
    if job.train.compile:
        model.compile()
    optimizer = build_optimizer(model, job.train.lr, job.train.fused_adam, job.train.embedding_update)

    def batches(source, size: int, seed: int | None) -> Iterator[dict[str, Tensor]]:
        for b in iter_local_batches(job.data.path, source.split, spec, size, shuffle_seed=seed,
                                    ts_range=source.ts_range):
            yield {k: torch.from_numpy(v) for k, v in b.items()}

    def scores(source) -> dict:
        preds = predict(model, batches(source, job.train.eval_batch_size, None), device)
        return evaluate_arrays(preds["labels"], preds["logits"], preds["users"])

    history: list[dict] = []
    stopper = EarlyStopping(job.train.early_stop_patience)
    best_state: dict | None = None
    for epoch in range(job.train.epochs):
        stats = train_epoch(model, optimizer, batches(plan.train, job.train.batch_size, job.train.seed + epoch),
                            device, max_steps=job.train.max_steps_per_epoch, bf16=job.train.bf16)
        metrics = scores(plan.test)
        if plan.val is not None:
            metrics.update({f"val_{k}": v for k, v in scores(plan.val).items()})
        metrics.update(epoch=epoch, train_loss=stats.train_loss, crp_loss=stats.crp_loss,
                       samples_per_s=stats.rows / max(stats.seconds, 1e-9), train_rows=stats.rows)
        stop = stopper.update(metrics)
        if plan.val is not None and metrics["epochs_since_best"] == 0:
            best_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        history.append(metrics)
        if progress:
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}), file=sys.stderr)
        if stop:
            break
    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    return model, history


def chosen_epoch(history: list[dict]) -> dict:
    """The epoch a run reports: the best validation AUC (the earliest of ties), else the last epoch."""
    scored = [h for h in history if "val_auc" in h and h["val_auc"] == h["val_auc"]]
    if not scored:
        return history[-1]
    return max(scored, key=lambda h: (h["val_auc"], -h["epoch"]))

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
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits, aux = model(batch)
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"].float())  # Eq. (2)
            total = loss + sum((weights[k] * v for k, v in aux.items()), torch.zeros((), device=device))
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


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device) -> dict[str, np.ndarray]:
    """Logits, labels and users of every row of ``batches``."""
    model.eval()
    logits, labels, users = [], [], []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
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


def save_checkpoint(directory: str, model: nn.Module, optimizer, epoch: int, job: JobConfig, vocab: Vocab, metrics: dict) -> None:
    """Everything needed to resume or score: weights, optimizer, epoch, RNG, job config, vocab."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    meta = {"job": job_to_dict(job), "vocab": vocab.__dict__, "epoch": epoch, "metrics": metrics}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(state, meta) of a checkpoint directory; the state loads with ``weights_only=True``."""
    path = os.path.join(directory, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: not a raylsm checkpoint (no {CHECKPOINT_FILE})")
    state = torch.load(path, map_location=map_location, weights_only=True)
    with open(os.path.join(directory, META_FILE)) as f:
        meta = json.load(f)
    return state, meta


def model_from_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint and load its weights."""
    state, meta = load_checkpoint(directory, map_location)
    job = from_dict(JobConfig, meta["job"])
    model = build_model(job.model, Vocab(**meta["vocab"]))
    model.load_state_dict(state["model"])
    return model, meta


# ----------------------------------------------------------------------------- Ray Train worker


def _torch_batches(shard, batch_size: int, device: torch.device, shuffle_buffer: int = 0, seed: int | None = None) -> Iterator:
    kwargs = {}
    if shuffle_buffer:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    return shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=False, **kwargs)


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

    model = build_model(job.model, vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.train.lr)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory()
    elif job.resume_from:
        resume_dir = job.resume_from
    if resume_dir is not None:
        state, _ = load_checkpoint(resume_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
    model = ray.train.torch.prepare_model(model)
    # Adam's state tensors were loaded on CPU; move them next to the parameters.
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and k != "step":
                st[k] = v.to(device)

    logger = _rank_zero_logger(config) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    for epoch in range(start_epoch, job.train.epochs):
        with tqdm(desc=f"epoch {epoch}", unit=" rows", disable=rank != 0, file=sys.stderr, mininterval=10) as bar:
            stats = train_epoch(
                model,
                optimizer,
                _torch_batches(train_shard, job.train.batch_size, device, job.train.shuffle_buffer, job.train.seed + epoch),
                device,
                max_steps=job.train.max_steps_per_epoch,
                bf16=job.train.bf16,
                on_step=bar.update,
            )
        preds = gather_arrays(predict(model, _torch_batches(test_shard, job.train.eval_batch_size, device), device))
        metrics = evaluate_arrays(preds["labels"], preds["logits"], preds["users"])
        rows, seconds = _global_throughput(stats.rows, stats.seconds, device)
        metrics.update(
            epoch=epoch,
            train_loss=stats.train_loss,
            crp_loss=stats.crp_loss,
            samples_per_s=rows / max(seconds, 1e-9),
            train_rows=rows,
        )
        if logger is not None:
            logger(metrics, epoch)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, optimizer, epoch, job, vocab, metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


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


def _rank_zero_logger(config: dict) -> Callable[[dict, int], None] | None:
    """Per-epoch metrics into the driver-created MLflow run (DESIGN §5: rank 0 only)."""
    run_id = config.get("mlflow_run_id")
    if not run_id:
        return None
    from raylsm.train.tracking import log_epoch_metrics

    def log(metrics: dict, epoch: int) -> None:
        log_epoch_metrics(config["tracking_uri"], run_id, metrics, epoch)

    return log


# ----------------------------------------------------------------------------- in-process path


def fit_local(job: JobConfig, vocab: Vocab, progress: bool = False) -> tuple[nn.Module, list[dict]]:
    """Train and evaluate in this process (no Ray): the reference loop for tests and benchmarks."""
    from raylsm.data.contract import read_manifest

    seed_everything(job.train.seed)
    manifest = read_manifest(job.data.path)
    spec = CollateSpec(job.data.st_len, job.data.ll_len, tuple(manifest.profile_fields))
    device = torch.device("cuda" if job.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(job.model, vocab).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.train.lr)

    def batches(split: str, size: int, seed: int | None) -> Iterator[dict[str, Tensor]]:
        for b in iter_local_batches(job.data.path, split, spec, size, shuffle_seed=seed):
            yield {k: torch.from_numpy(v) for k, v in b.items()}

    history = []
    for epoch in range(job.train.epochs):
        stats = train_epoch(model, optimizer, batches("train", job.train.batch_size, job.train.seed + epoch), device,
                            max_steps=job.train.max_steps_per_epoch, bf16=job.train.bf16)
        preds = predict(model, batches("test", job.train.eval_batch_size, None), device)
        metrics = evaluate_arrays(preds["labels"], preds["logits"], preds["users"])
        metrics.update(epoch=epoch, train_loss=stats.train_loss, crp_loss=stats.crp_loss,
                       samples_per_s=stats.rows / max(stats.seconds, 1e-9), train_rows=stats.rows)
        history.append(metrics)
        if progress:
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}), file=sys.stderr)
    return model, history

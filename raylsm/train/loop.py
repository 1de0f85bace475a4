"""The per-worker training function run by Ray Train's ``TorchTrainer``.

Each worker: build the model (with ``train.embedding_sharding = row`` on 2+
workers the item table is built as this worker's row shard, which DDP leaves
out; ``prepare_model`` wraps it in DDP and places it on the worker's device),
restore the latest checkpoint if Ray hands one over (after a worker failure,
or a re-run with the same name), then per epoch: stream its shard of
``train`` -> BCE + Σ λ·aux -> Adam; evaluate its shard of ``test``; gather
scores to every rank for exact AUC/GAUC/logloss over the whole split; every
rank helps assemble the sharded tables whole, rank 0 writes the checkpoint
and logs the epoch's metrics to MLflow; every rank calls ``ray.train.report``.

The same epoch/eval code serves the in-process path (:func:`fit_local`,
no Ray) used by tests and benchmarks.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from torch import Tensor
from tqdm import tqdm

from raylsm.config import from_dict
from raylsm.models.layers import Vocab
from raylsm.models.ctr import build_model
from raylsm.models.sharded_embedding import build_sharded_model, local_fraction
from raylsm.train.batches import FirstFetched, torch_batches
from raylsm.train.checkpoint import (gather_rng_states, gather_train_state, previous_metrics, restore_checkpoint,
                                    save_checkpoint)
from raylsm.train.config import JobConfig
from raylsm.train.epoch_log import rank_zero_logger, system_metrics
from raylsm.train.metrics import evaluate_arrays, gather_arrays
from raylsm.train.optim import build_optimizer
from raylsm.train.step import (BestState, EarlyStopping, decay_lr, epoch_limit, predict, resume_plateau, seed_everything,
                               train_epoch, unused_parameters, unwrap)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` = {"job": JobConfig, "vocab": Vocab, "mlflow_run_id", "tracking_uri", ...}."""
    import ray.train
    import ray.train.torch

    os.environ.update(config.get("secret_env") or {})  # the credentialed tracking URI, for real_uri (never on disk)
    job, vocab = config["job"], config["vocab"]  # the driver's typed job and vocab (a dict of either: built here)
    job = job if isinstance(job, JobConfig) else from_dict(JobConfig, job)
    vocab = vocab if isinstance(vocab, Vocab) else Vocab(**vocab)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    seed_everything(job.train.seed + rank)
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return torch_batches(train_shard, job.train.batch_size, device, job.train.shuffle_buffer, job.train.seed + epoch,
                              job.train.prefetch_batches, job.train.pin_memory, config.get("first_batch_file"))

    checkpoint = ray.train.get_checkpoint()
    # A fresh run starts its first epoch's stream now, so the data arrives while the model is built.
    first_epoch = FirstFetched(epoch_batches(0)) if checkpoint is None and not job.resume_from and job.train.epochs > 0 else None

    world = ctx.get_world_size()
    sharded = job.train.embedding_sharding == "row" and world > 1
    if sharded:  # this rank's rows of the item table (and of any large one) only; DDP leaves them out
        model, _ = build_sharded_model(job.model, vocab, world, rank)
    else:
        model = build_model(job.model, vocab)
    if job.train.compile:
        model.compile()  # in place: the module, its state_dict keys and DDP wrapping stay as they are
    optimizer = build_optimizer(model, job.train.lr, job.train.fused_adam, job.train.embedding_update,
                                job.train.weight_decay)
    start_epoch = 0
    resume_dir = None
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory()
    elif job.resume_from:
        resume_dir = job.resume_from
    if resume_dir is not None:
        start_epoch = restore_checkpoint(resume_dir, model, optimizer, rank, world, job.train.seed)
    # DDP needs to know when the forward leaves parameters without a gradient (din, sdim: the ctx/gap tables).
    unused = unused_parameters(job, vocab) if world > 1 else []
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True} if unused else None)
    # Adam's state tensors were loaded on CPU; move them next to the parameters (the fused kernel keeps
    # its step counters there too; the per-parameter loop wants them on the CPU).
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and (k != "step" or job.train.fused_adam):
                st[k] = v.to(device)

    logger = rank_zero_logger(config) if rank == 0 else None
    if logger is not None and checkpoint is not None:
        # Restarted after a failure: the epoch of the checkpoint may have been lost with its worker between
        # the checkpoint being registered and its metrics being logged; log them from the checkpoint.
        logger.log_if_missing(resume_dir)
    monitor = system_metrics(config) if rank == 0 else None
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    test_shard = ray.train.get_dataset_shard("test")
    previous = previous_metrics(resume_dir)  # the resumed checkpoint's metrics (None for a fresh run)
    selection = EarlyStopping(job.train.early_stop_patience, previous)
    # train.on_plateau=rollback: the best epoch's state in memory (a resumed run's, when its checkpoint is the best).
    best = BestState(True, job.train.plateau_lr_factor) if job.train.on_plateau == "rollback" else None
    if best is not None and resume_dir is not None and selection.since == 0 and selection.best > float("-inf"):
        best.keep(unwrap(model), optimizer)
    # The rollback a resumed checkpoint's epoch left pending (train.on_plateau=rollback), with its fine-tune epoch.
    epochs, what = resume_plateau(best, job.train, start_epoch, previous, unwrap(model), optimizer)
    if what and rank == 0:
        print(f"resumed after epoch {start_epoch - 1} (no better val_auc): {what}", file=sys.stderr)
    epoch = start_epoch
    while epoch < epochs:
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains at (lr_decay and rollbacks included)
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
        decay_lr(optimizer, job.train.lr_decay)
        metrics: dict = {}
        for prefix, shard in (("val", val_shard), ("test", test_shard)):
            if shard is None:
                continue
            preds = gather_arrays(predict(model, torch_batches(shard, job.train.eval_batch_size, device,
                                                                prefetch=job.train.prefetch_batches), device))
            metrics.update({f"{prefix}_{k}": v for k, v in evaluate_arrays(preds["labels"], preds["logits"], preds["users"]).items()})
        rows, seconds = _global_throughput(stats.rows, stats.seconds, device)
        metrics.update(
            epoch=epoch,
            train_loss=stats.train_loss,
            crp_loss=stats.crp_loss,
            samples_per_s=rows / max(seconds, 1e-9),
            train_rows=rows,
            lr=lr,
        )
        if job.train.embedding_sharding == "row":  # the largest share of the item rows a worker's own tensor holds
            metrics["item_rows_fraction"] = _max_over_workers(local_fraction(unwrap(model)), device)
        stop = selection.update(metrics)  # adds best_val_auc / epochs_since_best; same on every rank
        rngs = gather_rng_states()
        state = gather_train_state(model, optimizer) if sharded else None  # whole tables: every rank takes part
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, optimizer, epoch, job, vocab, metrics, rngs, config.get("mlflow_run_id"),
                                train_state=state)
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
        what = best.after_epoch(unwrap(model), optimizer, metrics) if best is not None else None
        if what and rank == 0:
            print(f"epoch {epoch}: no better val_auc; {what}", file=sys.stderr)
        epochs = epoch_limit(job.train, epoch, epochs, what is not None)  # train.rollback_finetune
        epoch += 1
    if logger is not None:
        logger.finish()
    if monitor is not None:
        monitor.finish()


def _max_over_workers(value: float, device: torch.device) -> float:
    """The largest of every worker's ``value`` (its own; one all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


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

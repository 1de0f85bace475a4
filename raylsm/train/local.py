"""The in-process loop (no Ray): the reference for tests, screens and benchmarks, with the same model
selection as a Ray run."""

from __future__ import annotations

import json
import sys
from typing import Iterator

import torch
from torch import Tensor, nn

from raylsm.data.collate import collate_spec, iter_local_batches
from raylsm.data.contract import read_manifest
from raylsm.data.splits import plan_splits
from raylsm.models.layers import Vocab
from raylsm.models.ctr import build_model
from raylsm.train.config import JobConfig
from raylsm.train.metrics import evaluate_arrays
from raylsm.train.optim import build_optimizer
from raylsm.train.step import (BestState, EarlyStopping, decay_lr, epoch_limit, predict, seed_everything, train_epoch,
                               unwrap)


def fit_local(job: JobConfig, vocab: Vocab, progress: bool = False) -> tuple[nn.Module, list[dict]]:
    """Train and evaluate in this process (no Ray): the reference loop for tests, screens and benchmarks.

    The same model selection as a Ray run: rows are split by :func:`~raylsm.data.splits.plan_splits`
    (the manifest's ``val`` split, else the latest ``data.val_fraction`` of train by time); every epoch is
    evaluated on validation (``val_*``) and test (``auc``, ``gauc``, ``logloss``);
    ``train.early_stop_patience`` stops after that many epochs without a better validation AUC; the
    returned model holds the weights of the validation-chosen epoch (the last one without a validation
    split), which :func:`chosen_epoch` picks from the history.
    """
    seed_everything(job.train.seed)
    manifest = read_manifest(job.data.path)
    plan = plan_splits(job.data.path, manifest, job.data.val_fraction)
    spec = collate_spec(job.data, manifest)
    device = torch.device("cuda" if job.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(job.model, vocab).to(device)
    if job.train.compile:
        model.compile()
    optimizer = build_optimizer(model, job.train.lr, job.train.fused_adam, job.train.embedding_update,
                                job.train.weight_decay)

    def batches(source, size: int, seed: int | None) -> Iterator[dict[str, Tensor]]:
        for b in iter_local_batches(job.data.path, source.split, spec, size, shuffle_seed=seed,
                                    ts_range=source.ts_range):
            yield {k: torch.from_numpy(v) for k, v in b.items()}

    def scores(source) -> dict:
        preds = predict(model, batches(source, job.train.eval_batch_size, None), device)
        return evaluate_arrays(preds["labels"], preds["logits"], preds["users"])

    history: list[dict] = []
    stopper = EarlyStopping(job.train.early_stop_patience)
    best = BestState(job.train.on_plateau == "rollback", job.train.plateau_lr_factor)
    epoch, epochs = 0, job.train.epochs
    while epoch < epochs:
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
        stats = train_epoch(model, optimizer, batches(plan.train, job.train.batch_size, job.train.seed + epoch),
                            device, max_steps=job.train.max_steps_per_epoch, bf16=job.train.bf16)
        decay_lr(optimizer, job.train.lr_decay)
        metrics = scores(plan.test)
        if plan.val is not None:
            metrics.update({f"val_{k}": v for k, v in scores(plan.val).items()})
        metrics.update(epoch=epoch, train_loss=stats.train_loss, crp_loss=stats.crp_loss,
                       samples_per_s=stats.rows / max(stats.seconds, 1e-9), train_rows=stats.rows, lr=lr)
        stop = stopper.update(metrics)
        history.append(metrics)
        if progress:
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}), file=sys.stderr)
        if stop:
            break
        what = best.after_epoch(unwrap(model), optimizer, metrics)  # train.on_plateau=rollback
        if what and progress:
            print(f"epoch {epoch}: no better val_auc; {what}", file=sys.stderr)
        epochs = epoch_limit(job.train, epoch, epochs, what is not None)  # train.rollback_finetune
        epoch += 1
    if plan.val is not None and metrics["epochs_since_best"] > 0 and best.best is not None:
        unwrap(model).load_state_dict(best.best[0])
    return model, history


def chosen_epoch(history: list[dict]) -> dict:
    """The epoch a run reports: the best validation AUC (the earliest of ties), else the last epoch."""
    scored = [h for h in history if "val_auc" in h and h["val_auc"] == h["val_auc"]]
    if not scored:
        return history[-1]
    return max(scored, key=lambda h: (h["val_auc"], -h["epoch"]))

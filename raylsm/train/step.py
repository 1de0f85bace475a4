"""One epoch of training and one pass of scoring, shared by the Ray worker and the in-process loop.

:func:`train_epoch` (BCE + the model's weighted auxiliary losses, LCN eq. 14), :func:`predict`,
:func:`to_device` (narrow ids widened on the device), :class:`EarlyStopping` (validation-AUC patience)
and :func:`unused_parameters` (the DDP probe on the meta device).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raylsm.data.examples import example_batch
from raylsm.models.layers import Vocab
from raylsm.models.ctr import build_model
from raylsm.train.config import JobConfig


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


class BestState:
    """A CPU copy of the best epoch's model and optimizer state; with ``rollback`` (``train.on_plateau``), after an
    epoch without a better validation AUC that state comes back and the learning rate is multiplied by ``factor``.

    ``after_epoch`` runs once the epoch's metrics went through :class:`EarlyStopping` (``epochs_since_best``) and
    its checkpoint was written. The copy is of this process's model (its own rows of a sharded table) and
    optimizer; every rank takes the same decision from the same gathered metrics.
    """

    def __init__(self, rollback: bool = False, factor: float = 0.1):
        self.rollback, self.factor = rollback, factor
        self.best: tuple[dict, dict | None] | None = None

    def keep(self, model: nn.Module, optimizer) -> None:
        """Copy ``model``'s state (and with ``rollback`` ``optimizer``'s) as the best epoch's."""
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.best = (weights, _to_cpu(optimizer.state_dict()) if self.rollback else None)

    def after_epoch(self, model: nn.Module, optimizer, metrics: dict) -> str | None:
        """Keep the state of a best epoch; after one without a better validation AUC (with ``rollback``), restore the
        best and lower the rate. Returns what it did to such an epoch, in words (the rate lowered without restoring
        when this process holds no best state: a worker restarted from a checkpoint that was not the best); else None."""
        if "val_auc" not in metrics:
            return None
        if metrics["epochs_since_best"] == 0:
            self.keep(model, optimizer)
            return None
        if not self.rollback:
            return None
        rates = [g["lr"] * self.factor for g in optimizer.param_groups]
        what = f"rate x{self.factor:g} without restoring (no best state in this process: restarted from a later checkpoint)"
        if self.best is not None:
            model.load_state_dict(self.best[0])
            optimizer.load_state_dict(self.best[1])  # (torch moves the moments next to their parameters)
            what = f"the best epoch's model and optimizer state restored, rate x{self.factor:g}"
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        return what


def epoch_limit(train, epoch: int, limit: int, rolled_back: bool) -> int:
    """The number of epochs a run trains, after ``epoch`` (``train.rollback_finetune``): one more than the budget
    when that epoch was the budget's last and brought a rollback (``rolled_back``), so the fine-tune it sets up runs."""
    if rolled_back and train.rollback_finetune and epoch == train.epochs - 1:
        return train.epochs + 1
    return limit


def resume_plateau(best: BestState | None, train, start_epoch: int, previous: dict | None, model: nn.Module,
                   optimizer) -> tuple[int, str | None]:
    """A run resumed after an epoch without a better validation AUC (``previous``, its checkpoint's metrics): the
    rollback that followed that epoch went with the worker, so take it now (the rate lowered; the best state is not
    in this process), with its fine-tune epoch when that epoch was the budget's last. Returns the number of epochs
    the run trains and what was done, in words (None: nothing pending, or no rollback)."""
    if best is None or not previous or not previous.get("epochs_since_best"):
        return train.epochs, None
    what = best.after_epoch(model, optimizer, previous)
    return epoch_limit(train, start_epoch - 1, train.epochs, what is not None), what


def _to_cpu(tree):
    """A copy of a state dict's tree with every tensor on the CPU."""
    if isinstance(tree, Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


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
        logits, aux = probe(example_batch(2, job.data.st_len, job.data.ll_len, len(vocab.profile), device="meta"))
        loss = logits.float().sum() + sum((v.float().sum() for v in aux.values()), torch.zeros((), device="meta"))
        loss.backward()
    except Exception:  # data-dependent control flow: cannot tell from shapes alone
        return [name for name, _ in probe.named_parameters()]
    return [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]


def score_frame(model: nn.Module, spec, frame):
    """Click probabilities of a DataFrame of contract rows (the logged model's ``predict``)."""
    import pyarrow as pa

    from raylsm.data.collate import collate_table

    frame = frame.copy()
    if "label" not in frame:
        frame["label"] = np.zeros(len(frame), np.int8)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    batch = {k: torch.from_numpy(v) for k, v in collate_table(table, spec).items()}
    with torch.no_grad():
        logits, _ = model(batch)
    return torch.sigmoid(logits.float()).numpy()


def decay_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every parameter group's learning rate by ``factor`` (``train.lr_decay``, once per epoch)."""
    if factor != 1.0:
        for group in optimizer.param_groups:
            group["lr"] *= factor

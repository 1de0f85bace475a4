"""``raylsm eval``: score a checkpoint on a dataset's test split, in process."""

from __future__ import annotations

import time

import torch

from raylsm.data.collate import collate_spec, iter_local_batches
from raylsm.data.check import validate_dataset
from raylsm.train.checkpoint import model_from_checkpoint
from raylsm.train.step import predict
from raylsm.train.metrics import evaluate_arrays


def evaluate_checkpoint(checkpoint: str, data: str, batch_size: int = 2048) -> dict:
    """AUC, GAUC and logloss of ``checkpoint`` on ``data``'s test split."""
    manifest = validate_dataset(data)
    model, meta = model_from_checkpoint(checkpoint)  # CheckpointError: one line naming --checkpoint
    vocab = meta["vocab"]
    for key in ("item", "cate", "ctx", "gap", "user"):
        if manifest.vocab[key] > vocab[key]:
            raise ValueError(
                f"{data}/manifest.json: vocab.{key} = {manifest.vocab[key]} exceeds the checkpoint's {vocab[key]}"
            )
    if list(manifest.profile_fields) != list(vocab["profile"]):
        raise ValueError(
            f"{data}/manifest.json: profile fields {manifest.profile_fields} differ from the checkpoint's {list(vocab['profile'])}"
        )
    job = meta["job"]
    spec = collate_spec(job["data"], manifest)
    device = torch.device("cpu")
    start = time.perf_counter()
    batches = ({k: torch.from_numpy(v) for k, v in b.items()} for b in iter_local_batches(data, "test", spec, batch_size))
    preds = predict(model.to(device), batches, device)
    metrics = evaluate_arrays(preds["labels"], preds["logits"], preds["users"])
    metrics.update(checkpoint=checkpoint, data=data, model=job["preset"], epoch=meta["epoch"],
                   seconds=round(time.perf_counter() - start, 3))
    return metrics

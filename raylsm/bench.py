"""``raylsm bench``: per-step time and peak memory of models on a synthetic batch, in process.

Each (model, L) runs in its own spawned process so its peak RSS is its own:
build the model, make one random collated batch (B rows, L lifelong
behaviours, all valid), run ``steps`` training steps (forward, BCE + aux,
backward, Adam) after one warm-up step, and report the median step time and
the process's peak RSS. Vocabulary sizes default to the synthetic generator's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time

DEFAULT_VOCAB = {"item": 60001, "cate": 257, "ctx": 5, "gap": 64, "user": 2001,
                 "profile": {"age": 8, "gender": 3, "activity": 5}}


def _random_batch(b: int, s: int, l: int, vocab: dict, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)

    def ids(hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, hi, shape, generator=g)

    batch = {
        "user_id": ids(vocab["user"], b), "item_id": ids(vocab["item"], b), "item_cate": ids(vocab["cate"], b),
        "label": torch.randint(0, 2, (b,), generator=g).float(),
        "profile": torch.stack([torch.randint(0, v, (b,), generator=g) for v in vocab["profile"].values()], 1),
    }
    for name in ("st_tgt", "st_src"):
        batch[f"{name}_items"], batch[f"{name}_cates"] = ids(vocab["item"], b, s), ids(vocab["cate"], b, s)
        batch[f"{name}_mask"] = torch.ones(b, s, dtype=torch.bool)
    batch.update(ll_items=ids(vocab["item"], b, l), ll_cates=ids(vocab["cate"], b, l), ll_ctx=ids(vocab["ctx"], b, l),
                 ll_gap=ids(vocab["gap"], b, l), ll_mask=torch.ones(b, l, dtype=torch.bool))
    return batch


def bench_one(model: str, b: int, l: int, steps: int, overrides: list[str], threads: int, st_len: int = 50) -> dict:
    """Median training-step time (ms) and peak RSS (MB) of one model at batch ``b`` and length ``l``."""
    import torch
    import torch.nn.functional as F

    from raylsm.config import apply_overrides
    from raylsm.models import build_model, preset_config
    from raylsm.models.config import ModelConfig
    from raylsm.models.layers import Vocab

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    extra = apply_overrides({}, overrides, ModelConfig)
    net = build_model(preset_config(model, extra), Vocab(**DEFAULT_VOCAB))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    batch = _random_batch(b, st_len, l, DEFAULT_VOCAB)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        logits, aux = net(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
        loss = loss + sum(net.aux_weights[k] * v for k, v in aux.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    return {
        "model": model, "batch": b, "ll_len": l, "threads": torch.get_num_threads(),
        "step_ms": round(1000 * statistics.median(times), 1),
        "samples_per_s": round(b / statistics.median(times), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_steps_mb": round(rss_before, 1),
        "params": sum(p.numel() for p in net.parameters()),
    }


def run_bench(args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    rows = []
    for model in args.models.split(","):
        for l in (int(x) for x in str(args.ll_len).split(",")):
            with ctx.Pool(1) as pool:
                row = pool.apply(bench_one, (model, args.batch, l, args.steps, args.overrides, args.threads))
            print(f"{row['model']:10s} B={row['batch']} L={row['ll_len']:5d}  {row['step_ms']:9.1f} ms/step  "
                  f"peak {row['peak_rss_mb']:8.1f} MB", file=sys.stderr)
            rows.append(row)
    return {"bench": "train_step", "results": rows}

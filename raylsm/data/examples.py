"""Example batches in the collated layout (``raylsm.data.collate``): for probes, benchmarks and tests.

One builder for every fake batch: random ids (left-padded sequences with masks) from a seeded NumPy
generator, or shape-only tensors on the meta device (``device="meta"``: no memory, no random numbers).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


def _sizes(vocab) -> dict:
    """``vocab`` as a dict (a ``Vocab``, its ``__dict__`` or a manifest's vocab mapping)."""
    return dict(vocab) if isinstance(vocab, Mapping) else dict(vars(vocab))


def example_batch(b: int, st_len: int, ll_len: int, vocab, seed: int = 0, *, ll_lengths=None, st_lengths=None,
                  full: bool = False, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """A collated batch of ``b`` rows; row i has ``ll_lengths[i]`` (``st_lengths[i]``) real behaviours.

    Lengths default to random ones in [0, len], or to every position when ``full``. ``device="meta"`` gives
    int64 zeros and all-true masks of the right shapes on the meta device (``vocab`` may then be the number
    of profile fields).
    """
    if str(device) == "meta":
        return _meta_batch(b, st_len, ll_len, vocab if isinstance(vocab, int) else len(_sizes(vocab)["profile"]))
    sizes = _sizes(vocab)
    rng = np.random.default_rng(seed)
    if full:
        ll_lengths, st_lengths = [ll_len] * b, [st_len] * b
    ll = np.asarray(ll_lengths if ll_lengths is not None else rng.integers(0, ll_len + 1, b))
    st = np.asarray(st_lengths if st_lengths is not None else rng.integers(0, st_len + 1, b))

    def seq(n: int, lengths: np.ndarray, hi: int, lo: int = 1) -> tuple[np.ndarray, np.ndarray]:
        mask = np.arange(n)[None, :] >= (n - lengths)[:, None]
        return np.where(mask, rng.integers(lo, hi, (b, n)), 0), mask

    batch = {
        "user_id": rng.integers(1, sizes["user"], b),
        "item_id": rng.integers(1, sizes["item"], b),
        "item_cate": rng.integers(1, sizes["cate"], b),
        "label": rng.integers(0, 2, b).astype(np.float32),
        "profile": np.stack([rng.integers(0, v, b) for v in sizes["profile"].values()], 1),
    }
    for name in ("st_tgt", "st_src"):
        batch[f"{name}_items"], batch[f"{name}_mask"] = seq(st_len, st, sizes["item"])
        batch[f"{name}_cates"], _ = seq(st_len, st, sizes["cate"])
    batch["ll_items"], batch["ll_mask"] = seq(ll_len, ll, sizes["item"])
    batch["ll_cates"], _ = seq(ll_len, ll, sizes["cate"])
    batch["ll_ctx"], _ = seq(ll_len, ll, sizes["ctx"])
    batch["ll_gap"], _ = seq(ll_len, ll, sizes["gap"])
    out = {k: torch.as_tensor(v) for k, v in batch.items()}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _meta_batch(b: int, st_len: int, ll_len: int, profile_fields: int) -> dict[str, torch.Tensor]:
    def ids(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int64, device="meta")

    def mask(*shape: int) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.bool, device="meta")

    batch = {"user_id": ids(b), "item_id": ids(b), "item_cate": ids(b), "profile": ids(b, profile_fields),
             "label": torch.zeros(b, device="meta")}
    for name in ("st_tgt", "st_src"):
        batch.update({f"{name}_items": ids(b, st_len), f"{name}_cates": ids(b, st_len), f"{name}_mask": mask(b, st_len)})
    batch.update(ll_items=ids(b, ll_len), ll_cates=ids(b, ll_len), ll_ctx=ids(b, ll_len), ll_gap=ids(b, ll_len),
                 ll_mask=mask(b, ll_len))
    return batch

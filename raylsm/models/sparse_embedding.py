"""Row-sparse embedding lookups and the deduplication of their gradients (``train.embedding_update = sparse``).

:func:`sparse_embed` is ``F.embedding(ids, weight, padding_idx=0, sparse=True)`` with a leaner backward:
the gradient is a sparse COO tensor holding one row per looked-up id (the padding id's rows zeroed in place
of ATen's boolean filtering, which copies every row twice). :func:`unique_rows` sums the rows of repeated
ids without sorting them (``coalesce`` sorts), in O(rows) work and a per-table scratch of one int64 per id.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SparseRowsEmbedding(torch.autograd.Function):
    """``weight.index_select(0, ids)`` whose gradient is ``sparse_coo(ids, grad rows)`` (padding rows zero)."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.shape = tuple(weight.shape)
        return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[1])  # (..., D)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)  # (N,)
        rows = grad.reshape(-1, grad.shape[-1]).masked_fill((flat == 0).unsqueeze(1), 0.0)  # (N, D), padding_idx = 0
        return torch.sparse_coo_tensor(flat.unsqueeze(0), rows, ctx.shape, check_invariants=False), None


def sparse_embed(table: nn.Embedding, ids: Tensor) -> Tensor:
    """``table(ids)`` with a row-sparse gradient for ``table.weight`` (any device); ``(..., D)``.

    A row-sharded table (:class:`~raylsm.models.sharded_embedding.RowShardedEmbedding`) does its own lookup.
    """
    if getattr(table, "sharded", False):
        return table(ids)
    if table.padding_idx == 0 and table.weight.requires_grad and torch.is_grad_enabled():
        return SparseRowsEmbedding.apply(table.weight, ids)
    return table(ids)


class RowScratch:
    """Per-table scratch (one int64 per row, kept between steps) for :func:`unique_rows`."""

    def __init__(self) -> None:
        self._slots: dict[int, Tensor] = {}

    def get(self, param: Tensor) -> Tensor:
        slot = self._slots.get(id(param))
        if slot is None or slot.shape[0] != param.shape[0] or slot.device != param.device:
            slot = torch.empty(param.shape[0], dtype=torch.long, device=param.device)
            self._slots[id(param)] = slot
        return slot


def unique_rows(ids: Tensor, values: Tensor, slot: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct ids of ``ids (N,)`` and the sum of their rows of ``values (N, D)``: ``(U,)``, ``(U, D)``.

    ``slot`` is a scratch of one int64 per table row (its contents do not matter: every entry read is
    written first). Each occurrence finds one representative occurrence of its id through the scratch,
    the representatives number the distinct ids, and one ``index_add`` sums the rows: no sort. The
    order of the ids is unspecified; each sum adds in occurrence order. (The padding id stays, with the
    zero rows its lookups got: a row-wise optimizer leaves a row whose gradients were all zero at zero.)
    """
    n = ids.shape[0]
    if n == 0:
        return ids, values
    pos = torch.arange(n, device=ids.device)  # (N,)
    slot.index_put_((ids,), pos)  # each id's slot: one of its occurrences (whichever write lands last)
    rep = slot.index_select(0, ids)  # (N,) the representative occurrence of each occurrence's id
    first = rep == pos  # (N,) True at the representatives
    number = torch.cumsum(first, 0) - 1  # (N,) a representative's index among the distinct ids
    keep = first.nonzero().squeeze(1)  # (U,)
    inv = number.index_select(0, rep)  # (N,) each occurrence's distinct index
    summed = values.new_zeros(keep.shape[0], values.shape[1]).index_add_(0, inv, values.contiguous())  # (U, D)
    return ids.index_select(0, keep), summed

"""DIN (Zhou et al., KDD 2018): local-activation target attention over the recent behaviours.

Notation:
    B batch, L lifelong length, L' = min(L, ``max_len``) behaviours kept,
    Dq candidate size, Ds behaviour size, Dc context size (unused by DIN).

No retrieval: the sequence is truncated to its most recent ``max_len`` behaviours
(the last columns, since sequences are left-padded). A local activation unit,
an MLP over ``[q, k, q − k, q ⊙ k]``, scores each kept behaviour ``k`` against the
candidate ``q``; the interest is the weighted SUM of the behaviours. Following
the DIN paper the weights are the raw scores (no softmax, so the interest keeps
its intensity); ``cfg.softmax = True`` normalises them with a masked softmax
instead. ``q`` is projected into the behaviour space by a learned linear map
(no bias) when ``Dq != Ds`` (identity otherwise). The activation unit uses ReLU
(the paper's PReLU/Dice is a detail we do not reproduce). Padding gets weight
exactly 0; an all-padding row gives zeros. DIN ignores ``ctx`` (the paper has
no per-behaviour side information in its attention).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raylsm.models.config import DinConfig
from raylsm.models.layers import MLP, masked_softmax


class DIN(nn.Module):
    """``(query (B, Dq), seq (B, L, Ds), ctx (B, L, Dc), mask (B, L)) -> (B, Ds)``."""

    def __init__(self, cfg: DinConfig, query_dim: int, seq_dim: int, ctx_dim: int):
        super().__init__()
        self.max_len, self.softmax = cfg.max_len, cfg.softmax
        # q − k and q ⊙ k need q in the behaviour space.
        self.query_proj = nn.Identity() if query_dim == seq_dim else nn.Linear(query_dim, seq_dim, bias=False)
        self.unit = MLP(4 * seq_dim, list(cfg.hidden), out_dim=1)  # local activation unit
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.out_dim = seq_dim

    def scores(self, query: Tensor, seq: Tensor) -> Tensor:
        """Activation-unit score of every behaviour: ``MLP([q, k, q − k, q ⊙ k])`` (B, L).

        The first layer is computed without building the (B, L, 4·Ds) input: with its weight split by
        columns into ``[W_q W_k W_d W_p]``,
        ``W [q, k, q − k, q ⊙ k] + b = (W_q + W_d) q + b + (W_k − W_d + W_p diag(q)) k``,
        one per-user (h1 × Ds) matrix applied to the behaviours by a batched matmul: a quarter of the
        multiply-adds, forward and backward, and the same values (up to float rounding).
        """
        ds = seq.shape[-1]
        first = self.unit[0]
        w_q, w_k, w_d, w_p = first.weight.split(ds, dim=1)  # (h1, Ds) each
        q = self.query_proj(query)  # (B, Ds)
        per_user = (w_k - w_d).unsqueeze(0) + w_p.unsqueeze(0) * q.unsqueeze(1)  # (B, h1, Ds)
        shared = torch.addmm(first.bias, q, (w_q + w_d).t())  # (B, h1)
        h = torch.baddbmm(shared.unsqueeze(1), seq, per_user.transpose(1, 2))  # (B, L, h1)
        for layer in list(self.unit)[1:]:  # the unit's other layers, as they are
            h = layer(h)
        return h.squeeze(-1)  # (B, L)

    def forward(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        # Most recent max_len behaviours (left-padded: the last columns).
        seq, mask = seq[:, -self.max_len :], mask[:, -self.max_len :]  # (B, L', Ds), (B, L')
        a = self.scores(query, seq)  # (B, L')
        w = masked_softmax(a, mask) if self.softmax else a.masked_fill(~mask, 0.0)  # (B, L'), padding -> 0
        return (w.unsqueeze(-1) * seq).sum(1)  # (B, Ds)

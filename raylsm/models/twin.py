"""TWIN (Chang et al., KDD 2023): a CP-GSU that ranks with the ESU's own attention.

Notation:
    B batch, L lifelong length, K behaviours retrieved (K' = min(K, L)),
    Dq candidate size, Ds behaviour size, Dc context size, H heads, d = ``att_dim``.

Behaviour features are split into an inherent part ``e_j`` (the behaviour
representation ``seq``) and a cross part ``e^c_j`` (the context ``ctx`` =
``[e_ctx ‖ e_gap]``: the user-item side information). The cross part is
compressed to one scalar per head, a per-behaviour bias ``β_jh = (W^C e^c_j)_h``
(linear ``Dc -> H``, no bias: a constant per head would change neither ranking
nor softmax). One :class:`TwinAttention` scores::

    α_jh = (W^Q_h q)(W^K_h e_j)^T / √d + β_jh                    (B, H, L)
    out  = concat_h Σ_j softmax_valid(α_h)_j W^V_h [e_j ‖ e^c_j]  (B, H*d)

* CP-GSU: ``α`` over the whole sequence, ranked by the head-averaged score
  ``mean_h α_jh``, top-K valid behaviours; computed under ``no_grad`` (the
  choice is not differentiated, and TWIN's GSU is not trained separately).
* ESU: the SAME module (same ``W^Q, W^K, W^C, W^V``), recomputed with gradient on
  the K' retrieved, values from the full features ``[e_j ‖ e^c_j]`` as in TWIN.

Padding is never selected nor attended; an all-padding row gives zeros; K >= L
equals the attention over every valid behaviour.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raylsm.models.config import TwinConfig
from raylsm.models.layers import Gather, gather_retrieved, masked_softmax, topk_valid


class TwinAttention(nn.Module):
    """Multi-head target attention with a per-behaviour, per-head bias from the cross features."""

    def __init__(self, query_dim: int, seq_dim: int, ctx_dim: int, heads: int, att_dim: int):
        super().__init__()
        self.heads, self.att_dim = heads, att_dim
        self.w_q = nn.Linear(query_dim, heads * att_dim, bias=False)
        self.w_k = nn.Linear(seq_dim, heads * att_dim, bias=False)  # inherent part only
        self.w_c = nn.Linear(ctx_dim, heads, bias=False)  # cross part -> one scalar per head
        self.w_v = nn.Linear(seq_dim + ctx_dim, heads * att_dim, bias=False)  # values: all features
        self.out_dim = heads * att_dim

    def scores(self, query: Tensor, seq: Tensor, ctx: Tensor) -> Tensor:
        """``α_jh = Q_h K_hj / √d + β_jh``: (B, H, L)."""
        b = seq.shape[0]
        q = self.w_q(query).view(b, self.heads, self.att_dim)  # (B, H, d)
        # Q_h·(W^K_h e_j) = (W^K_h^T Q_h)·e_j: project the query, not every behaviour (same values).
        qk = torch.einsum("bhd,hdx->bhx", q, self.w_k.weight.view(self.heads, self.att_dim, -1))  # (B, H, Ds)
        bias = self.w_c(ctx).transpose(1, 2)  # β  (B, H, L)
        return torch.bmm(qk, seq.transpose(1, 2)) / math.sqrt(self.att_dim) + bias  # (B, H, L)

    def forward(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        b = seq.shape[0]
        w = masked_softmax(self.scores(query, seq, ctx), mask.unsqueeze(1))  # (B, H, L)
        pooled = torch.bmm(w, torch.cat([seq, ctx], dim=-1))  # Σ_j w_hj [e_j ‖ e^c_j]  (B, H, Ds+Dc)
        # Σ_j w_hj W^V_h x_j = W^V_h Σ_j w_hj x_j
        out = torch.einsum("bhx,hdx->bhd", pooled, self.w_v.weight.view(self.heads, self.att_dim, -1))  # (B, H, d)
        return out.reshape(b, self.out_dim)  # (B, H*d)


class TWIN(nn.Module):
    """``(query (B, Dq), seq (B, L, Ds), ctx (B, L, Dc), mask (B, L)) -> (B, H*d)``."""

    def __init__(self, cfg: TwinConfig, query_dim: int, seq_dim: int, ctx_dim: int):
        super().__init__()
        self.k = cfg.k
        self.attention = TwinAttention(query_dim, seq_dim, ctx_dim, cfg.heads, cfg.att_dim)  # shared by GSU and ESU
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        self.out_dim = self.attention.out_dim

    def retrieve(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """CP-GSU: top-K valid behaviours by the head-averaged ESU score -> ``idx (B, K'), sel_mask (B, K')``."""
        with torch.no_grad():
            r = self.attention.scores(query, seq, ctx).mean(1)  # mean_h α_jh  (B, L)
        return topk_valid(r, mask, self.k)

    reads_retrieved_only = True  # the CP-GSU runs without a gradient: as SIMSoft

    def forward(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor, gather: Gather | None = None) -> Tensor:
        # CP-GSU over the whole sequence.
        idx, sel_mask = self.retrieve(query, seq, ctx, mask)  # (B, K'), (B, K')
        # ESU: the same attention on the K' retrieved.
        return self.attention(query, *gather_retrieved(seq, ctx, idx, gather), sel_mask)  # (B, H*d)

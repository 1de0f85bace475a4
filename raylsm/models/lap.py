"""Lifelong Attention Pyramid (LAP, LCN §4.2): CSA -> top-K1 -> MSA -> top-K2 -> FSA.

Notation:
    B batch, L lifelong length, K1 / K2 items kept after CSA / MSA,
    Dq candidate size, Ds behaviour size (``e^h``), Dc context size (``e^c``),
    H heads, d = ``att_dim`` (MSA inner size; FSA per-head size), F = ``ffn_dim``.

Three cascading attentions over the lifelong sequence, each on the top-ranked
items of the previous level:

* CSA (eqs. 7-8): inner product ``r_k = e^h_k · e^v / T`` over the whole sequence
  (``T = csa_temperature``, 1 in the paper); ``IR_CSA = Σ_k w_k e^h_k``; top-K1 by raw ``r``.
* MSA (eqs. 9-10): single-head scaled dot product with the context,
  ``r^msa = (W^Q e^v)(W^K [e^h ‖ e^c])^T / √d``;
  ``IR_MSA = Σ_k w^msa_k W^V [e^h ‖ e^c]``; top-K2 by raw ``r^msa``.
* FSA (eqs. 11-13), ``fsa = per_item``: per item k and head h the weighted value
  ``softmax_k(Q_h K_hk / √d) · V_hk``, heads concatenated per item, the feed-forward
  layer of eq. 12 per item, then the mean over the valid items (eq. 13 read per item;
  FSA's input is then ~1/K2 of a value). ``fsa = per_head``: eq. 11's one
  ``H_h = Σ_k softmax_k(·) V_hk`` per head, heads concatenated, one FFN (eq. 12); eq. 13's
  mean is then over a single vector.

Pooling of CSA/MSA (``pooling``): ``softmax`` = ``w = softmax_valid(r)`` (the text's
"weighted average pooling"); ``sum`` = ``w = r`` on valid items (the printed Σ r_k·v_k: the
interest grows with how many behaviours match); ``sum_scaled`` = ``w = r / N`` with N the
level's input length (L for CSA, K1 for MSA): the same count-keeping sum at O(1) size. Measured choices: README "Model readings".

The output is ``[IR_CSA ‖ IR_MSA ‖ IR_FSA]`` (size ``Ds + d + H·d``), so every level
receives gradient; the top-K selections are integer indices and carry none. With
``score_grad = msa`` each kept item's score at the lower level is added to its score at the level
above, so the upper levels' loss also trains the lower levels' rankings.
Softmaxes and the eq. 13 mean run over valid (unpadded, selected) items only:
padding is never selected nor weighted, a row with fewer than K real behaviours
keeps fewer valid items, and an all-padding row yields zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from raylsm.models.config import LapConfig
from raylsm.models.layers import gather_seq, masked_mean, masked_softmax, topk_valid


@dataclass
class LapLevels:
    """Intermediate results of one LAP pass (what :meth:`LAP.forward` concatenates, plus the selections)."""

    csa_scores: Tensor  # (B, L)   raw r_k, eq. (7)
    csa_idx: Tensor  # (B, K1)  long, positions in the sequence
    csa_mask: Tensor  # (B, K1)  bool, which selected slots are real behaviours
    msa_scores: Tensor  # (B, K1)  raw r^msa_k, eq. (9)
    msa_idx: Tensor  # (B, K2)  long, positions among the K1 selected
    fsa_idx: Tensor  # (B, K2)  long, positions in the sequence
    fsa_mask: Tensor  # (B, K2)  bool
    fsa_weights: Tensor  # (B, H, K2) softmax weights of eq. (11)
    fsa_items: Tensor  # (B, K2, H*d) per-item H_k after eq. (12); (B, 1, H*d) with fsa=per_head
    ir_csa: Tensor  # (B, Ds)
    ir_msa: Tensor  # (B, d)
    ir_fsa: Tensor  # (B, H*d)


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LAP(nn.Module):
    """Lifelong Attention Pyramid: ``(query (B, Dq), seq (B, L, Ds), ctx (B, L, Dc), mask (B, L)) -> (B, out_dim)``."""

    def __init__(self, cfg: LapConfig, query_dim: int, seq_dim: int, ctx_dim: int):
        super().__init__()
        self.k1, self.k2 = cfg.k1, cfg.k2
        self.pooling, self.fsa, self.csa_temperature = cfg.pooling, cfg.fsa, cfg.csa_temperature
        self.score_grad = cfg.score_grad
        self.heads, self.att_dim = cfg.heads, cfg.att_dim
        d, hd, kv_dim = cfg.att_dim, cfg.heads * cfg.att_dim, seq_dim + ctx_dim
        # CSA: the inner product needs e^v in the behaviour space; identity when the sizes agree.
        self.csa_query = nn.Identity() if query_dim == seq_dim else nn.Linear(query_dim, seq_dim, bias=False)
        # MSA, eq. (9)-(10): single head of size d.
        self.msa_q = nn.Linear(query_dim, d, bias=False)
        self.msa_k = nn.Linear(kv_dim, d, bias=False)
        self.msa_v = nn.Linear(kv_dim, d, bias=False)
        # FSA, eq. (11): H heads of size d; eq. (12): feed-forward H*d -> F -> H*d.
        self.fsa_q = nn.Linear(query_dim, hd, bias=False)
        self.fsa_k = nn.Linear(kv_dim, hd, bias=False)
        self.fsa_v = nn.Linear(kv_dim, hd, bias=False)
        self.ffn = nn.Sequential(nn.Linear(hd, cfg.ffn_dim), nn.ReLU(), nn.Linear(cfg.ffn_dim, hd))
        _xavier(self)
        self.out_dim = seq_dim + d + hd

    def _pool(self, scores: Tensor, mask: Tensor) -> Tensor:
        """Pooling weights of eqs. (8)/(10): masked softmax, or the raw scores (padding -> 0)."""
        if self.pooling == "softmax":
            return masked_softmax(scores, mask)
        w = scores.masked_fill(~mask, 0.0)
        # sum_scaled: divided by the level's fixed input length (L or K1), not by the valid count,
        # so the interest still grows with how many behaviours match but stays O(1) in size.
        return w / scores.shape[-1] if self.pooling == "sum_scaled" else w

    def levels(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor) -> LapLevels:
        """Run the three levels and return every intermediate (indices, scores, interests)."""
        b = seq.shape[0]
        h, d = self.heads, self.att_dim

        # Level 1 — Complete-Scope Attention over the whole sequence.
        r = torch.bmm(seq, self.csa_query(query).unsqueeze(-1)).squeeze(-1) / self.csa_temperature  # Eq. (7)  (B, L)
        ir_csa = torch.bmm(self._pool(r, mask).unsqueeze(1), seq).squeeze(1)  # Eq. (8)  (B, Ds)
        idx1, mask1 = topk_valid(r, mask, self.k1)  # (B, K1), (B, K1)
        kv1 = torch.cat([gather_seq(seq, idx1), gather_seq(ctx, idx1)], dim=-1)  # [e^h ‖ e^c]  (B, K1, Ds+Dc)

        # Level 2 — Median-Scope Attention on the K1 selected, with context.
        # (W^Q e^v)·(W^K x) = (W^K^T W^Q e^v)·x and Σ w W^V x = W^V Σ w x: the projections are
        # applied to the query and to the pooled vector, not to each of the K1 items (same values).
        q = self.msa_q(query) @ self.msa_k.weight  # W^K^T W^Q e^v  (B, Ds+Dc)
        r_msa = torch.bmm(kv1, q.unsqueeze(-1)).squeeze(-1) / math.sqrt(d)  # Eq. (9)  (B, K1)
        if self.score_grad == "msa":
            r_msa = r_msa + torch.gather(r, 1, idx1)  # + r_k of the kept items: the loss reaches CSA's ranking  (B, K1)
        w_msa = self._pool(r_msa, mask1)  # (B, K1)
        ir_msa = self.msa_v(torch.bmm(w_msa.unsqueeze(1), kv1).squeeze(1))  # Eq. (10)  (B, d)
        idx2, mask2 = topk_valid(r_msa, mask1, self.k2)  # positions among the K1: (B, K2), (B, K2)
        kv2 = gather_seq(kv1, idx2)  # (B, K2, Ds+Dc)
        k2 = kv2.shape[1]

        # Level 3 — Focused-Scope Attention: multi-head, per-item weighted values, FFN, mean.
        q_h = self.fsa_q(query).view(b, h, d)  # (B, H, d)
        q_k = torch.einsum("bhd,hdx->bhx", q_h, self.fsa_k.weight.view(h, d, -1))  # W^K_h^T Q_h  (B, H, Ds+Dc)
        s_fsa = torch.bmm(q_k, kv2.transpose(1, 2)) / math.sqrt(d)  # Q_h K_hk^T / √d  (B, H, K2)
        if self.score_grad == "msa":
            s_fsa = s_fsa + torch.gather(r_msa, 1, idx2).unsqueeze(1)  # + r^msa_k of the kept items  (B, H, K2)
        w_fsa = masked_softmax(s_fsa, mask2.unsqueeze(1))  # Eq. (11)  (B, H, K2)
        v_h = self.fsa_v(kv2).view(b, k2, h, d)  # V_hk  (B, K2, H, d)
        if self.fsa == "per_item":
            heads = (w_fsa.transpose(1, 2).unsqueeze(-1) * v_h).reshape(b, k2, h * d)  # Eq. (11) per item  (B, K2, H*d)
            items = self.ffn(heads)  # Eq. (12)  (B, K2, H*d)
            ir_fsa = masked_mean(items, mask2)  # Eq. (13)  (B, H*d)
        else:
            heads = torch.einsum("bhk,bkhd->bhd", w_fsa, v_h).reshape(b, h * d)  # Eq. (11) H_h, concat_h  (B, H*d)
            items = self.ffn(heads).unsqueeze(1)  # Eq. (12)  (B, 1, H*d)
            ir_fsa = items.squeeze(1)  # Eq. (13): one H, the mean is the identity  (B, H*d)

        return LapLevels(
            csa_scores=r,
            csa_idx=idx1,
            csa_mask=mask1,
            msa_scores=r_msa,
            msa_idx=idx2,
            fsa_idx=torch.gather(idx1, 1, idx2),  # (B, K2)
            fsa_mask=mask2,
            fsa_weights=w_fsa,
            fsa_items=items,
            ir_csa=ir_csa,
            ir_msa=ir_msa,
            ir_fsa=ir_fsa,
        )

    def forward(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        lv = self.levels(query, seq, ctx, mask)
        return torch.cat([lv.ir_csa, lv.ir_msa, lv.ir_fsa], dim=-1)  # (B, Ds + d + H*d)

"""Two-stage retrieval baselines: SIM soft-search (Pi et al., CIKM 2020) and ETA (Chen et al., 2021).

Notation:
    B batch, L lifelong length, K behaviours retrieved (K' = min(K, L)),
    Dq candidate size, Ds behaviour size, Dc context size,
    H heads, d = ``att_dim`` (per-head ESU size), n = ``n_bits`` (ETA signature length).

Both read the same way: a General Search Unit (GSU) ranks the whole sequence
against the candidate and keeps the top-K valid behaviours; an Exact Search Unit
(ESU), a :class:`~raylsm.models.layers.MultiHeadTargetAttention`, attends over
the K selected. They differ only in the GSU:

* SIM soft-search: inner product ``r_j = q̃ · e_j``.
* ETA: SimHash. A fixed random hyperplane matrix ``R (Ds, n)`` (a seeded buffer,
  not trained) gives every vector the sign-bit signature ``sig(x) = [x R > 0]``;
  ``dist_j = Hamming(sig(q̃), sig(e_j))`` (count of differing bits, XOR of the
  bit tensors); top-K smallest distance, ties broken towards the most recent
  behaviour (an exact integer key, so the choice is deterministic).

Design choices:

* ``q̃ = P q`` puts the candidate in the behaviour space: a learned linear map
  (no bias) when ``Dq != Ds``, identity otherwise. The top-K choice carries no
  gradient, so ``q̃`` (not ``q``) is also the ESU's query: ``P`` is trained through
  the ESU (``W^Q P`` is just a re-parametrised ESU query map) and is never a dead
  parameter under DDP.
* ESU keys/values are ``[e_j ‖ e^c_j]`` (``cfg.esu_ctx``, default): SIM's ESU
  concatenates the behaviour with its time-interval embedding; our context
  ``e^c = [e_ctx ‖ e_gap]`` is that side information. ``esu_ctx = False`` uses
  ``e_j`` only. The GSU ranks by the behaviour alone, as in both papers.
* ``esu_query_bias`` (default off: the papers' ``W^Q q``): ``W^Q q + b^Q``, a candidate-independent
  score term ``b^Q·W^K [e_j ‖ e^c_j]`` per head, through which a behaviour's context can raise its
  weight for every candidate (what TWIN's cross part does by construction). ``esu_query_bias_std``
  (default 1) starts ``b^Q ~ N(0, std²)``: the term is a product, so from ``b^Q = 0`` (std 0, a plain
  bias init) it is a saddle that training did not leave in two epochs, and a context encoder feeding
  ``e^c`` got no candidate-independent gradient; off it, ``sim_soft`` + TCN gains +0.027 AUC over
  ``sim_soft`` (docs/experiments.md, "sim_soft + TCN: the ESU's query bias").
* Padding is never selected nor attended; a row with fewer than K real
  behaviours keeps fewer valid slots; an all-padding row gives zeros.
  With K >= L the output equals the ESU over every valid behaviour.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raylsm.models.config import EtaConfig, SimConfig
from raylsm.models.layers import Gather, MultiHeadTargetAttention, gather_retrieved, topk_valid


class SIMSoft(nn.Module):
    """SIM soft-search: ``(query (B, Dq), seq (B, L, Ds), ctx (B, L, Dc), mask (B, L)) -> (B, H*d)``."""

    def __init__(self, cfg: SimConfig | EtaConfig, query_dim: int, seq_dim: int, ctx_dim: int):
        super().__init__()
        self.k, self.esu_ctx = cfg.k, cfg.esu_ctx
        self.query_proj = nn.Identity() if query_dim == seq_dim else nn.Linear(query_dim, seq_dim, bias=False)
        kv_dim = seq_dim + ctx_dim if cfg.esu_ctx else seq_dim
        self.esu = MultiHeadTargetAttention(seq_dim, kv_dim, cfg.heads, cfg.att_dim, query_bias=cfg.esu_query_bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if cfg.esu_query_bias and cfg.esu_query_bias_std > 0:
            nn.init.normal_(self.esu.w_q.bias, 0.0, cfg.esu_query_bias_std)  # b^Q ~ N(0, std²): off the saddle at 0
        self.out_dim = self.esu.out_dim

    def retrieve(self, q: Tensor, seq: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """GSU: inner-product top-K. ``q (B, Ds)`` already projected -> ``idx (B, K') long, sel_mask (B, K') bool``."""
        with torch.no_grad():  # selection carries no gradient: no graph, and one matmul, not a (B, L, Ds) product
            r = torch.bmm(seq, q.unsqueeze(-1)).squeeze(-1)  # r_j = q̃ · e_j  (B, L)
        return topk_valid(r, mask, self.k)

    def esu_input(self, seq: Tensor, ctx: Tensor) -> Tensor:
        """ESU keys/values: ``[seq ‖ ctx]`` (B, L, Ds+Dc), or ``seq`` when ``esu_ctx`` is off."""
        return torch.cat([seq, ctx], dim=-1) if self.esu_ctx else seq

    # Only the K retrieved behaviours carry a gradient: the model may pass the sequence without one and a
    # ``gather`` that embeds the retrieved ids (see :func:`~raylsm.models.layers.gather_retrieved`).
    reads_retrieved_only = True

    def forward(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor, gather: Gather | None = None) -> Tensor:
        q = self.query_proj(query)  # (B, Ds)
        # GSU over the whole sequence.
        idx, sel_mask = self.retrieve(q, seq, mask)  # (B, K'), (B, K')
        # ESU over the K' retrieved.
        kv = self.esu_input(*gather_retrieved(seq, ctx, idx, gather))  # (B, K', Ds(+Dc))
        return self.esu(q, kv, sel_mask)  # (B, H*d)


class ETA(SIMSoft):
    """ETA: SimHash/Hamming-distance GSU, ESU as :class:`SIMSoft`."""

    def __init__(self, cfg: EtaConfig, query_dim: int, seq_dim: int, ctx_dim: int):
        super().__init__(cfg, query_dim, seq_dim, ctx_dim)
        gen = torch.Generator().manual_seed(cfg.seed)
        # Fixed random hyperplanes: a buffer (moves with .to(), saved in state_dict, never trained).
        self.register_buffer("hyperplanes", torch.randn(seq_dim, cfg.n_bits, generator=gen))  # (Ds, n)

    def signature(self, x: Tensor) -> Tensor:
        """SimHash sign bits ``[x R > 0]``: (..., Ds) -> (..., n) bool."""
        return (x @ self.hyperplanes.to(x.dtype)) > 0

    def hamming(self, q: Tensor, seq: Tensor) -> Tensor:
        """Hamming distance between ``sig(q (B, Ds))`` and each ``sig(seq_j)``: (B, L) long."""
        return (self.signature(seq) ^ self.signature(q).unsqueeze(1)).sum(-1)  # XOR, count differing bits

    def retrieve(self, q: Tensor, seq: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """GSU: top-K smallest Hamming distance among valid positions, ties -> most recent."""
        dist = self.hamming(q, seq)  # (B, L)
        n = dist.shape[-1]
        k = min(self.k, n)
        pos = torch.arange(n, device=dist.device)  # (L,)
        key = dist * n + (n - 1 - pos)  # unique per row: distance first, then recency  (B, L)
        key = key.masked_fill(~mask, torch.iinfo(key.dtype).max)  # padding last
        idx = torch.topk(key, k, dim=-1, largest=False).indices  # (B, K')
        return idx, torch.gather(mask, -1, idx)

"""SDIM (Cao et al., CIKM 2022): hash-based sampling of the behaviours that collide with the candidate.

Notation:
    B batch, L lifelong length, Dq candidate size, Ds behaviour size,
    m = ``n_hashes`` hash functions, n = ``n_bits`` bits per hash function.

Each hash function ``h`` is ``n`` random hyperplanes (SimHash):
``sig_h(x) = [x R_h > 0] ∈ {0,1}^n``; all ``m`` of them form one fixed, seeded
buffer ``R (Ds, m·n)`` (not trained), applied in one matmul (no loop over hashes).
Per hash function, the behaviours whose whole signature equals the candidate's
collide, and their masked mean is that hash's interest ``u_h (Ds)``::

    c_jh = [sig_h(e_j) = sig_h(q̃)] ∧ mask_j                 (B, L, m)
    u_h  = Σ_j c_jh e_j / max(1, Σ_j c_jh)                  (B, m, Ds)

``combine = "concat"`` (default, as SDIM): ``[u_1 ‖ … ‖ u_m]`` is projected by a
learned linear map (no bias) to ``Ds``; ``combine = "mean"``: the mean over the
``m`` hashes (no parameters). Either way the output has size ``Ds``.

Design choices: the paper normalises the collided sum; we take the masked mean
(the same direction, bounded size). A hash with no collision gives ``u_h = 0``
(never NaN), so an all-padding row gives zeros; padding never counts as a
collision (padding embeds to zeros, whose signature is all-zeros, so the mask is
applied explicitly). When ``Dq != Ds`` the candidate is mapped into the behaviour
space by a fixed random projection ``q̃ = q P`` (a seeded buffer): hashing is not
differentiable, so a learned ``P`` would never receive gradient (and would be a
dead parameter under DDP). SDIM uses no ``ctx`` (it hashes behaviour embeddings only).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raylsm.models.config import SdimConfig


class SDIM(nn.Module):
    """``(query (B, Dq), seq (B, L, Ds), ctx (B, L, Dc), mask (B, L)) -> (B, Ds)``."""

    def __init__(self, cfg: SdimConfig, query_dim: int, seq_dim: int, ctx_dim: int):
        super().__init__()
        self.n_hashes, self.n_bits, self.combine = cfg.n_hashes, cfg.n_bits, cfg.combine
        gen = torch.Generator().manual_seed(cfg.seed)
        # m hash functions × n hyperplanes, one fixed buffer: (Ds, m*n).
        self.register_buffer("hyperplanes", torch.randn(seq_dim, cfg.n_hashes * cfg.n_bits, generator=gen))
        if query_dim != seq_dim:
            # Fixed Xavier-scaled random map of the candidate into the behaviour space: (Dq, Ds).
            bound = math.sqrt(6.0 / (query_dim + seq_dim))
            proj = (torch.rand(query_dim, seq_dim, generator=gen) * 2 - 1) * bound
            self.register_buffer("query_proj", proj)
        else:
            self.query_proj = None
        self.out_proj = nn.Linear(cfg.n_hashes * seq_dim, seq_dim, bias=False) if cfg.combine == "concat" else None
        if self.out_proj is not None:
            nn.init.xavier_uniform_(self.out_proj.weight)
        self.out_dim = seq_dim

    def signature(self, x: Tensor) -> Tensor:
        """Per-hash SimHash bits: (..., Ds) -> (..., m, n) bool."""
        bits = (x @ self.hyperplanes.to(x.dtype)) > 0  # (..., m*n)
        return bits.unflatten(-1, (self.n_hashes, self.n_bits))  # (..., m, n)

    def bucket(self, x: Tensor) -> Tensor:
        """Each hash's signature as one integer bucket id ``Σ_k 2^k sig_h(x)_k``: (..., Ds) -> (..., m) int.

        Two signatures are equal exactly when their bucket ids are: comparing one id per hash replaces
        comparing ``n`` bits and reducing over them (that reduction over a 3-wide last axis was 14 % of
        SDIM's CPU step). Computed without autograd: the bits carry no gradient.
        """
        with torch.no_grad():
            bits = self.signature(x).to(torch.int32 if self.n_bits <= 31 else torch.int64)  # (..., m, n)
            ids = bits[..., 0].clone()
            for k in range(1, self.n_bits):  # n is a small constant (the signature length), not the batch or sequence
                ids.add_(bits[..., k], alpha=1 << k)
        return ids  # (..., m)

    def collisions(self, query: Tensor, seq: Tensor, mask: Tensor) -> Tensor:
        """``c_jh``: behaviour j has hash h's signature equal to the candidate's, and is real: (B, L, m) bool."""
        q = query if self.query_proj is None else query @ self.query_proj.to(query.dtype)  # q̃  (B, Ds)
        same = self.bucket(seq) == self.bucket(q).unsqueeze(1)  # sig_h(e_j) = sig_h(q̃)  (B, L, m)
        return same & mask.unsqueeze(-1)

    def hash_interests(self, query: Tensor, seq: Tensor, mask: Tensor) -> Tensor:
        """``u_h``, the masked mean of the colliding behaviours per hash: (B, m, Ds), zeros where none collide."""
        c = self.collisions(query, seq, mask).to(seq.dtype)  # (B, L, m)
        total = torch.einsum("blm,bld->bmd", c, seq)  # Σ_j c_jh e_j  (B, m, Ds)
        return total / c.sum(1).clamp_min(1.0).unsqueeze(-1)  # (B, m, Ds)

    def forward(self, query: Tensor, seq: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        u = self.hash_interests(query, seq, mask)  # (B, m, Ds)
        if self.out_proj is None:
            return u.mean(1)  # (B, Ds)
        return self.out_proj(u.flatten(1))  # [u_1 ‖ … ‖ u_m] W  (B, Ds)

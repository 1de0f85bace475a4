"""Cross Representation Production (CRP, LCN §4.1): a contrastive loss on short-term item embeddings.

Notation: B batch, S short-term length, Dr behaviour-representation size, M negatives per type.

One row of the batch is one impression, i.e. one user's short-term target (``st_tgt``) and
source (``st_src``) sequences. Three pair types, each with its own loss (eqs. 3-5):

* PT / NT: target–target,  PS / NS: source–source,  PC / NC: target–source.
* Positives (per row i): two *different* valid positions of the same sequence (PT, PS), or one
  valid position of ``st_tgt`` and one of ``st_src`` (PC), drawn uniformly among the valid ones.
  Rows with too few valid items for a type (fewer than 2 for PT/PS, an empty side for PC) are
  left out of that type's mean, so ``|B|`` is the number of eligible rows.
* Negatives: M pairs per type, shared by all positives of the batch. Each side is drawn
  uniformly among all valid items of the batch in its domain (with replacement); a pair whose
  two rows belong to the same user is discarded (masked), so the denominator sums the valid
  negatives only (typically a little fewer than M).

Loss per type (eqs. 3-5), with ``s`` the cosine similarity and τ the temperature (``tau``;
default 1.0, the paper's 0.1 measured far worse, see ``CRPConfig``)::

    L = -(1/|B|) Σ_i [ s(p1_i, p2_i)/τ - log Σ_j exp(s(n1_j, n2_j)/τ) ]

— the denominator is the sum over the negatives only, exactly as written in the paper
(``denominator = negatives``), computed with ``logsumexp``; ``denominator = with_positive``
adds the row's positive (InfoNCE: the loss is bounded below by 0). A type with no eligible row or no valid negative contributes 0.
``L_CRP = λ_PT L_PT + λ_PS L_PS + λ_PC L_PC`` (eq. 6); λ_CRP (eq. 14) is applied by the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raylsm.models.config import CRPConfig

PAIR_TYPES = ("pt", "ps", "pc")


@dataclass
class PairSample:
    """Sampled indices of one pair type; the first item of a pair comes from ``x1``, the second from ``x2``.

    Positive i pairs ``x1[i, pos1[i]]`` with ``x2[i, pos2[i]]``; negative j pairs
    ``x1[neg_row1[j], neg_pos1[j]]`` with ``x2[neg_row2[j], neg_pos2[j]]``.
    """

    pos1: Tensor  # (B,) long
    pos2: Tensor  # (B,) long
    pos_valid: Tensor  # (B,) bool: row eligible for this type
    neg_row1: Tensor  # (M,) long
    neg_pos1: Tensor  # (M,) long
    neg_row2: Tensor  # (M,) long
    neg_pos2: Tensor  # (M,) long
    neg_valid: Tensor  # (M,) bool: both items real and the two rows of different users


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity over the last dim; 0 for a zero vector."""
    return (F.normalize(a, dim=-1, eps=1e-8) * F.normalize(b, dim=-1, eps=1e-8)).sum(-1)


def pair_loss(x1: Tensor, x2: Tensor, pairs: PairSample, tau: float, with_positive: bool = False) -> Tensor:
    """Eq. (3)/(4)/(5) for one pair type from explicit indices: ``x1``, ``x2`` are (B, S, Dr).

    ``with_positive``: the row's own positive joins the denominator (InfoNCE), so a row's loss is
    ``>= 0`` and stops pulling once its positive dominates the negatives.
    """
    rows = torch.arange(x1.shape[0], device=x1.device)  # (B,)
    pos = cosine(x1[rows, pairs.pos1], x2[rows, pairs.pos2]) / tau  # (B,)
    neg = cosine(x1[pairs.neg_row1, pairs.neg_pos1], x2[pairs.neg_row2, pairs.neg_pos2]) / tau  # (M,)
    has_neg = pairs.neg_valid.any()
    # Only the valid negatives enter the denominator; with none, a neutral finite stand-in (term masked to 0 below).
    neg = torch.where(has_neg, neg.masked_fill(~pairs.neg_valid, float("-inf")), torch.zeros_like(neg))
    log_denominator = torch.logsumexp(neg, dim=0)  # log Σ_j exp(s(n1_j, n2_j)/τ)
    if with_positive:
        log_denominator = torch.logaddexp(log_denominator, pos)  # log(exp(s_pos/τ) + Σ_j exp(s_neg/τ))  (B,)
    per_row = -(pos - log_denominator)  # (B,)
    w = pairs.pos_valid.to(per_row.dtype)
    loss = (per_row * w).sum() / w.sum().clamp_min(1.0)  # mean over the |B| eligible rows
    return torch.where(has_neg, loss, torch.zeros_like(loss))


def _two_distinct(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two different valid positions per row, uniformly (random scores, top-2): (B,), (B,), eligible (B,)."""
    b, s = mask.shape
    eligible = mask.sum(1) >= 2
    if s < 2:
        zero = torch.zeros(b, dtype=torch.long, device=mask.device)
        return zero, zero, eligible
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)  # (B, S)
    idx = torch.topk(scores, 2, dim=1).indices  # (B, 2)
    return idx[:, 0], idx[:, 1], eligible


def _one(mask: Tensor) -> tuple[Tensor, Tensor]:
    """One valid position per row, uniformly: (B,), and whether the row has any."""
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)  # (B, S)
    return scores.argmax(1), mask.any(1)


def _items(mask: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """M items drawn uniformly (with replacement) among the valid items of the batch: rows (M,), positions (M,)."""
    b, s = mask.shape
    weights = mask.reshape(-1).to(torch.float32)  # (B*S,)
    # An all-padding batch samples anything (so multinomial never sees a zero sum); the pairs are then invalid.
    weights = weights + (weights.sum() == 0).to(weights.dtype)
    flat = torch.multinomial(weights, m, replacement=True)  # (M,)
    return flat // s, flat % s


def sample_pairs(mask1: Tensor, mask2: Tensor, user_id: Tensor, m: int, same_seq: bool) -> PairSample:
    """Positives and M negatives for one pair type; ``same_seq`` for PT/PS (both items from one sequence)."""
    if same_seq:
        pos1, pos2, pos_valid = _two_distinct(mask1)
    else:
        (pos1, any1), (pos2, any2) = _one(mask1), _one(mask2)
        pos_valid = any1 & any2
    row1, p1 = _items(mask1, m)
    row2, p2 = _items(mask2, m)
    neg_valid = mask1[row1, p1] & mask2[row2, p2] & (user_id[row1] != user_id[row2])  # (M,)
    return PairSample(pos1, pos2, pos_valid, row1, p1, row2, p2, neg_valid)


class CRP(nn.Module):
    """CRP loss: ``(st_tgt (B,S,Dr), tgt_mask, st_src (B,S,Dr), src_mask, user_id (B,)) -> L_CRP`` (scalar, eq. 6)."""

    def __init__(self, cfg: CRPConfig):
        super().__init__()
        self.tau, self.m = cfg.tau, cfg.m
        self.with_positive = cfg.denominator == "with_positive"
        self.lambdas = {"pt": cfg.lambda_pt, "ps": cfg.lambda_ps, "pc": cfg.lambda_pc}

    def sample(self, tgt_mask: Tensor, src_mask: Tensor, user_id: Tensor) -> dict[str, PairSample]:
        """Positive and negative indices of the three pair types (global torch RNG, on the masks' device)."""
        return {
            "pt": sample_pairs(tgt_mask, tgt_mask, user_id, self.m, same_seq=True),
            "ps": sample_pairs(src_mask, src_mask, user_id, self.m, same_seq=True),
            "pc": sample_pairs(tgt_mask, src_mask, user_id, self.m, same_seq=False),
        }

    def losses(self, st_tgt: Tensor, st_src: Tensor, samples: dict[str, PairSample]) -> dict[str, Tensor]:
        """L_PT, L_PS, L_PC (eqs. 3-5) from explicit samples."""
        return {
            "pt": pair_loss(st_tgt, st_tgt, samples["pt"], self.tau, self.with_positive),  # Eq. (3)
            "ps": pair_loss(st_src, st_src, samples["ps"], self.tau, self.with_positive),  # Eq. (4)
            "pc": pair_loss(st_tgt, st_src, samples["pc"], self.tau, self.with_positive),  # Eq. (5)
        }

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(self.lambdas[t] * losses[t] for t in PAIR_TYPES)  # Eq. (6)

    def forward(
        self, st_tgt: Tensor, st_tgt_mask: Tensor, st_src: Tensor, st_src_mask: Tensor, user_id: Tensor
    ) -> Tensor:
        samples = self.sample(st_tgt_mask.bool(), st_src_mask.bool(), user_id)
        return self.combine(self.losses(st_tgt, st_src, samples))

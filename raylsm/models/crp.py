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
STACK_ORDER = ("pt", "pc", "ps")  # order of the types in the batched pass (see StackedPairs)


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


def contrastive(sims: Tensor, pos_valid: Tensor, neg_valid: Tensor, tau: float, with_positive: bool = False) -> Tensor:
    """Eqs. (3)-(5) for T pair types at once, from their cosine similarities.

    ``sims (T, B+M)``: the B positives of each type, then its M negatives; ``pos_valid (T, B)``,
    ``neg_valid (T, M)``. Returns the T losses (T,). With ``with_positive`` the row's own positive
    joins the denominator (InfoNCE), so a row's loss is ``>= 0``.
    """
    b = pos_valid.shape[1]
    s = sims / tau
    pos, neg = s[:, :b], s[:, b:]  # (T, B), (T, M)
    has_neg = neg_valid.any(1, keepdim=True)  # (T, 1)
    # Only the valid negatives enter the denominator; a type with none keeps its raw (finite) values
    # as a stand-in: its term is masked to 0 below (value and gradient).
    neg = torch.where(neg_valid | ~has_neg, neg, float("-inf"))
    log_denominator = torch.logsumexp(neg, dim=1, keepdim=True)  # log Σ_j exp(s(n1_j, n2_j)/τ)  (T, 1)
    if with_positive:
        log_denominator = torch.logaddexp(log_denominator, pos)  # log(exp(s_pos/τ) + Σ_j exp(s_neg/τ))  (T, B)
    per_row = -(pos - log_denominator)  # (T, B)
    w = pos_valid.to(per_row.dtype)
    loss = (per_row * w).sum(1) / w.sum(1).clamp_min(1.0)  # mean over the |B| eligible rows  (T,)
    return torch.where(has_neg.squeeze(1), loss, torch.zeros_like(loss))


def pair_loss(x1: Tensor, x2: Tensor, pairs: PairSample, tau: float, with_positive: bool = False) -> Tensor:
    """Eq. (3)/(4)/(5) for one pair type from explicit indices: ``x1``, ``x2`` are (B, S, Dr)."""
    rows = torch.arange(x1.shape[0], device=x1.device)  # (B,)
    a = x1[torch.cat([rows, pairs.neg_row1]), torch.cat([pairs.pos1, pairs.neg_pos1])]  # (B+M, Dr)
    b = x2[torch.cat([rows, pairs.neg_row2]), torch.cat([pairs.pos2, pairs.neg_pos2])]  # (B+M, Dr)
    sims = cosine(a, b).unsqueeze(0)  # (1, B+M)
    return contrastive(sims, pairs.pos_valid.unsqueeze(0), pairs.neg_valid.unsqueeze(0), tau, with_positive)[0]


def _two_distinct(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two different valid positions per row, uniformly (random scores, top-2): (B,), (B,), eligible (B,)."""
    b, s = mask.shape
    if s < 2:
        zero = torch.zeros(b, dtype=torch.long, device=mask.device)
        return zero, zero, torch.zeros(b, dtype=torch.bool, device=mask.device)
    scores = torch.where(mask, torch.rand(mask.shape, device=mask.device), -1.0)  # (B, S): valid in [0, 1), padding -1
    top = torch.topk(scores, 2, dim=1)  # (B, 2)
    return top.indices[:, 0], top.indices[:, 1], top.values[:, 1] >= 0  # eligible: a second valid item


def _one(mask: Tensor) -> tuple[Tensor, Tensor]:
    """One valid position per row, uniformly: (B,), and whether the row has any."""
    scores = torch.where(mask, torch.rand(mask.shape, device=mask.device), -1.0)  # (B, S)
    return scores.argmax(1), mask.any(1)


def _item_weights(mask: Tensor) -> Tensor:
    """Sampling weights (B*S,) of the batch's valid items (all equal for an all-padding batch: the pairs are then invalid)."""
    weights = mask.reshape(-1).to(torch.float32)  # (B*S,)
    # An all-padding batch samples anything (so multinomial never sees a zero sum).
    return weights + (weights.sum() == 0).to(weights.dtype)


@dataclass
class StackedPairs:
    """The three pair types' samples as flat indices into the two sequences (what one batched pass reads).

    ``tgt (3, B+M)`` indexes ``st_tgt`` viewed as (B·S_t, Dr) (``row·S_t + position``): its items of
    [PT first, PT second, PC first]; ``src (3, B+M)`` indexes ``st_src`` (B·S_s, Dr): [PC second,
    PS first, PS second]. Columns ``:B`` are the positives (row i), ``B:`` the M negatives.
    ``pos_valid (3, B)`` and ``neg_valid (3, M)`` are in the order PT, PC, PS (:data:`STACK_ORDER`):
    the six gathered blocks, concatenated, then pair up as (0, 1), (2, 3), (4, 5).
    """

    tgt: Tensor
    src: Tensor
    pos_valid: Tensor
    neg_valid: Tensor
    s_t: int
    s_s: int

    @classmethod
    def from_samples(cls, samples: dict[str, PairSample], s_t: int, s_s: int) -> "StackedPairs":
        """Stack per-type samples; types with fewer negatives are padded with invalid ones (excluded exactly)."""
        m = max(samples[t].neg_valid.shape[0] for t in PAIR_TYPES)
        pt, ps, pc = (_pad_negatives(samples[t], m) for t in PAIR_TYPES)
        rows = torch.arange(pt.pos1.shape[0], device=pt.pos1.device)  # (B,)

        def flat(pos: list[Tensor], neg_rows: list[Tensor], neg_pos: list[Tensor], s: int) -> Tensor:
            return torch.cat([rows * s + torch.stack(pos), torch.stack(neg_rows) * s + torch.stack(neg_pos)], 1)

        return cls(
            flat([pt.pos1, pt.pos2, pc.pos1], [pt.neg_row1, pt.neg_row2, pc.neg_row1], [pt.neg_pos1, pt.neg_pos2, pc.neg_pos1], s_t),
            flat([pc.pos2, ps.pos1, ps.pos2], [pc.neg_row2, ps.neg_row1, ps.neg_row2], [pc.neg_pos2, ps.neg_pos1, ps.neg_pos2], s_s),
            torch.stack([pt.pos_valid, pc.pos_valid, ps.pos_valid]),
            torch.stack([pt.neg_valid, pc.neg_valid, ps.neg_valid]),
            s_t,
            s_s,
        )

    def samples(self) -> dict[str, PairSample]:
        """The per-type view (:class:`PairSample` each)."""
        b = self.pos_valid.shape[1]
        (a1, a2, ac), (cc, c1, c2) = self.tgt[:, :b] % self.s_t, self.src[:, :b] % self.s_s  # positives' positions
        nt, ns = self.tgt[:, b:], self.src[:, b:]  # negatives
        (t1, t2, tc), (q1, q2, qc) = nt // self.s_t, nt % self.s_t  # rows, positions (M,) each
        (sc, s1, s2), (rc, r1, r2) = ns // self.s_s, ns % self.s_s
        (pv_t, pv_c, pv_s), (nv_t, nv_c, nv_s) = self.pos_valid, self.neg_valid
        return {
            "pt": PairSample(a1, a2, pv_t, t1, q1, t2, q2, nv_t),
            "ps": PairSample(c1, c2, pv_s, s1, r1, s2, r2, nv_s),
            "pc": PairSample(ac, cc, pv_c, tc, qc, sc, rc, nv_c),
        }


def _pad_negatives(p: PairSample, m: int) -> PairSample:
    """``p`` with its negatives padded to ``m`` by invalid pairs (index 0, ``neg_valid`` False)."""
    extra = m - p.neg_valid.shape[0]
    if extra == 0:
        return p
    pad = lambda t: torch.cat([t, t.new_zeros(extra)])  # noqa: E731
    return PairSample(p.pos1, p.pos2, p.pos_valid, pad(p.neg_row1), pad(p.neg_pos1), pad(p.neg_row2), pad(p.neg_pos2),
                      pad(p.neg_valid))


def sample_stacked(tgt_mask: Tensor, src_mask: Tensor, user_id: Tensor, m: int) -> StackedPairs:
    """Positives and M negatives of PT, PS and PC in one go (global torch RNG, on the masks' device).

    * Positives (per row i): two *different* valid positions of one sequence (PT, PS), or one
      valid position of each (PC), uniformly (random scores, top-2 / argmax).
    * Negatives: each side drawn uniformly (with replacement) among the batch's valid items of its
      domain; a pair is valid when both items are real and their rows belong to different users.

    Random calls, in order: PT positives, PT negatives (2M), PS positives, PS negatives (2M), PC
    positives (target, source), PC negatives (target M, source M) — the order of the per-type
    sampler this replaced (whose two M-draws per type are one 2M-draw on the CPU generator), so a
    seed gives the same pairs as before.
    """
    b, s_t = tgt_mask.shape
    s_s = src_mask.shape[1]
    w_t, w_s = _item_weights(tgt_mask), _item_weights(src_mask)
    pt1, pt2, pt_ok = _two_distinct(tgt_mask)
    neg_pt = torch.multinomial(w_t, 2 * m, replacement=True)  # PT negatives, both sides: (2M,) flat
    ps1, ps2, ps_ok = _two_distinct(src_mask)
    neg_ps = torch.multinomial(w_s, 2 * m, replacement=True)  # (2M,)
    (pc1, any_t), (pc2, any_s) = _one(tgt_mask), _one(src_mask)
    neg_pc_t = torch.multinomial(w_t, m, replacement=True)  # (M,)
    neg_pc_s = torch.multinomial(w_s, m, replacement=True)  # (M,)

    neg_t = torch.cat([neg_pt, neg_pc_t]).view(3, m)  # [PT first, PT second, PC first]  (3, M)
    neg_s = torch.cat([neg_pc_s, neg_ps]).view(3, m)  # [PC second, PS first, PS second]  (3, M)
    # Per drawn item: is it real, and whose; then per pair (PT, PC, PS): both real, different users.
    ok = torch.cat([tgt_mask.reshape(-1)[neg_t], src_mask.reshape(-1)[neg_s]]).view(3, 2, m)  # (3, 2, M)
    uid = user_id[torch.cat([neg_t // s_t, neg_s // s_s])].view(3, 2, m)  # (3, 2, M)
    device = tgt_mask.device
    row_t = torch.arange(0, b * s_t, s_t, device=device)  # flat offset of each row  (B,)
    row_s = torch.arange(0, b * s_s, s_s, device=device)
    return StackedPairs(
        tgt=torch.cat([torch.stack([pt1, pt2, pc1]) + row_t, neg_t], 1),  # (3, B+M)
        src=torch.cat([torch.stack([pc2, ps1, ps2]) + row_s, neg_s], 1),  # (3, B+M)
        pos_valid=torch.stack([pt_ok, any_t & any_s, ps_ok]),  # (3, B)
        neg_valid=ok.all(1) & (uid[:, 0] != uid[:, 1]),  # (3, M)
        s_t=s_t,
        s_s=s_s,
    )


def stacked_losses(st_tgt: Tensor, st_src: Tensor, pairs: StackedPairs, tau: float, with_positive: bool) -> Tensor:
    """L_PT, L_PC, L_PS (eqs. 3, 5, 4) as one (3,) tensor: one gather per sequence, one batched cosine."""
    n, dr = pairs.tgt.shape[1], st_tgt.shape[-1]
    g_t = st_tgt.reshape(-1, dr).index_select(0, pairs.tgt.reshape(-1))  # [PT first, PT second, PC first]  (3(B+M), Dr)
    g_s = st_src.reshape(-1, dr).index_select(0, pairs.src.reshape(-1))  # [PC second, PS first, PS second]  (3(B+M), Dr)
    g = torch.cat([g_t, g_s]).view(3, 2, n, dr)  # (PT, PC, PS) x (first, second)  (3, 2, B+M, Dr)
    first, second = F.normalize(g, dim=-1, eps=1e-8).unbind(1)  # (3, B+M, Dr) each
    sims = (first * second).sum(-1)  # cosine s(·,·) of every pair  (3, B+M)
    return contrastive(sims, pairs.pos_valid, pairs.neg_valid, tau, with_positive)  # (PT, PC, PS)


class CRP(nn.Module):
    """CRP loss: ``(st_tgt (B,S,Dr), tgt_mask, st_src (B,S,Dr), src_mask, user_id (B,)) -> L_CRP`` (scalar, eq. 6).

    The three pair types run as one batched pass (:func:`sample_stacked`, :func:`stacked_losses`):
    one gather per sequence and one cosine for all 3·(B+M) pairs, instead of four gathers and two
    cosines per type (12 gathers, whose backward each zero-filled a (B, S, Dr) gradient) — the same
    values and gradients, ~1/8 of the ops.
    """

    def __init__(self, cfg: CRPConfig):
        super().__init__()
        self.tau, self.m = cfg.tau, cfg.m
        self.with_positive = cfg.denominator == "with_positive"
        self.lambdas = {"pt": cfg.lambda_pt, "ps": cfg.lambda_ps, "pc": cfg.lambda_pc}

    def sample(self, tgt_mask: Tensor, src_mask: Tensor, user_id: Tensor) -> dict[str, PairSample]:
        """Positive and negative indices of the three pair types (global torch RNG, on the masks' device)."""
        return sample_stacked(tgt_mask, src_mask, user_id, self.m).samples()

    def losses(self, st_tgt: Tensor, st_src: Tensor, samples: dict[str, PairSample]) -> dict[str, Tensor]:
        """L_PT, L_PS, L_PC (eqs. 3-5) from explicit samples."""
        pairs = StackedPairs.from_samples(samples, st_tgt.shape[1], st_src.shape[1])
        vec = stacked_losses(st_tgt, st_src, pairs, self.tau, self.with_positive)
        return dict(zip(STACK_ORDER, vec.unbind(0)))  # Eqs. (3), (5), (4)

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(self.lambdas[t] * losses[t] for t in PAIR_TYPES)  # Eq. (6)

    def forward(
        self, st_tgt: Tensor, st_tgt_mask: Tensor, st_src: Tensor, st_src_mask: Tensor, user_id: Tensor
    ) -> Tensor:
        pairs = sample_stacked(st_tgt_mask.bool(), st_src_mask.bool(), user_id, self.m)
        vec = stacked_losses(st_tgt, st_src, pairs, self.tau, self.with_positive)  # Eqs. (3), (5), (4)
        return self.combine(dict(zip(STACK_ORDER, vec.unbind(0))))

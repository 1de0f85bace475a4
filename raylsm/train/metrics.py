"""Exact AUC, GAUC and logloss over a whole split, vectorised in numpy.

AUC is the Mann–Whitney statistic with tied scores counted half (average
ranks), which is what ``sklearn.metrics.roc_auc_score`` computes; the tests use
sklearn as the reference. It is written here in numpy because GAUC needs the
same computation per user in one grouped pass (sklearn would need a Python
loop over users) and because the training workers should not import sklearn.

GAUC = Σ_u n_u · AUC_u / Σ_u n_u over users whose labels contain both classes
(n_u = the user's impressions); other users are excluded.

With several workers, each evaluates its shard and the (score, label, user)
arrays are gathered to every rank before computing (:func:`gather_arrays`), so
the figures are exact for the whole split, not averages of per-worker values.
"""

from __future__ import annotations

import numpy as np


def _grouped_rank_sums(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per group: (unique group ids, n, n_pos, sum of average ranks of positives within the group)."""
    order = np.lexsort((scores, groups))  # by group, then score
    g, s, y = groups[order], scores[order], labels[order]
    n = len(g)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    # Ties: runs of equal (group, score) share the average of their positions.
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.r_[tie_first[1:], n] - 1
    avg_pos = (tie_first + tie_last) / 2.0  # 0-based average position of each tie run
    rank = avg_pos[tie_id] - group_start + 1.0  # 1-based rank within the group
    gid = np.cumsum(new_group) - 1
    counts = np.bincount(gid)
    n_pos = np.bincount(gid, weights=y)
    pos_rank_sum = np.bincount(gid, weights=rank * y)
    return g[new_group], counts, n_pos, pos_rank_sum


def _auc_from_ranks(counts: np.ndarray, n_pos: np.ndarray, pos_rank_sum: np.ndarray) -> np.ndarray:
    n_neg = counts - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (ties count half); NaN when only one class is present."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(labels) == 0:
        return float("nan")
    _, counts, n_pos, prs = _grouped_rank_sums(np.zeros(len(labels), np.int64), scores, labels)
    value = _auc_from_ranks(counts, n_pos, prs)[0]
    return float(value) if np.isfinite(value) else float("nan")


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users with both classes; NaN if there are none."""
    labels = np.asarray(labels, dtype=np.float64)
    if len(labels) == 0:
        return float("nan")
    _, counts, n_pos, prs = _grouped_rank_sums(np.asarray(users), np.asarray(scores, np.float64), labels)
    ok = (n_pos > 0) & (n_pos < counts)
    if not ok.any():
        return float("nan")
    per_user = _auc_from_ranks(counts[ok], n_pos[ok], prs[ok])
    return float((per_user * counts[ok]).sum() / counts[ok].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps] like sklearn)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def evaluate_arrays(labels: np.ndarray, logits: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and logloss from logits (probabilities = sigmoid)."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = 1.0 / (1.0 + np.exp(-logits))
    return {
        "auc": auc(labels, logits),
        "gauc": gauc(labels, logits, users),
        "logloss": logloss(labels, probs),
        "rows": int(len(labels)),
    }


def gather_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each array across all ranks of the torch.distributed group (identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}

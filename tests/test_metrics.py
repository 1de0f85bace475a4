"""AUC, GAUC and logloss equal sklearn's on the same predictions (ties, groups, edge cases)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from raylsm.train.metrics import auc, evaluate_arrays, gauc, logloss


def _gauc_reference(y, s, u):
    num = den = 0.0
    for user in np.unique(u):
        m = u == user
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + 0.7 * y, 1)  # rounding creates many ties
    u = rng.integers(0, 80, n)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert gauc(y, s, u) == pytest.approx(_gauc_reference(y, s, u), abs=1e-12)
    p = 1 / (1 + np.exp(-s))
    assert logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-9)
    m = evaluate_arrays(y, s, u)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12) and m["rows"] == n


def test_edge_cases():
    assert np.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    # Users whose labels are all one class are excluded; here only user 2 counts.
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.1, 0.3, 0.2, 0.8, 0.7])
    u = np.array([1, 1, 2, 2, 2, 3])
    u[:2] = 1
    y2 = np.array([1, 1, 1, 0, 0, 0])
    assert gauc(y2, s, np.array([1, 1, 2, 2, 2, 3])) == pytest.approx(roc_auc_score([1, 0, 0], [0.3, 0.2, 0.8]))
    assert np.isnan(gauc([1, 0], [0.1, 0.2], [1, 2]))
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))

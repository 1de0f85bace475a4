"""What the generator's planted effects are worth on a dataset it wrote: reference AUCs from hidden counts.

A logistic regression (sklearn) on a few counts that only the generator can compute, because they use the
hidden interest of every item (``World.cate_interest``), ranks the test split. Each row adds one signal:

* ``st``: how many ``st_tgt`` items share the candidate's interest (the short-term shortcut);
* ``+ll``: how many lifelong items share it (counting, what DIN can do);
* ``+own``: ... of them with their own engagement ``ll_ctx`` >= 3 (what attention over [item ‖ ctx] can do);
* ``+nb``: ... of them whose neighbours (±``window`` positions) are engaged on average (mean ctx >= 2.5):
  what a context window (CAIN's TCN) can add.

The differences between rows are the headroom each mechanism has on that dataset: with the context effect
off, ``+nb`` adds nothing (``tests/test_mechanisms.py``); with ``--st-noise 0.2`` the shortcut leaves the
lifelong sequence little to add. These are references, not bounds: a trained model also learns item and
user biases the counts leave out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raylsm.data.collate import list_parts, tail_pad
from raylsm.data.contract import read_manifest

COLUMNS = ("item_cate", "label", "st_tgt_cates", "ll_cates", "ll_ctx")
ROWS = ("st", "st+ll", "st+ll+own", "st+ll+own+nb")


def _padded(table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as a left-padded (N, max_len) array and its validity mask (the collate's own padding)."""
    offsets, values = list_parts(table[column])
    return tail_pad(offsets, values, max(int(np.diff(offsets).max(initial=0)), 1))


def _window_mean(x: np.ndarray, mask: np.ndarray, half: int) -> np.ndarray:
    """Mean of ``x`` over the valid positions within ±``half`` of each position (vectorised, via cumsums)."""
    def window_sum(a: np.ndarray) -> np.ndarray:
        c = np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(a, axis=1)], axis=1)
        idx = np.arange(a.shape[1])
        hi = np.minimum(idx + half + 1, a.shape[1])
        lo = np.maximum(idx - half, 0)
        return c[:, hi] - c[:, lo]

    return window_sum(np.where(mask, x, 0).astype(float)) / np.maximum(window_sum(mask.astype(float)), 1.0)


def counts(path: str | Path, split: str, cate_interest: np.ndarray, window: int = 3,
           max_files: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X (N, 4), y (N,))``: the four counts of the module docstring for every row of ``split``."""
    files = sorted((Path(path) / split).glob("*.parquet"))[:max_files]
    table = pq.read_table(files, columns=list(COLUMNS))
    y = table["label"].to_numpy().astype(np.int64)
    interest = cate_interest[table["item_cate"].to_numpy()][:, None]  # (N, 1)
    st, st_mask = _padded(table, "st_tgt_cates")
    ll, ll_mask = _padded(table, "ll_cates")
    ctx, _ = _padded(table, "ll_ctx")
    match = (cate_interest[ll] == interest) & ll_mask
    engaged_nb = _window_mean(ctx, ll_mask, window) >= 2.5
    x = np.stack([((cate_interest[st] == interest) & st_mask).sum(1), match.sum(1),
                  (match & (ctx >= 3)).sum(1), (match & engaged_nb).sum(1)], axis=1).astype(float)
    return x, y


def effect_aucs(path: str | Path, window: int = 3, max_train_files: int | None = 2) -> dict[str, float]:
    """Test AUC of a logistic regression on the first 1, 2, 3, 4 counts (``ROWS``) of a synthetic dataset."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from raylsm.data.synth import SynthConfig, build_world

    manifest = read_manifest(path)
    params = (manifest.source or {}).get("params")
    if not params or (manifest.source or {}).get("generator") != "raylsm.data.synth":
        raise ValueError(f"{path}: not written by raylsm data synth (the hidden interests are unknown)")
    names = {f.name for f in dataclasses.fields(SynthConfig)}
    cfg = SynthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names})
    cate_interest = build_world(cfg).cate_interest
    x_train, y_train = counts(path, "train", cate_interest, window, max_train_files)
    x_test, y_test = counts(path, "test", cate_interest, window)
    out = {}
    for i, name in enumerate(ROWS, start=1):
        features = np.concatenate([x_train[:, :i], np.log1p(x_train[:, :i])], axis=1)
        model = LogisticRegression(max_iter=2000).fit(features, y_train)
        test = np.concatenate([x_test[:, :i], np.log1p(x_test[:, :i])], axis=1)
        out[name] = float(roc_auc_score(y_test, model.predict_proba(test)[:, 1]))
    return out

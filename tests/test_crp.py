"""CRP (LCN §4.1): eqs. 3-6 against a hand computation, sampling rules, edge cases, gradients."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from raylsm.models.config import CRPConfig
from raylsm.models.crp import CRP, PairSample, pair_loss

TAU = 0.1


def left_mask(lengths: list[int], s: int) -> torch.Tensor:
    return torch.arange(s)[None, :] >= (s - torch.tensor(lengths))[:, None]


def long(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


def hand_loss(x1: np.ndarray, x2: np.ndarray, p: PairSample, tau: float, with_positive: bool = False) -> float:
    """Eq. (3)/(4)/(5) with explicit loops: mean over eligible rows of -log(exp(pos/τ) / Σ_valid-neg exp(neg/τ))."""

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    denom = 0.0
    for j in range(len(p.neg_valid)):
        if p.neg_valid[j]:
            a = x1[int(p.neg_row1[j]), int(p.neg_pos1[j])]
            b = x2[int(p.neg_row2[j]), int(p.neg_pos2[j])]
            denom += math.exp(cos(a, b) / tau)
    terms = []
    for i in range(len(p.pos_valid)):
        if p.pos_valid[i]:
            num = math.exp(cos(x1[i, int(p.pos1[i])], x2[i, int(p.pos2[i])]) / tau)
            terms.append(-math.log(num / (denom + (num if with_positive else 0.0))))
    return sum(terms) / len(terms) if terms and denom > 0 else 0.0


@pytest.fixture
def tiny():
    g = torch.Generator().manual_seed(0)
    tgt = torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    src = torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    samples = {
        # row 2 excluded; negatives j=2 is a same-user pair (invalid)
        "pt": PairSample(long(1, 2, 0), long(2, 1, 1), torch.tensor([True, True, False]),
                         long(0, 1, 2, 2), long(1, 2, 0, 2), long(1, 2, 2, 0), long(2, 0, 1, 1),
                         torch.tensor([True, True, False, True])),
        "ps": PairSample(long(0, 2, 1), long(1, 0, 2), torch.tensor([True, True, True]),
                         long(0, 2, 1), long(0, 1, 2), long(2, 0, 0), long(1, 1, 0),
                         torch.tensor([True, True, True])),
        "pc": PairSample(long(2, 0, 1), long(0, 2, 2), torch.tensor([False, True, True]),
                         long(1, 0), long(0, 2), long(2, 1), long(1, 1),
                         torch.tensor([True, True])),
    }
    return tgt, src, samples


@pytest.mark.parametrize("denominator", ["negatives", "with_positive"])
def test_pair_loss_equals_hand_computation(tiny, denominator):
    tgt, src, samples = tiny
    crp = CRP(CRPConfig(enabled=True, tau=TAU, denominator=denominator))
    wp = denominator == "with_positive"
    got = crp.losses(tgt, src, samples)
    t, s = tgt.numpy(), src.numpy()
    want = {
        "pt": hand_loss(t, t, samples["pt"], TAU, wp),
        "ps": hand_loss(s, s, samples["ps"], TAU, wp),
        "pc": hand_loss(t, s, samples["pc"], TAU, wp),
    }
    for k in ("pt", "ps", "pc"):
        assert got[k].item() == pytest.approx(want[k], rel=1e-10, abs=1e-10), k
        assert want[k] != 0.0


def test_lambda_weights_combine_as_eq6(tiny):
    tgt, src, samples = tiny
    crp = CRP(CRPConfig(enabled=True, tau=TAU, lambda_pt=0.5, lambda_ps=2.0, lambda_pc=3.0))
    parts = crp.losses(tgt, src, samples)
    want = 0.5 * parts["pt"] + 2.0 * parts["ps"] + 3.0 * parts["pc"]
    torch.testing.assert_close(crp.combine(parts), want)
    # forward = sample (global RNG) + losses + combine
    b = 6
    g = torch.Generator().manual_seed(3)
    x_t, x_s = torch.randn(b, 5, 4, generator=g), torch.randn(b, 5, 4, generator=g)
    mt, ms = left_mask([5, 3, 2, 1, 4, 0], 5), left_mask([0, 2, 5, 3, 1, 4], 5)
    uid = long(1, 2, 3, 4, 5, 6)
    crp.m = 64
    torch.manual_seed(7)
    out = crp(x_t, mt, x_s, ms, uid)
    torch.manual_seed(7)
    parts = crp.losses(x_t, x_s, crp.sample(mt, ms, uid))
    torch.testing.assert_close(out, 0.5 * parts["pt"] + 2.0 * parts["ps"] + 3.0 * parts["pc"])


def test_sampling_rules():
    """Positives: same row, right domains, distinct positions for PT/PS; negatives: different users, valid items."""
    s = 5
    mt = left_mask([5, 1, 3, 0, 2, 4], s)  # rows 1, 3 lack a PT pair
    ms = left_mask([2, 4, 0, 1, 5, 3], s)  # rows 2, 3 lack a PS pair; row 2, 3 lack PC
    ms[4, 4] = False  # holes are fine too (mask need not be contiguous)
    uid = long(7, 7, 8, 8, 9, 9)  # pairs of rows share a user
    crp = CRP(CRPConfig(enabled=True, m=512))
    torch.manual_seed(0)
    samples = crp.sample(mt, ms, uid)
    assert samples["pt"].pos_valid.tolist() == [True, False, True, False, True, True]
    assert samples["ps"].pos_valid.tolist() == [True, True, False, False, True, True]
    assert samples["pc"].pos_valid.tolist() == [True, True, False, False, True, True]
    for name, (m1, m2) in {"pt": (mt, mt), "ps": (ms, ms), "pc": (mt, ms)}.items():
        p = samples[name]
        rows = p.pos_valid.nonzero().squeeze(-1)
        assert m1[rows, p.pos1[rows]].all() and m2[rows, p.pos2[rows]].all(), name
        if name != "pc":
            assert (p.pos1[rows] != p.pos2[rows]).all(), name
        assert p.neg_row1.shape == (512,)
        ok = m1[p.neg_row1, p.neg_pos1] & m2[p.neg_row2, p.neg_pos2] & (uid[p.neg_row1] != uid[p.neg_row2])
        assert torch.equal(p.neg_valid, ok), name
        # each side uniform over the batch's valid items: P(same user) = Σ_u n1_u n2_u / (N1 N2)
        n1 = torch.stack([m1[uid == u].sum() for u in (7, 8, 9)]).double()
        n2 = torch.stack([m2[uid == u].sum() for u in (7, 8, 9)]).double()
        p_diff = 1 - (n1 * n2).sum() / (n1.sum() * n2.sum())
        assert abs(p.neg_valid.double().mean() - p_diff) < 0.07, name
        # every drawn item is a real behaviour of its domain; same-user draws exist and are masked out
        assert m1[p.neg_row1, p.neg_pos1].all() and m2[p.neg_row2, p.neg_pos2].all(), name
        assert (uid[p.neg_row1] == uid[p.neg_row2]).any() and not (
            p.neg_valid & (uid[p.neg_row1] == uid[p.neg_row2])
        ).any()


def test_positive_sampling_is_uniform():
    mt = left_mask([4], 6).repeat(4000, 1)  # 4 valid positions of 6
    crp = CRP(CRPConfig(enabled=True, m=8))
    torch.manual_seed(1)
    p = crp.sample(mt, mt, torch.arange(4000))["pt"]
    pairs = torch.stack([p.pos1, p.pos2], 1)
    counts = torch.bincount(pairs[:, 0] * 6 + pairs[:, 1], minlength=36).view(6, 6)
    ordered = counts[2:, 2:]  # 12 ordered pairs of distinct valid positions
    assert counts.sum() == ordered.sum() and ordered.diagonal().sum() == 0
    off = ordered[~torch.eye(4, dtype=torch.bool)].float()
    assert ((off - 4000 / 12).abs() < 80).all()  # ~4.5 sigma


def test_rows_without_items_are_excluded(tiny):
    tgt, src, samples = tiny
    p = samples["pt"]
    base = pair_loss(tgt, tgt, p, TAU)
    # changing the positive of an excluded row changes nothing
    p2 = dataclasses.replace(p, pos1=long(1, 2, 2), pos2=long(2, 1, 0))
    torch.testing.assert_close(pair_loss(tgt, tgt, p2, TAU), base)


def test_no_eligible_rows_or_negatives_is_zero_and_finite():
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = torch.randn(4, 3, 5, requires_grad=True)
    crp = CRP(CRPConfig(enabled=True, m=32))
    uid = long(1, 2, 3, 4)
    # PT/PS impossible (at most 1 item per row); PC has eligible rows.
    mt, ms = left_mask([1, 0, 1, 1], 3), left_mask([1, 1, 0, 1], 3)
    parts = crp.losses(x, y, crp.sample(mt, ms, uid))
    assert parts["pt"].item() == 0.0 and parts["ps"].item() == 0.0
    assert torch.isfinite(parts["pc"]) and parts["pc"].item() != 0.0
    # everything padding: all three terms 0
    empty = torch.zeros(4, 3, dtype=torch.bool)
    loss = crp(x, empty, y, empty, uid)
    assert loss.item() == 0.0
    # one user only: no valid negative, all terms 0, gradients finite
    full = torch.ones(4, 3, dtype=torch.bool)
    loss = crp(x, full, y, full, long(5, 5, 5, 5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # sequences of length 1
    crp(x[:, :1], full[:, :1], y[:, :1], full[:, :1], uid).backward()


def test_gradients_flow_to_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 8, generator=g)
    y = torch.randn(6, 4, 8, generator=g)
    mt, ms = left_mask([4, 3, 2, 1, 0, 4], 4), left_mask([2, 4, 4, 0, 3, 1], 4)
    x = (x * mt.unsqueeze(-1)).requires_grad_(True)  # padding embeds to zeros, as in the model
    y = (y * ms.unsqueeze(-1)).requires_grad_(True)
    torch.manual_seed(0)
    loss = CRP(CRPConfig(enabled=True, m=128))(x, mt, y, ms, long(1, 2, 3, 4, 5, 6))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad[mt].abs().sum() > 0 and y.grad[ms].abs().sum() > 0


def test_device_agnostic_meta():
    """Sampling and loss create nothing on CPU: the whole pass runs on the meta device."""
    x = torch.randn(4, 3, 5, device="meta")
    m = torch.ones(4, 3, dtype=torch.bool, device="meta")
    loss = CRP(CRPConfig(enabled=True, m=16))(x, m, x, m, torch.arange(4, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()

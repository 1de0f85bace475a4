"""LAP (LCN §4.2): shapes, masks, equivalence with loop references, gradients, device agnosticism."""

from __future__ import annotations

import math

import pytest
import torch

from raylsm.models.config import LapConfig
from raylsm.models.lap import LAP

B, L, DQ, DS, DC = 4, 12, 6, 8, 4
HEADS, D, F = 2, 8, 16


PAPER = {"pooling": "softmax", "fsa": "per_item"}  # the reading the equation tests below spell out


def make_lap(k1: int = 6, k2: int = 3, query_dim: int = DQ, seed: int = 0, reading: dict | None = None) -> LAP:
    torch.manual_seed(seed)
    cfg = LapConfig(k1=k1, k2=k2, heads=HEADS, att_dim=D, ffn_dim=F, **(PAPER if reading is None else reading))
    return LAP(cfg, query_dim, DS, DC)


def left_mask(lengths: list[int], n: int = L) -> torch.Tensor:
    return torch.arange(n)[None, :] >= (n - torch.tensor(lengths))[:, None]  # (B, n), left-padded


def inputs(lengths: list[int], query_dim: int = DQ, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = left_mask(lengths)
    query = torch.randn(len(lengths), query_dim, generator=g)
    seq = torch.randn(len(lengths), L, DS, generator=g) * mask.unsqueeze(-1)  # padding embeds to zeros
    ctx = torch.randn(len(lengths), L, DC, generator=g) * mask.unsqueeze(-1)
    return query, seq, ctx, mask


def reference(lap: LAP, query, seq, ctx, mask) -> torch.Tensor:
    """Per-row loop over the real behaviours, ranking by explicit sort: an independent reading of eqs. 7-13."""
    outs = []
    for i in range(seq.shape[0]):
        pos = mask[i].nonzero().squeeze(-1)
        e_h, e_c, e_v = seq[i, pos], ctx[i, pos], query[i]
        if len(pos) == 0:
            outs.append(torch.zeros(lap.out_dim))
            continue
        # CSA over every real behaviour.
        r = e_h @ lap.csa_query(e_v) / lap.csa_temperature
        scale = {"sum": 1.0, "sum_scaled": 1.0 / L}.get(lap.pooling)
        pool = (lambda x: torch.softmax(x, 0)) if lap.pooling == "softmax" else (lambda x: x * scale)
        ir_csa = pool(r) @ e_h
        keep1 = torch.argsort(r, descending=True)[: lap.k1]
        kv = torch.cat([e_h, e_c], -1)[keep1]
        # MSA over the K1 kept.
        r_msa = lap.msa_k(kv) @ lap.msa_q(e_v) / math.sqrt(D)
        if lap.pooling == "sum_scaled":
            scale = 1.0 / min(lap.k1, L)
        ir_msa = pool(r_msa) @ lap.msa_v(kv)
        kv = kv[torch.argsort(r_msa, descending=True)[: lap.k2]]
        # FSA: per item and head, weight * value; heads concatenated; FFN per item; mean.
        if lap.fsa == "per_head":  # one H_h per head (eq. 11), FFN on the concatenation (eq. 12)
            heads = []
            for h in range(HEADS):
                sl = slice(h * D, (h + 1) * D)
                q_h = lap.fsa_q.weight[sl] @ e_v
                logits = torch.stack([q_h @ (lap.fsa_k.weight[sl] @ kv[j]) for j in range(kv.shape[0])]) / math.sqrt(D)
                heads.append(torch.softmax(logits, 0) @ (kv @ lap.fsa_v.weight[sl].T))
            outs.append(torch.cat([ir_csa, ir_msa, lap.ffn(torch.cat(heads))]))
            continue
        per_item = []
        for k in range(kv.shape[0]):
            heads = []
            for h in range(HEADS):
                sl = slice(h * D, (h + 1) * D)
                q_h = lap.fsa_q.weight[sl] @ e_v
                logits = torch.stack([q_h @ (lap.fsa_k.weight[sl] @ kv[j]) for j in range(kv.shape[0])]) / math.sqrt(D)
                heads.append(torch.softmax(logits, 0)[k] * (lap.fsa_v.weight[sl] @ kv[k]))
            per_item.append(lap.ffn(torch.cat(heads)))
        ir_fsa = torch.stack(per_item).mean(0)
        outs.append(torch.cat([ir_csa, ir_msa, ir_fsa]))
    return torch.stack(outs)


@pytest.mark.parametrize("reading", [
    {"pooling": "sum", "fsa": "per_head"}, {"pooling": "sum", "fsa": "per_item", "csa_temperature": 0.5},
    {"pooling": "softmax", "fsa": "per_head", "csa_temperature": 2.0}, {"pooling": "sum_scaled"}, {},
])
def test_every_reading_matches_the_loop_reference(reading):
    lap = make_lap(reading=reading)  # {} = the config defaults
    query, seq, ctx, mask = inputs([12, 9, 4, 1])
    with torch.no_grad():
        torch.testing.assert_close(lap(query, seq, ctx, mask), reference(lap, query, seq, ctx, mask))


def test_sum_pooling_keeps_how_many_match():
    # Softmax pooling of a candidate matched by 1 or by 5 identical behaviours gives the same IR_CSA;
    # the raw-score sum (eq. 8 as printed) grows with the count.
    q = torch.ones(2, DS)
    seq = torch.zeros(2, L, DS)
    seq[0, -1] = 1.0
    seq[1, -5:] = 1.0
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, -1] = True
    mask[1, -5:] = True
    ctx = torch.zeros(2, L, DC)
    soft = make_lap(query_dim=DS, reading={"pooling": "softmax"}).levels(q, seq, ctx, mask).ir_csa
    summed = make_lap(query_dim=DS, reading={"pooling": "sum"}).levels(q, seq, ctx, mask).ir_csa
    torch.testing.assert_close(soft[0], soft[1])
    torch.testing.assert_close(summed[1], 5 * summed[0])


def test_shapes_and_out_dim():
    lap = make_lap()
    query, seq, ctx, mask = inputs([12, 7, 3, 0])
    out = lap(query, seq, ctx, mask)
    assert lap.out_dim == DS + D + HEADS * D
    assert out.shape == (B, lap.out_dim)
    lv = lap.levels(query, seq, ctx, mask)
    assert lv.csa_scores.shape == (B, L)
    assert lv.csa_idx.shape == lv.csa_mask.shape == lv.msa_scores.shape == (B, 6)
    assert lv.msa_idx.shape == lv.fsa_idx.shape == lv.fsa_mask.shape == (B, 3)
    assert lv.fsa_weights.shape == (B, HEADS, 3)
    assert lv.fsa_items.shape == (B, 3, HEADS * D)


def test_query_projection_identity_when_dims_equal():
    assert isinstance(make_lap(query_dim=DS).csa_query, torch.nn.Identity)
    proj = make_lap(query_dim=DQ).csa_query
    assert isinstance(proj, torch.nn.Linear) and proj.bias is None


@pytest.mark.parametrize("query_dim", [DQ, DS])
def test_k_equals_l_is_full_attention(query_dim):
    lap = make_lap(k1=L, k2=L, query_dim=query_dim)
    query, seq, ctx, mask = inputs([12, 9, 4, 1], query_dim=query_dim)
    with torch.no_grad():
        out = lap(query, seq, ctx, mask)
        # CSA over everything: softmax-weighted sum over all valid positions, no top-K involved.
        r = (seq * lap.csa_query(query).unsqueeze(1)).sum(-1).masked_fill(~mask, -math.inf)
        ir_csa = (torch.softmax(r, -1).unsqueeze(-1) * seq).sum(1)
        torch.testing.assert_close(out[:, :DS], ir_csa)
        torch.testing.assert_close(out, reference(lap, query, seq, ctx, mask))


def test_topk_pipeline_matches_sorted_reference():
    lap = make_lap(k1=5, k2=3)
    query, seq, ctx, mask = inputs([12, 8, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(lap(query, seq, ctx, mask), reference(lap, query, seq, ctx, mask))


def test_selection_ranks_by_raw_scores():
    lap = make_lap(k1=5, k2=3)
    query, seq, ctx, mask = inputs([12, 8, 4, 2])
    lv = lap.levels(query, seq, ctx, mask)
    for i in range(B):
        n = int(mask[i].sum())
        valid = mask[i].nonzero().squeeze(-1)
        best = valid[torch.argsort(lv.csa_scores[i, valid], descending=True)[:5]]
        assert set(lv.csa_idx[i][lv.csa_mask[i]].tolist()) == set(best.tolist())
        assert int(lv.csa_mask[i].sum()) == min(n, 5)
        assert int(lv.fsa_mask[i].sum()) == min(n, 3)
        # the K2 are the best r^msa among the valid K1, and map back to real positions
        ok1 = lv.csa_mask[i].nonzero().squeeze(-1)
        best2 = ok1[torch.argsort(lv.msa_scores[i, ok1], descending=True)[:3]]
        assert set(lv.msa_idx[i][lv.fsa_mask[i]].tolist()) == set(best2.tolist())
        assert mask[i, lv.fsa_idx[i][lv.fsa_mask[i]]].all()


def test_padding_invariance():
    lap = make_lap(k1=5, k2=3)
    query, seq, ctx, mask = inputs([12, 8, 4, 0])
    out = lap(query, seq, ctx, mask)
    pad = (~mask).unsqueeze(-1)
    seq2 = torch.where(pad, 100 * torch.randn_like(seq), seq)
    ctx2 = torch.where(pad, 100 * torch.randn_like(ctx), ctx)
    torch.testing.assert_close(lap(query, seq2, ctx2, mask), out)


def test_short_and_empty_rows_are_finite():
    lap = make_lap(k1=6, k2=4)
    query, seq, ctx, mask = inputs([0, 1, 2, 5])  # all fewer than K1, some fewer than K2, one all-padding
    lv = lap.levels(query, seq, ctx, mask)
    out = lap(query, seq, ctx, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(lap.out_dim))
    assert lv.csa_mask.sum(1).tolist() == [0, 1, 2, 5]
    assert lv.fsa_mask.sum(1).tolist() == [0, 1, 2, 4]
    # padding never gets weight, at any level
    assert (lv.fsa_weights * ~lv.fsa_mask.unsqueeze(1) == 0).all()
    torch.testing.assert_close(lv.fsa_weights.sum(-1)[1:], torch.ones(3, HEADS))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in lap.parameters() if p.grad is not None)


def test_eq13_mean_over_valid_items_only():
    lap = make_lap(k1=6, k2=4)
    query, seq, ctx, mask = inputs([12, 2, 3, 4])
    with torch.no_grad():
        lv = lap.levels(query, seq, ctx, mask)
        for i in range(B):
            valid_items = lv.fsa_items[i][lv.fsa_mask[i]]
            torch.testing.assert_close(lv.ir_fsa[i], valid_items.sum(0) / valid_items.shape[0])
        # row 1 has 2 valid of K2 = 4 slots: a mean over all slots would differ
        assert not torch.allclose(lv.ir_fsa[1], lv.fsa_items[1].mean(0))


def test_every_level_gets_gradient():
    lap = make_lap(k1=5, k2=3)
    query, seq, ctx, mask = inputs([12, 8, 4, 2])
    for t in (query, seq, ctx):
        t.requires_grad_(True)
    lv = lap.levels(query, seq, ctx, mask)
    out = lap(query, seq, ctx, mask)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in lap.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (query, seq, ctx):
        assert t.grad.abs().sum() > 0
    assert (seq.grad[~mask] == 0).all() and (ctx.grad[~mask] == 0).all()
    for idx in (lv.csa_idx, lv.msa_idx, lv.fsa_idx):
        assert idx.dtype == torch.long and not idx.requires_grad
    # each level separately reaches the inputs it reads
    for part, params in (
        (lv.ir_csa, [query]),
        (lv.ir_msa, [lap.msa_q.weight, lap.msa_k.weight, lap.msa_v.weight, ctx]),
        (lv.ir_fsa, [lap.fsa_q.weight, lap.fsa_k.weight, lap.fsa_v.weight, lap.ffn[0].weight, ctx]),
    ):
        grads = torch.autograd.grad((part * torch.randn_like(part)).sum(), params, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)


def test_xavier_init():
    lap = make_lap()
    for m in lap.modules():
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound
            if m.bias is not None:
                assert (m.bias == 0).all()


def test_device_agnostic_meta():
    """No tensor is created on CPU inside forward: the whole pass runs on the meta device."""
    lap = make_lap(k1=5, k2=3).to("meta")
    query, seq, ctx, mask = (t.to("meta") for t in inputs([12, 8, 4, 0]))
    lv = lap.levels(query, seq, ctx, mask)
    out = lap(query, seq, ctx, mask)
    assert out.device.type == "meta" and out.shape == (B, lap.out_dim)
    assert lv.fsa_idx.device.type == "meta"


def test_score_grad_adds_the_lower_levels_scores_and_trains_the_ranking():
    """score_grad = msa: r^msa_k + r_k and s_hk + r^msa_k on the kept items; off, CSA's scores get no gradient from above."""
    query, seq, ctx, mask = inputs([10, 7, 3])
    on, off = make_lap(reading={"score_grad": "msa"}), make_lap()
    lv_on, lv_off = on.levels(query, seq, ctx, mask), off.levels(query, seq, ctx, mask)
    torch.testing.assert_close(lv_on.csa_idx, lv_off.csa_idx)  # same CSA ranking (same weights)
    kept_csa = torch.gather(lv_off.csa_scores, 1, lv_off.csa_idx)  # (B, K1)
    valid = lv_off.csa_mask
    torch.testing.assert_close(lv_on.msa_scores[valid], (lv_off.msa_scores + kept_csa)[valid])
    # The gradient of FSA's output reaches the CSA scores only with the mechanism on.
    for lap, reaches in ((on, True), (off, False)):
        lv = lap.levels(query, seq.clone().requires_grad_(True), ctx, mask)
        (g,) = torch.autograd.grad(lv.ir_fsa.sum(), lv.csa_scores, allow_unused=True)
        assert (g is not None and bool(g.abs().sum() > 0)) == reaches


def test_head_products_add_the_candidate_times_each_short_term_interest(small_vocab, batch_factory):
    from raylsm.models.ctr import build_model
    from raylsm.models.registry import preset_config

    small = {"features": {"emb_dim": 4}, "lap": {"k1": 8, "k2": 4, "att_dim": 4, "ffn_dim": 8}}
    on = build_model(preset_config("lap", small), small_vocab)
    off = build_model(preset_config("lap", {**small, "head_products": False}), small_vocab)
    # The head reads 2 × 2D more inputs: cand ⊙ st_tgt interest and cand ⊙ st_src interest (D = 4).
    assert on.head[0].in_features == off.head[0].in_features + 2 * 2 * 4
    batch = batch_factory(b=5)
    on.eval()
    logits, _ = on(batch)
    assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_match_counts_are_the_log_counts_of_the_candidates_category_and_item_per_sequence(small_vocab, batch_factory):
    from raylsm.models.ctr import build_model, match_counts
    from raylsm.models.registry import preset_config

    batch = batch_factory(b=3, s=6, l=40, st_lengths=[4, 6, 0], ll_lengths=[40, 10, 0])
    cate, item = batch["item_cate"][0], batch["item_id"][0]
    for name in ("st_tgt_cates", "st_src_cates", "ll_cates"):
        batch[name][0] = 1 if cate != 1 else 2  # nothing matches in row 0 but what is set below
    for name in ("st_tgt_items", "st_src_items", "ll_items"):
        batch[name][0] = 1 if item != 1 else 2
    batch["st_tgt_cates"][0, -3:] = cate  # 3 real behaviours of the candidate's category
    batch["st_tgt_items"][0, -1] = item  # one of them the candidate itself
    batch["st_tgt_cates"][0, 0] = cate  # padding (row 0 has 4 real of 6): never counted
    batch["ll_cates"][0, -7:] = cate
    batch["ll_items"][0, -2:] = item
    counts = match_counts(batch)
    assert counts.shape == (3, 6)
    # (st_tgt cate, st_tgt item, st_src cate, st_src item, ll cate, ll item)
    torch.testing.assert_close(counts[0], torch.log1p(torch.tensor([3.0, 1.0, 0.0, 0.0, 7.0, 2.0])))
    assert counts[2].eq(0).all()  # an empty history counts nothing
    small = {"features": {"emb_dim": 4}, "lap": {"k1": 8, "k2": 4, "att_dim": 4, "ffn_dim": 8}}
    on = build_model(preset_config("lap", small), small_vocab)
    off = build_model(preset_config("lap", {**small, "match_counts": False}), small_vocab)
    assert on.head[0].in_features == off.head[0].in_features + 6
    # The head's last 6 inputs are the counts with the mechanism on; off, the head reads the rest only.
    seen = {}
    for net in (on, off):
        net.eval()
        net.head.register_forward_pre_hook(lambda m, args, net=net: seen.__setitem__(id(net), args[0]))
        with torch.no_grad():
            net(batch)
    torch.testing.assert_close(seen[id(on)][:, -6:], counts)
    assert seen[id(on)].shape[1] == seen[id(off)].shape[1] + 6
    assert not off.cfg.match_counts and preset_config("lcn_paper").match_counts is False
    assert preset_config("cain_paper").match_counts is False and preset_config("lap").match_counts is True
    # Scope short_term: the head reads the short-term sequences' 4 counts; the lifelong sequence's 2 are left out.
    short = build_model(preset_config("lap", {**small, "match_counts_scope": "short_term"}), small_vocab)
    assert short.head[0].in_features == off.head[0].in_features + 4
    short.eval()
    short.head.register_forward_pre_hook(lambda m, args: seen.__setitem__("short", args[0]))
    with torch.no_grad():
        short(batch)
    torch.testing.assert_close(seen["short"][:, -4:], counts[:, :4])
    torch.testing.assert_close(match_counts(batch, 2), counts[:, :4])
    assert preset_config("lap").match_counts_scope == "all"


def test_short_term_sum_scaled_keeps_how_many_match():
    from raylsm.models.layers import DotTargetAttention

    torch.manual_seed(0)
    att = DotTargetAttention(4, 4, pooling="sum_scaled")
    q = torch.randn(1, 4)
    one = torch.zeros(1, 6, 4)
    one[0, -1] = q[0]
    three = torch.zeros(1, 6, 4)
    three[0, -3:] = q[0]
    mask = torch.ones(1, 6, dtype=torch.bool)
    # Three matching behaviours give three times the interest of one; a softmax mean gives the same vector.
    torch.testing.assert_close(att(q, three, mask), 3 * att(q, one, mask))
    soft = DotTargetAttention(4, 4)
    soft.proj.weight.data.copy_(att.proj.weight.data)
    m1, m3 = torch.zeros(1, 6, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool)
    m1[0, -1:] = True
    m3[0, -3:] = True
    torch.testing.assert_close(soft(q, three, m3), soft(q, one, m1))

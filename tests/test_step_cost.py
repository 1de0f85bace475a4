"""Cheaper steps: each reformulation against a straightforward reference.

* CRP (LCN §4.1): the batched pass (three pair types at once) against the per-type code it
  replaced, copied below as the reference: same pairs for a seed, same loss and gradients; on
  explicit samples; inside the model; and at most half the aten calls.
* PEG ``filters=depthwise`` (CAIN eqs. 10–12 with a depthwise-separable personal filter): shapes,
  parameter counts, init scale, eq. 12 equal to a per-user loop with the effective filter.
* Embedding backward by ``index_add`` and fused Adam: the same gradients and steps as
  ``nn.Embedding`` and the default Adam loop.
* Autocast: each embedding sequence is cast to bf16 once in the forward and its gradient once in
  the backward (the TCN keeps bf16 between layers); fp32 runs cast no activation.

All on the CPU, tiny sizes, fixed seeds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from raylsm.config import ConfigError
from raylsm.models import layers
from raylsm.models.ctr import build_model
from raylsm.models.registry import preset_config
from raylsm.models.cain import ContextEncoder, FilterGenerator, TCNLayer, window_padding
from raylsm.models.config import CRPConfig, PEGConfig
from raylsm.models.crp import CRP, PairSample
from raylsm.models.layers import embed
from raylsm.train.optim import build_optimizer
from tests.conftest import SMALL_VOCAB, make_batch

TYPES = ("pt", "ps", "pc")

# ----------------------------------------------------------------------------- reference CRP (the per-type code)


def ref_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1, eps=1e-8) * F.normalize(b, dim=-1, eps=1e-8)).sum(-1)


def ref_pair_loss(x1, x2, p: PairSample, tau: float, with_positive: bool) -> torch.Tensor:
    """Eq. (3)/(4)/(5) for one type: four gathers, two cosines."""
    rows = torch.arange(x1.shape[0])
    pos = ref_cosine(x1[rows, p.pos1], x2[rows, p.pos2]) / tau
    neg = ref_cosine(x1[p.neg_row1, p.neg_pos1], x2[p.neg_row2, p.neg_pos2]) / tau
    has_neg = p.neg_valid.any()
    neg = torch.where(has_neg, neg.masked_fill(~p.neg_valid, float("-inf")), torch.zeros_like(neg))
    log_den = torch.logsumexp(neg, dim=0)
    if with_positive:
        log_den = torch.logaddexp(log_den, pos)
    per_row = -(pos - log_den)
    w = p.pos_valid.to(per_row.dtype)
    loss = (per_row * w).sum() / w.sum().clamp_min(1.0)
    return torch.where(has_neg, loss, torch.zeros_like(loss))


def ref_two_distinct(mask):
    b, s = mask.shape
    eligible = mask.sum(1) >= 2
    if s < 2:
        zero = torch.zeros(b, dtype=torch.long)
        return zero, zero, eligible
    idx = torch.topk(torch.rand(mask.shape).masked_fill(~mask, -1.0), 2, dim=1).indices
    return idx[:, 0], idx[:, 1], eligible


def ref_one(mask):
    return torch.rand(mask.shape).masked_fill(~mask, -1.0).argmax(1), mask.any(1)


def ref_items(mask, m):
    s = mask.shape[1]
    w = mask.reshape(-1).to(torch.float32)
    flat = torch.multinomial(w + (w.sum() == 0).to(w.dtype), m, replacement=True)
    return flat // s, flat % s


def ref_sample_pairs(mask1, mask2, uid, m, same_seq) -> PairSample:
    if same_seq:
        pos1, pos2, pos_valid = ref_two_distinct(mask1)
    else:
        (pos1, any1), (pos2, any2) = ref_one(mask1), ref_one(mask2)
        pos_valid = any1 & any2
    row1, p1 = ref_items(mask1, m)
    row2, p2 = ref_items(mask2, m)
    neg_valid = mask1[row1, p1] & mask2[row2, p2] & (uid[row1] != uid[row2])
    return PairSample(pos1, pos2, pos_valid, row1, p1, row2, p2, neg_valid)


def ref_crp(cfg: CRPConfig, st_tgt, tgt_mask, st_src, src_mask, uid):
    """L_CRP (eq. 6) the per-type way: sample PT, PS, PC in turn, one loss each."""
    samples = {
        "pt": ref_sample_pairs(tgt_mask, tgt_mask, uid, cfg.m, True),
        "ps": ref_sample_pairs(src_mask, src_mask, uid, cfg.m, True),
        "pc": ref_sample_pairs(tgt_mask, src_mask, uid, cfg.m, False),
    }
    wp = cfg.denominator == "with_positive"
    xs = {"pt": (st_tgt, st_tgt), "ps": (st_src, st_src), "pc": (st_tgt, st_src)}
    losses = {t: ref_pair_loss(*xs[t], samples[t], cfg.tau, wp) for t in TYPES}
    lambdas = {"pt": cfg.lambda_pt, "ps": cfg.lambda_ps, "pc": cfg.lambda_pc}
    return sum(lambdas[t] * losses[t] for t in TYPES), samples, losses


def crp_inputs(s_t: int, s_s: int, b: int = 12, d: int = 6):
    g = torch.Generator().manual_seed(4)
    st_tgt = torch.randn(b, s_t, d, generator=g, dtype=torch.float64)
    st_src = torch.randn(b, s_s, d, generator=g, dtype=torch.float64)
    tgt_mask = torch.rand(b, s_t, generator=g) > 0.35  # holes anywhere; some rows empty or with one item
    src_mask = torch.rand(b, s_s, generator=g) > 0.45
    tgt_mask[0] = False
    src_mask[1, :] = False
    src_mask[2, :] = False
    src_mask[2, 0] = True
    uid = torch.tensor([1, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7, 8])[:b]  # repeated users: same-user negatives occur
    return st_tgt, tgt_mask, st_src, src_mask, uid


@pytest.mark.parametrize("denominator", ["negatives", "with_positive"])
@pytest.mark.parametrize("s_t,s_s", [(6, 6), (7, 4), (1, 5)])
def test_batched_crp_equals_the_per_type_reference(denominator, s_t, s_s):
    """Same seed -> same pairs, same L_CRP, same gradients (float64, float tolerance).

    The batched sampler makes the reference's random calls in the same order; its two M-draws of
    one type are one 2M-draw, the same numbers on torch's CPU generator.
    """
    cfg = CRPConfig(enabled=True, m=64, denominator=denominator, lambda_ps=0.5, lambda_pc=2.0)
    st_tgt, tgt_mask, st_src, src_mask, uid = crp_inputs(s_t, s_s)
    x_t, x_s = st_tgt.clone().requires_grad_(), st_src.clone().requires_grad_()
    torch.manual_seed(11)
    want, ref_samples, _ = ref_crp(cfg, x_t, tgt_mask, x_s, src_mask, uid)
    want.backward()
    y_t, y_s = st_tgt.clone().requires_grad_(), st_src.clone().requires_grad_()
    crp = CRP(cfg)
    torch.manual_seed(11)
    got = crp(y_t, tgt_mask, y_s, src_mask, uid)
    got.backward()
    assert want.item() != 0.0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_t.grad, x_t.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y_s.grad, x_s.grad, rtol=1e-10, atol=1e-12)
    torch.manual_seed(11)
    samples = crp.sample(tgt_mask, src_mask, uid)
    for t in TYPES:
        for field in PairSample.__dataclass_fields__:
            a, b = getattr(samples[t], field), getattr(ref_samples[t], field)
            if field == "pos1" or field == "pos2":  # positions of ineligible rows are arbitrary
                a, b = a[ref_samples[t].pos_valid], b[ref_samples[t].pos_valid]
            assert torch.equal(a, b), (t, field)


def test_batched_losses_on_explicit_samples_equal_the_reference():
    """Explicit samples, a different M per type (padded with invalid negatives inside): eqs. 3-5 each."""
    st_tgt, tgt_mask, st_src, src_mask, uid = crp_inputs(6, 5)
    torch.manual_seed(3)
    samples = {
        "pt": ref_sample_pairs(tgt_mask, tgt_mask, uid, 40, True),
        "ps": ref_sample_pairs(src_mask, src_mask, uid, 17, True),
        "pc": ref_sample_pairs(tgt_mask, src_mask, uid, 29, False),
    }
    for denominator in ("negatives", "with_positive"):
        crp = CRP(CRPConfig(enabled=True, tau=0.3, denominator=denominator))
        got = crp.losses(st_tgt, st_src, samples)
        xs = {"pt": (st_tgt, st_tgt), "ps": (st_src, st_src), "pc": (st_tgt, st_src)}
        for t in TYPES:
            want = ref_pair_loss(*xs[t], samples[t], 0.3, denominator == "with_positive")
            torch.testing.assert_close(got[t], want, rtol=1e-12, atol=1e-12)


def test_crp_in_the_model_is_the_reference_on_its_embeddings():
    torch.manual_seed(0)
    model = build_model(preset_config("lcn", {"features": {"emb_dim": 4}, "crp": {"m": 32},
                                              "lap": {"k1": 8, "k2": 4, "att_dim": 4, "heads": 1, "ffn_dim": 8}}),
                        SMALL_VOCAB).train()
    batch = make_batch(b=8, s=5, l=20, seed=2)
    torch.manual_seed(5)
    _, aux = model(batch)
    f = model.features
    st_tgt = f.behaviour(batch["st_tgt_items"], batch["st_tgt_cates"])
    st_src = f.behaviour(batch["st_src_items"], batch["st_src_cates"])
    torch.manual_seed(5)
    want, _, _ = ref_crp(model.cfg.crp, st_tgt, batch["st_tgt_mask"], st_src, batch["st_src_mask"], batch["user_id"])
    torch.testing.assert_close(aux["crp"], want, rtol=1e-6, atol=1e-6)


class OpCount(TorchDispatchMode):
    """Counts aten calls (every call that reaches the dispatcher's Python key)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_batched_crp_makes_at_most_half_the_aten_calls():
    st_tgt, tgt_mask, st_src, src_mask, uid = crp_inputs(6, 6)
    cfg = CRPConfig(enabled=True, m=64)
    counts = []
    for run in (lambda x, y: ref_crp(cfg, x, tgt_mask, y, src_mask, uid)[0], lambda x, y: CRP(cfg)(x, tgt_mask, y, src_mask, uid)):
        x, y = st_tgt.clone().requires_grad_(), st_src.clone().requires_grad_()
        with OpCount() as c:
            run(x, y).backward()
        counts.append(c.n)
    assert counts[1] <= 0.5 * counts[0], counts  # forward + backward


# ----------------------------------------------------------------------------- PEG, filters=depthwise

IN, OUT, P = 6, 5, 4


@pytest.mark.parametrize("aggregation", ["replace", "sum", "concat"])
@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("rank", [0, 2])
def test_depthwise_peg_equals_per_user_loop_with_the_effective_filter(aggregation, stride, rank):
    """Eq. (12) with W^PC_u[c, i, τ] = W^S[c, i]·G_u[i, τ]: the batched layer equals a loop over users."""
    torch.manual_seed(0)
    peg = PEGConfig(enabled=True, hidden=5, aggregation=aggregation, rank=rank, filters="depthwise")
    layer = TCNLayer(IN, OUT, cl=2, stride=stride, peg=peg, profile_dim=P, keep_mask=stride == 1)
    with torch.no_grad():
        layer.bias.normal_()
        if layer.personal_bias is not None:
            layer.personal_bias.normal_()
    g = torch.Generator().manual_seed(1)
    b, length = 5, 17
    mask = torch.rand(b, length, generator=g) > 0.3
    x = torch.randn(b, IN, length, generator=g) * mask.unsqueeze(1)
    profile = torch.randn(b, P, generator=g)
    y, mask_out = layer(x, mask, profile)
    left, right = window_padding(length, layer.kernel, stride)
    for row in range(b):
        xp = F.pad(x[row : row + 1], (max(left, 0), right))[..., max(-left, 0) :]
        g_u = layer.generator(profile[row : row + 1])[0]  # eq. (11): (C_in, k)
        w_pc = layer.mix[:, :, None] * g_u[None]  # (C, C_in, k)
        personal = F.conv1d(xp, w_pc, stride=stride)
        if aggregation == "replace":
            ref = F.relu(personal + layer.bias[:, None])
        elif aggregation == "sum":
            ref = F.relu(F.conv1d(xp, layer.weight, stride=stride) + personal + layer.bias[:, None])
        else:
            glob = F.relu(F.conv1d(xp, layer.weight, stride=stride) + layer.bias[:, None])
            ref = layer.proj(torch.cat([glob, F.relu(personal + layer.personal_bias[:, None])], dim=1))
        torch.testing.assert_close(y[row], (ref * mask_out[row : row + 1].unsqueeze(1))[0])


def test_depthwise_peg_shapes_parameters_and_init_scale():
    c, k, h, p = 256, 15, 64, 192  # the paper's sizes: C = C_in = 4·64, cl = 7, O of size 64, 3 profile fields
    torch.manual_seed(0)
    layer = TCNLayer(c, c, cl=7, stride=1, peg=PEGConfig(enabled=True, filters="depthwise"), profile_dim=p)
    profile = torch.randn(16, p) * 0.1
    g_u = layer.generator(profile)
    assert g_u.shape == (16, c, k)
    n_params = sum(t.numel() for t in layer.parameters())
    assert n_params == (p * h + h) + (h * c * k + c * k) + c * c + c  # W^P1, b^P1, W^P2, b^P2, W^S, b_c
    full = (h * c * c * k + c * c * k) + (p * h + h) + c  # what filters=full holds (W^P2 alone 63 M)
    assert full / n_params > 150
    effective = layer.mix[None, :, :, None] * g_u[:, None]  # (B, C, C_in, k)
    xavier_std = (2.0 / (c * k + c * k)) ** 0.5
    assert 0.5 * xavier_std < effective.std().item() < 2.0 * xavier_std
    assert (g_u - g_u.mean(0)).abs().amax(0).mean() > 0.05 * g_u.std()  # personalised
    gen = FilterGenerator(p, h, 0, c, c, k)  # default: the paper's full filter
    assert gen.shape == (c, c, k)
    with pytest.raises(ConfigError, match="peg.filters"):
        preset_config("cain", {"peg": {"filters": "grouped"}})


def test_depthwise_peg_encoder_trains_and_the_preset_is_small():
    cfg = preset_config("cain", {"features": {"emb_dim": 4}, "peg": {"filters": "depthwise", "hidden": 6},
                                 "msia": {"att_dim": 4}})
    torch.manual_seed(0)
    enc = ContextEncoder(cfg, in_dim=16, query_dim=8, profile_dim=P)
    seq = torch.randn(3, 40, 16)
    mask = torch.ones(3, 40, dtype=torch.bool)
    cr, aux = enc(seq, mask, torch.randn(3, 8), torch.randn(3, P))
    (cr.sum() + aux.sum()).backward()
    for layer in enc.layers:
        assert layer.mix.grad is not None and layer.generator.fc2.weight.grad.abs().sum() > 0
    paper = preset_config("cain", {"peg": {"filters": "depthwise"}})  # emb 64: C = C_in = 256
    n = sum(t.numel() for t in build_model(paper, SMALL_VOCAB).context_encoder.parameters())
    assert n < 2_000_000  # against ~256 M for filters=full


# ----------------------------------------------------------------------------- autocast casts


class Casts(TorchDispatchMode):
    """Records floating-point dtype casts of tensors with a batch dimension (activations, not weights)."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch, self.seen = batch, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            x = args[0]
            if x.is_floating_point() and out.dtype != x.dtype and x.dim() == 3 and x.shape[0] == self.batch:
                self.seen.append(tuple(x.shape))
        return out


@pytest.mark.parametrize("name", ["lap", "lcn", "cain"])
def test_autocast_casts_each_embedding_sequence_once(name):
    """Forward: the four (B, ·, 2D) embedding sequences once each; backward: their four gradients.

    (Autocast would otherwise cast an fp32 activation again at every matmul that reads it, and the
    TCN's fp32 bias add would promote its output, so its unfolded (B, C_in·k, L) input was cast too.)
    """
    torch.manual_seed(0)
    overrides = {"features": {"emb_dim": 4}, "crp": {"m": 16}, "peg": {"hidden": 4},
                 "lap": {"k1": 8, "k2": 4, "att_dim": 4, "heads": 2, "ffn_dim": 8}}
    model = build_model(preset_config(name, overrides), SMALL_VOCAB).train()
    b, s, l = 6, 5, 24
    batch = make_batch(b=b, s=s, l=l, seed=1)
    with Casts(b) as fwd, torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"]) + sum(v.float() for v in aux.values())
    with Casts(b) as bwd:
        loss.backward()
    seqs = sorted([(b, s, 8)] * 2 + [(b, l, 8)] * 2)  # st_tgt, st_src, ll, ctx: (B, S or L, 2D)
    assert sorted(fwd.seen) == seqs
    assert sorted(bwd.seen) == seqs
    with Casts(b) as fp32:
        model(batch)
    assert fp32.seen == []


def test_tcn_keeps_the_autocast_dtype_between_layers():
    torch.manual_seed(0)
    for peg in (None, PEGConfig(enabled=True, hidden=4), PEGConfig(enabled=True, hidden=4, aggregation="concat")):
        layer = TCNLayer(IN, OUT, cl=1, stride=2, peg=peg, profile_dim=P)
        x = torch.randn(3, IN, 11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = layer(x.bfloat16(), torch.ones(3, 11, dtype=torch.bool), torch.randn(3, P))
        assert y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- embedding backward, fused Adam


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_index_add_embedding_equals_nn_embedding_with_padding(id_dtype):
    """Forward values and table gradients of ``embed`` equal ``nn.Embedding(padding_idx=0)``'s.

    The gradient arrives strided, as the half of ``[e_item ‖ e_cate]`` does; ids repeat and include padding.
    """
    torch.manual_seed(0)
    ref = torch.nn.Embedding(13, 4, padding_idx=0)
    ours = torch.nn.Embedding(13, 4, padding_idx=0)
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 13, (5, 17)).to(id_dtype)
    ids[0, :3] = 0
    upstream = torch.randn(5, 17, 8)
    out_ref, out = ref(ids.long()), embed(ours, ids)
    assert torch.equal(out, out_ref)
    (torch.cat([out_ref, out_ref * 2], -1) * upstream).sum().backward()
    (torch.cat([out, out * 2], -1) * upstream).sum().backward()
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-5)
    assert ours.weight.grad[0].abs().sum() == 0 and ref.weight.grad[1:].abs().sum() > 0
    with torch.no_grad():  # no gradient wanted: the module's own lookup
        assert torch.equal(embed(ours, ids), out_ref)


@pytest.mark.parametrize("name", ["sim_soft", "twin", "lcn"])
def test_model_gradients_with_the_index_add_embedding_equal_nn_embeddings(name, monkeypatch):
    torch.manual_seed(0)
    overrides = {"features": {"emb_dim": 4}, "crp": {"m": 16}, "lap": {"k1": 8, "k2": 4, "att_dim": 4, "heads": 2, "ffn_dim": 8}}
    model = build_model(preset_config(name, overrides), SMALL_VOCAB).train()
    batch = make_batch(b=6, s=5, l=24, seed=2)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # CRP samples pairs
        logits, aux = model(batch)
        (F.binary_cross_entropy_with_logits(logits, batch["label"]) + sum(aux.values(), torch.zeros(()))).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ours = grads()
    monkeypatch.setattr(layers, "embed", lambda table, ids: table(ids))
    ref = grads()
    assert ours.keys() == ref.keys() and any(k.startswith("features.tables.item") for k in ours)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-6), k


def test_fused_adam_takes_the_same_steps_as_the_default_loop():
    torch.manual_seed(0)
    overrides = {"features": {"emb_dim": 4, "item_dropout": 0.0}, "sim_soft": {"k": 8}}  # the two draw no ids apart
    models = [build_model(preset_config("sim_soft", overrides), SMALL_VOCAB) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = {k: v.clone() for k, v in models[0].state_dict().items()}
    opts = [build_optimizer(models[0], 0.01, fused=True), build_optimizer(models[1], 0.01, fused=False)]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    for step in range(3):
        batch = make_batch(b=6, s=5, l=24, seed=step)
        for m, o in zip(models, opts):
            o.zero_grad()
            F.binary_cross_entropy_with_logits(m(batch)[0], batch["label"]).backward()
            o.step()
    a, b = models[0].state_dict(), models[1].state_dict()
    assert a.keys() == b.keys() and not torch.equal(a["features.tables.item.weight"], start["features.tables.item.weight"])
    for k in a:  # (the fused kernel sums in another order: ~1e-6 apart after 3 steps of lr 0.01)
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize("name", ["sim_soft", "eta", "twin"])
def test_retrieval_models_embedding_the_retrieved_ids_equal_gathering_the_sequence(name, monkeypatch):
    """SIM / ETA / TWIN read only their K retrieved behaviours with a gradient: embedding those ids afresh
    gives the logits and every gradient of gathering rows of the full embedded sequence."""
    torch.manual_seed(0)
    overrides = {"features": {"emb_dim": 4}, name: {"k": 7}}
    model = build_model(preset_config(name, overrides), SMALL_VOCAB).train()
    batch = make_batch(b=6, s=5, l=24, seed=3)
    calls = []
    original = type(model)._embed_retrieved

    def counted(self, *args):
        calls.append(args[-1].shape)
        return original(self, *args)

    monkeypatch.setattr(type(model), "_embed_retrieved", counted)

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same item ids dropped (the preset's item-id dropout) in both paths
        logits, _ = model(batch)
        F.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
        return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    logits, grads = run()
    assert calls == [torch.Size([6, 7])]  # the re-embedding path ran, once, for the K retrieved
    monkeypatch.setattr(type(model.lifelong), "reads_retrieved_only", False)
    ref_logits, ref_grads = run()
    assert len(calls) == 1  # the reference gathered rows of the sequence
    torch.testing.assert_close(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and "features.tables.gap.weight" in grads
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], msg=k)

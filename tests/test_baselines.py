"""Baseline lifelong-interest modules: DIN, SIM soft-search, ETA, SDIM, TWIN.

Layers of tests: shapes and masks (short rows, all-padding rows, padding never
used), equivalences (top-K with K >= L equals full attention), hand-computed
hashes (ETA Hamming distances, SDIM collisions), TWIN's parameter sharing and
per-behaviour bias, gradients, and a device-agnostic forward on ``meta``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raylsm.config import ConfigError, from_dict
from raylsm.models.ctr import build_model
from raylsm.models.registry import lifelong_registry, preset_config
from raylsm.models.config import DinConfig, EtaConfig, FeatureConfig, SdimConfig, SimConfig, TwinConfig
from raylsm.models.din import DIN
from raylsm.models.layers import FeatureLayer
from raylsm.models.sdim import SDIM
from raylsm.models.sim import ETA, SIMSoft
from raylsm.models.twin import TWIN
from tests.conftest import OffMetaSpy

NAMES = ("din", "sim_soft", "eta", "sdim", "twin")
DS, DC = 16, 8  # behaviour / context sizes of the direct-tensor tests


def small_cfg(name: str, k: int = 3):
    """A small config block per module (K small enough that retrieval matters)."""
    return {
        "din": DinConfig(max_len=200, hidden=[12, 6]),
        "sim_soft": SimConfig(k=k, heads=2, att_dim=4),
        "eta": EtaConfig(k=k, heads=2, att_dim=4, n_bits=8),
        "sdim": SdimConfig(n_hashes=4, n_bits=2),
        "twin": TwinConfig(k=k, heads=2, att_dim=4),
    }[name]


def build(name: str, query_dim: int = DS, k: int = 3, **over) -> nn.Module:
    cfg = small_cfg(name, k)
    for key, v in over.items():
        setattr(cfg, key, v)
    return lifelong_registry()[name](cfg, query_dim, DS, DC)


def random_inputs(b: int = 4, l: int = 10, query_dim: int = DS, lengths: list[int] | None = None, seed: int = 0):
    """Random (query, seq, ctx, mask); left-padded with ``lengths`` real behaviours per row (padding embeds to 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths if lengths is not None else [l, 5, 1, 0][:b]
    mask = torch.arange(l)[None, :] >= (l - torch.tensor(lengths))[:, None]  # (B, L)
    query = torch.randn(b, query_dim, generator=g)
    seq = torch.randn(b, l, DS, generator=g) * mask.unsqueeze(-1)
    ctx = torch.randn(b, l, DC, generator=g) * mask.unsqueeze(-1)
    return query, seq, ctx, mask


def test_registry_and_config_validation():
    reg = lifelong_registry()
    assert (reg["din"], reg["sim_soft"], reg["eta"], reg["sdim"], reg["twin"]) == (DIN, SIMSoft, ETA, SDIM, TWIN)
    bad_blocks = [
        (SimConfig, {"k": 0}),
        (EtaConfig, {"n_bits": 0}),
        (TwinConfig, {"heads": 0}),
        (SdimConfig, {"n_hashes": 0}),
        (SdimConfig, {"combine": "sum"}),
        (DinConfig, {"max_len": 0}),
    ]
    for cls, bad in bad_blocks:
        with pytest.raises(ConfigError):
            from_dict(cls, bad, "model.x")


# ---------------------------------------------------------------- shapes and masks


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("query_dim", [DS, 12])
def test_shapes_short_rows_and_all_padding(name, query_dim):
    torch.manual_seed(0)
    m = build(name, query_dim, k=50)  # K = 50 > L = 10
    query, seq, ctx, mask = random_inputs(query_dim=query_dim, lengths=[10, 5, 1, 0])
    out = m(query, seq, ctx, mask)
    assert out.shape == (4, m.out_dim)
    assert torch.isfinite(out).all()
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # all-padding row -> zeros
    assert out[:3].abs().sum(-1).gt(0).all() or name == "sdim"  # SDIM may legitimately find no collision


@pytest.mark.parametrize("name", NAMES)
def test_within_ctr_model_on_collated_batch(name, batch_factory, small_vocab):
    torch.manual_seed(0)
    model = build_model(preset_config(name, {"features": {"emb_dim": 8}, "head": [16]}), small_vocab)
    batch = batch_factory(b=5, l=30, ll_lengths=[30, 12, 3, 0, 7])
    logits, aux = model(batch)
    assert logits.shape == (5,) and torch.isfinite(logits).all() and aux == {}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("query_dim", [DS, 12])
def test_padding_never_used(name, query_dim):
    torch.manual_seed(0)
    m = build(name, query_dim, k=3)
    query, seq, ctx, mask = random_inputs(query_dim=query_dim, lengths=[10, 5, 2, 0])
    out = m(query, seq, ctx, mask)
    pad = ~mask.unsqueeze(-1)
    seq2 = torch.where(pad, 100 * torch.randn_like(seq), seq)  # garbage (large) embeddings at padding
    ctx2 = torch.where(pad, 100 * torch.randn_like(ctx), ctx)
    torch.testing.assert_close(m(query, seq2, ctx2, mask), out)


def test_padding_embeddings_from_feature_layer(batch_factory, small_vocab):
    """Real embeddings of a collated batch: every module gives zeros on an empty history."""
    torch.manual_seed(0)
    f = FeatureLayer(FeatureConfig(emb_dim=DS // 2), small_vocab)
    batch = batch_factory(b=4, l=25, ll_lengths=[25, 10, 0, 2])
    seq = f.behaviour(batch["ll_items"], batch["ll_cates"])
    ctx = f.context(batch["ll_ctx"], batch["ll_gap"])[..., :DC]
    query = f.behaviour(batch["item_id"], batch["item_cate"])
    for name in NAMES:
        out = build(name, k=4)(query, seq, ctx, batch["ll_mask"])
        assert out.shape[0] == 4 and torch.isfinite(out).all()
        assert torch.equal(out[2], torch.zeros_like(out[2])), name


# ---------------------------------------------------------------- DIN


def test_din_raw_weighted_sum_over_recent_max_len():
    torch.manual_seed(0)
    m = build("din", max_len=4)
    query, seq, ctx, mask = random_inputs(lengths=[10, 5, 3, 0])
    out = m(query, seq, ctx, mask)
    s, mk = seq[:, -4:], mask[:, -4:]
    expected = ((m.scores(query, s) * mk).unsqueeze(-1) * s).sum(1)  # raw scores, no softmax
    torch.testing.assert_close(out, expected)
    older = seq.clone()
    older[:, :-4] = torch.randn_like(older[:, :-4])  # behaviours older than max_len do not matter
    torch.testing.assert_close(m(query, older, ctx, mask), out)


@pytest.mark.parametrize("query_dim, hidden", [(DS, [12, 6]), (12, [12, 6]), (DS, [])])
def test_din_activation_unit_equals_the_mlp_over_the_concatenation(query_dim, hidden):
    """The factorised first layer gives the scores and gradients of MLP([q, k, q − k, q ⊙ k]) (DIN §4.3)."""
    torch.manual_seed(0)
    m = DIN(DinConfig(max_len=200, hidden=hidden), query_dim, DS, DC)
    query, seq, _, _ = random_inputs(query_dim=query_dim, lengths=[10, 5, 3, 0])
    query.requires_grad_(True)
    seq.requires_grad_(True)
    q = m.query_proj(query).unsqueeze(1).expand_as(seq)
    reference = m.unit(torch.cat([q, seq, q - seq, q * seq], dim=-1)).squeeze(-1)
    ours = m.scores(query, seq)
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * upstream).sum(), [query, seq, *m.parameters()])
    ref_grads = torch.autograd.grad((reference * upstream).sum(), [query, seq, *m.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_din_softmax_option_is_convex_combination():
    torch.manual_seed(0)
    m = build("din", softmax=True)
    query, _, ctx, mask = random_inputs(lengths=[10, 5, 3, 0])
    seq = torch.ones(4, 10, DS) * mask.unsqueeze(-1)
    out = m(query, seq, ctx, mask)
    torch.testing.assert_close(out[:3], torch.ones(3, DS))  # weights sum to 1 over valid positions
    assert torch.equal(out[3], torch.zeros(DS))


# ---------------------------------------------------------------- SIM soft-search


@pytest.mark.parametrize("query_dim", [DS, 12])
@pytest.mark.parametrize("esu_ctx", [True, False])
def test_sim_soft_k_equals_l_is_full_attention(query_dim, esu_ctx):
    torch.manual_seed(0)
    m = SIMSoft(SimConfig(k=10, heads=2, att_dim=4, esu_ctx=esu_ctx), query_dim, DS, DC)
    query, seq, ctx, mask = random_inputs(query_dim=query_dim, lengths=[10, 5, 1, 0])
    kv = torch.cat([seq, ctx], -1) if esu_ctx else seq
    reference = m.esu(m.query_proj(query), kv, mask)  # ESU over the whole sequence
    torch.testing.assert_close(m(query, seq, ctx, mask), reference)


def test_sim_soft_gsu_picks_largest_inner_products():
    torch.manual_seed(0)
    m = build("sim_soft", k=3)
    query, seq, ctx, mask = random_inputs(lengths=[10, 5, 2, 0])
    idx, sel = m.retrieve(query, seq, mask)
    r = (seq * query.unsqueeze(1)).sum(-1).masked_fill(~mask, float("-inf"))
    for row, n_valid in enumerate([10, 5, 2, 0]):
        expected = set(torch.argsort(r[row], descending=True)[: min(3, n_valid)].tolist())
        assert set(idx[row][sel[row]].tolist()) == expected
        assert int(sel[row].sum()) == min(3, n_valid)


# ---------------------------------------------------------------- ETA


def tiny_eta(k: int = 3) -> ETA:
    m = ETA(EtaConfig(k=k, heads=1, att_dim=2, n_bits=3), 2, 2, 1)
    # sig(x) = [x0 > 0, x1 > 0, x0 + x1 > 0]
    m.hyperplanes.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    return m


def test_eta_hamming_distance_by_hand():
    m = tiny_eta()
    q = torch.tensor([[1.0, 1.0]])  # signature 111
    seq = torch.tensor([[[1.0, 1.0], [-1.0, 2.0], [2.0, -1.0], [-1.0, -1.0], [-2.0, 1.0]]])
    # signatures: 111, 011, 101, 000, 010 -> distances to 111: 0, 1, 1, 3, 2
    t, f = True, False
    assert m.signature(seq).tolist() == [[[t, t, t], [f, t, t], [t, f, t], [f, f, f], [f, t, f]]]
    dist = m.hamming(q, seq)
    assert dist.dtype == torch.long and dist.tolist() == [[0, 1, 1, 3, 2]]


def test_eta_topk_smallest_distance_ties_towards_recent():
    m = tiny_eta(k=3)
    q = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    seq = torch.tensor([[[1.0, 1.0], [-1.0, 2.0], [2.0, -1.0], [-1.0, -1.0], [-2.0, 1.0]]]).repeat(2, 1, 1)
    mask = torch.tensor([[True] * 5, [False, True, True, True, True]])  # row 1: the distance-0 one is padding
    idx, sel = m.retrieve(q, seq, mask)
    assert idx.dtype == torch.long and not idx.requires_grad
    assert idx.tolist() == [[0, 2, 1], [2, 1, 4]]  # distances 0,1,1 / 1,1,2; ties -> most recent first
    assert sel.all()


def test_eta_topk_matches_brute_force_and_hash_is_fixed_buffer():
    torch.manual_seed(0)
    m = build("eta", k=4)
    query, seq, ctx, mask = random_inputs(b=4, l=30, lengths=[30, 20, 3, 0])
    idx, sel = m.retrieve(query, seq, mask)
    dist = m.hamming(query, seq)
    for row, n_valid in enumerate([30, 20, 3, 0]):
        valid = dist[row][mask[row]].sort().values[: min(4, n_valid)]
        assert dist[row][idx[row][sel[row]]].sort().values.tolist() == valid.tolist()
    # Hyperplanes: a seeded buffer, not a parameter.
    assert "hyperplanes" in dict(m.named_buffers()) and all("hyperplanes" not in n for n, _ in m.named_parameters())
    assert torch.equal(build("eta").hyperplanes, m.hyperplanes)
    assert not torch.equal(ETA(EtaConfig(n_bits=8, seed=1), DS, DS, DC).hyperplanes, m.hyperplanes)


@pytest.mark.parametrize("query_dim", [DS, 12])
def test_eta_k_equals_l_is_full_attention(query_dim):
    torch.manual_seed(0)
    m = build("eta", query_dim, k=10)
    query, seq, ctx, mask = random_inputs(query_dim=query_dim)
    reference = m.esu(m.query_proj(query), torch.cat([seq, ctx], -1), mask)
    torch.testing.assert_close(m(query, seq, ctx, mask), reference)


# ---------------------------------------------------------------- SDIM


def tiny_sdim(combine: str = "mean") -> SDIM:
    m = SDIM(SdimConfig(n_hashes=2, n_bits=2, combine=combine), 2, 2, 1)
    # hash 0: [x0 > 0, x1 > 0]; hash 1: [x0 + x1 > 0, x0 - x1 > 0]
    m.hyperplanes.copy_(torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, -1.0]]))
    return m


SDIM_SEQ = torch.tensor([[[2.0, 1.0], [1.0, 2.0], [2.0, -1.0], [-1.0, -1.0]]])  # a, b, c, d
# signatures (hash 0 | hash 1): a 11|11, b 11|10, c 10|11, d 00|00


def test_sdim_per_hash_collisions_by_hand():
    m = tiny_sdim("mean")
    q = torch.tensor([[1.0, 0.5]])  # 11|11
    mask = torch.ones(1, 4, dtype=torch.bool)
    c = m.collisions(q, SDIM_SEQ, mask)
    assert c.tolist() == [[[True, True], [True, False], [False, True], [False, False]]]  # (B, L, m)
    u = m.hash_interests(q, SDIM_SEQ, mask)
    torch.testing.assert_close(u, torch.tensor([[[1.5, 1.5], [2.0, 0.0]]]))  # mean(a, b), mean(a, c)
    torch.testing.assert_close(m(q, SDIM_SEQ, SDIM_SEQ[..., :1], mask), torch.tensor([[1.75, 0.75]]))
    mc = tiny_sdim("concat")
    expected = torch.tensor([[1.5, 1.5, 2.0, 0.0]]) @ mc.out_proj.weight.T  # [u_1 ‖ u_2] W
    torch.testing.assert_close(mc(q, SDIM_SEQ, SDIM_SEQ[..., :1], mask), expected)


@pytest.mark.parametrize("combine", ["mean", "concat"])
def test_sdim_no_collision_and_padding_give_zeros(combine):
    m = tiny_sdim(combine)
    q = torch.tensor([[-1.0, -1.0], [0.0, 0.0]])  # 00|00: only d collides; zero query collides with zero padding
    seq = torch.cat([SDIM_SEQ, torch.zeros(1, 4, 2)])
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])  # d is padding; row 1 empty
    assert not m.collisions(q, seq, mask).any()  # padding never counts as a collision
    out = m(q, seq, seq[..., :1], mask)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))


def test_sdim_vectorised_hashes_match_per_hash_loop():
    torch.manual_seed(0)
    m = build("sdim")
    query, seq, ctx, mask = random_inputs(l=40, lengths=[40, 20, 3, 0])
    u = m.hash_interests(query, seq, mask)  # (B, m, Ds)
    r = m.hyperplanes.view(DS, m.n_hashes, m.n_bits)
    for h in range(m.n_hashes):  # reference: one hash function at a time
        same = ((seq @ r[:, h]) > 0).eq(((query @ r[:, h]) > 0).unsqueeze(1)).all(-1) & mask  # (B, L)
        w = same.float()
        ref = (w.unsqueeze(-1) * seq).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        torch.testing.assert_close(u[:, h], ref)


@pytest.mark.parametrize("n_bits", [1, 3, 8, 40])
def test_sdim_bucket_ids_collide_exactly_when_every_bit_does(n_bits):
    torch.manual_seed(n_bits)
    m = SDIM(SdimConfig(n_hashes=5, n_bits=n_bits), 4, 4, 1)
    x = torch.randn(200, 4).round().requires_grad_()  # rounding makes equal signatures (and near-ties) common
    ids, bits = m.bucket(x), m.signature(x)  # (N, m), (N, m, n)
    same_ids = ids.unsqueeze(0) == ids.unsqueeze(1)  # (N, N, m)
    same_bits = (bits.unsqueeze(0) == bits.unsqueeze(1)).all(-1)  # (N, N, m)
    assert torch.equal(same_ids, same_bits) and same_bits.any() and not same_bits.all()
    assert ids.dtype == (torch.int32 if n_bits <= 31 else torch.int64) and not ids.requires_grad


# ---------------------------------------------------------------- TWIN


def test_twin_cross_bias_alone_changes_the_selection():
    torch.manual_seed(0)
    m = build("twin", k=1)
    b, l = 2, 6
    query = torch.randn(b, DS)
    seq = torch.randn(1, 1, DS).expand(b, l, DS).contiguous()  # identical inherent parts: Q·K ties
    mask = torch.ones(b, l, dtype=torch.bool)
    v = m.attention.w_c.weight.mean(0)  # head-averaged bias = ctx · v
    s = torch.arange(l, dtype=torch.float)
    ctx_up = (s[:, None] * v).expand(b, l, DC)  # bias grows with position -> pick the last
    ctx_down = (s.flip(0)[:, None] * v).expand(b, l, DC)  # bias shrinks -> pick the first
    idx_up, _ = m.retrieve(query, seq, ctx_up, mask)
    idx_down, _ = m.retrieve(query, seq, ctx_down, mask)
    assert idx_up.tolist() == [[l - 1]] * b and idx_down.tolist() == [[0]] * b
    # The bias is per (batch, head, behaviour).
    assert m.attention.scores(query, seq, ctx_up).shape == (b, m.attention.heads, l)


def test_twin_gsu_and_esu_share_one_attention(monkeypatch):
    torch.manual_seed(0)
    m = build("twin", k=3)
    # No parameter outside the shared attention.
    assert {id(p) for p in m.parameters()} == {id(p) for p in m.attention.parameters()}
    query, seq, ctx, mask = random_inputs(lengths=[10, 5, 2, 0])
    calls = []
    original = m.attention.scores
    monkeypatch.setattr(m.attention, "scores", lambda *a: calls.append(a[1].shape[1]) or original(*a))
    m(query, seq, ctx, mask)
    assert calls == [10, 3]  # CP-GSU over L, then the ESU over K, both through the same module
    monkeypatch.undo()
    # The ESU output is exactly the shared attention on the retrieved behaviours.
    idx, sel = m.retrieve(query, seq, ctx, mask)
    g = lambda x: torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    torch.testing.assert_close(m(query, seq, ctx, mask), m.attention(query, g(seq), g(ctx), sel))
    # Changing the ESU's key weights changes what the GSU retrieves.
    with torch.no_grad():
        m.attention.w_k.weight.mul_(-1)
    assert not torch.equal(m.retrieve(query, seq, ctx, mask)[0][:2], idx[:2])


@pytest.mark.parametrize("query_dim", [DS, 12])
def test_twin_k_ge_l_is_full_attention(query_dim):
    torch.manual_seed(0)
    m = build("twin", query_dim, k=50)
    query, seq, ctx, mask = random_inputs(query_dim=query_dim)
    torch.testing.assert_close(m(query, seq, ctx, mask), m.attention(query, seq, ctx, mask))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("query_dim", [DS, 12])
def test_gradients_reach_every_parameter(name, query_dim):
    """Every parameter (ESU / attention / projections) gets a gradient: no dead parameter under DDP."""
    torch.manual_seed(0)
    m = build(name, query_dim, k=3)
    query, seq, ctx, mask = random_inputs(query_dim=query_dim, lengths=[10, 5, 2, 0])
    seq.requires_grad_(True)
    m(query, seq, ctx, mask).pow(2).sum().backward()
    params = dict(m.named_parameters())
    assert params, name
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
    assert seq.grad is not None and seq.grad[~mask].abs().sum() == 0  # nothing flows into padding


@pytest.mark.parametrize("name", ["sim_soft", "eta", "twin"])
def test_topk_indices_are_integers_without_grad(name):
    m = build(name, k=3)
    query, seq, ctx, mask = random_inputs()
    seq.requires_grad_(True)
    idx, sel = m.retrieve(query, seq, ctx, mask) if name == "twin" else m.retrieve(query, seq, mask)
    assert idx.dtype == torch.long and sel.dtype == torch.bool
    assert not idx.requires_grad and not sel.requires_grad


# ---------------------------------------------------------------- device-agnostic forward


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("query_dim", [DS, 12])
def test_forward_on_meta_creates_no_cpu_tensor(name, query_dim):
    m = build(name, query_dim, k=3).to("meta")
    query, seq, ctx, mask = (t.to("meta") for t in random_inputs(query_dim=query_dim))
    with OffMetaSpy() as mode:
        out = m(query, seq, ctx, mask)
    assert out.device.type == "meta" and out.shape == (4, m.out_dim)
    assert mode.offenders == []


@pytest.mark.parametrize("name", ["sim_soft", "eta"])
def test_esu_query_bias_adds_a_candidate_independent_score(name):
    """``esu_query_bias``: scores = (W^Q q + b^Q)·K / √d, so a behaviour's context alone can raise its weight
    for every candidate; with b^Q = 0 the module is the bias-free ESU, and the bias gets a gradient."""
    torch.manual_seed(0)
    plain, biased = build(name, k=10), build(name, k=10, esu_query_bias=True)
    assert plain.esu.w_q.bias is None and biased.esu.w_q.bias is not None
    biased.load_state_dict({**plain.state_dict(), "esu.w_q.bias": torch.zeros(biased.esu.w_q.bias.shape)})
    query, seq, ctx, mask = random_inputs(lengths=[10, 5, 1, 0])
    torch.testing.assert_close(biased(query, seq, ctx, mask), plain(query, seq, ctx, mask))  # b^Q = 0: same module
    with torch.no_grad():
        biased.esu.w_q.bias.normal_()
    kv = torch.cat([seq, ctx], -1)
    s = biased.esu.scores(biased.query_proj(query), kv)  # (B, H, L)
    s_zero_query = biased.esu.scores(torch.zeros_like(query), kv)  # the candidate-independent part
    assert s_zero_query.abs().amax() > 0
    torch.testing.assert_close(s - s_zero_query, plain.esu.scores(plain.query_proj(query), kv))
    biased(query, seq, ctx, mask).sum().backward()
    assert biased.esu.w_q.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["sim_soft", "eta"])
def test_esu_query_bias_std_starts_the_bias_off_zero(name):
    """``esu_query_bias_std``: b^Q starts ~ N(0, std²) (0: zeros; default 1); seeded like every other init; negative is refused."""
    torch.manual_seed(0)
    assert torch.equal(build(name, esu_query_bias=True, esu_query_bias_std=0.0).esu.w_q.bias, torch.zeros(2 * 4))
    torch.manual_seed(0)
    a = build(name, esu_query_bias=True, esu_query_bias_std=2.0, heads=4, att_dim=256).esu.w_q.bias
    torch.manual_seed(0)
    b = build(name, esu_query_bias=True, esu_query_bias_std=2.0, heads=4, att_dim=256).esu.w_q.bias
    assert torch.equal(a, b) and abs(a.std().item() - 2.0) < 0.15 and abs(a.mean().item()) < 0.15
    assert build(name, esu_query_bias_std=2.0).esu.w_q.bias is None  # no bias: the std has nothing to start
    torch.manual_seed(0)
    assert build(name, esu_query_bias=True).esu.w_q.bias.abs().sum() > 0  # the default starts off zero
    cfg = small_cfg(name, 3)
    cfg.esu_query_bias_std = -1.0
    with pytest.raises(ConfigError, match=f"model.{name}.esu_query_bias_std: must be >= 0"):
        cfg.validate()

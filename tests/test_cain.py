"""CAIN context encoder: TCN eq. (5), MSIA eqs. (7)–(9), PEG eqs. (10)–(12), GRU / self-attention."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from raylsm.config import ConfigError
from raylsm.models.registry import build_context_encoder, preset_config
from raylsm.models.cain import (
    ContextEncoder,
    TCNLayer,
    msia_layer_specs,
    output_lengths,
    receptive_fields,
)
from raylsm.models.config import ContextConfig, ModelConfig, MSIAConfig, PEGConfig

IN, Q, P = 12, 6, 8  # input size C_in, query size, profile size
LENGTHS = [0, 1, 7, 22, 23]  # real behaviours per row (L = 23): empty, single, partial, full


def make_cfg(
    kind: str = "tcn",
    cl: int = 2,
    out_dim: int = 0,
    msia: bool = False,
    layers: int = 3,
    later_cl: int | None = 1,
    stride: int = 3,
    peg: bool = False,
    aggregation: str = "replace",
    peg_layers: str = "all",
    rank: int = 0,
    bidirectional: bool = True,
) -> ModelConfig:
    return ModelConfig(
        context=ContextConfig(kind=kind, cl=cl, out_dim=out_dim, heads=2, bidirectional=bidirectional),
        msia=MSIAConfig(enabled=msia, layers=layers, later_cl=later_cl, later_stride=stride, att_dim=4, heads=1),
        peg=PEGConfig(enabled=peg, hidden=5, aggregation=aggregation, layers=peg_layers, rank=rank),
    )


def make_inputs(lengths=LENGTHS, length: int = 23, seed: int = 0, c_in: int = IN):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(length)[None, :] >= (length - torch.tensor(lengths))[:, None]  # left padding
    seq = torch.randn(b, length, c_in, generator=g) * mask.unsqueeze(-1)
    return seq, mask, torch.randn(b, Q, generator=g), torch.randn(b, P, generator=g)


def with_garbage(seq: torch.Tensor, mask: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    junk = torch.randn(seq.shape, generator=g) * 100
    junk[0, 0, 0] = float("nan")  # row 0 is all padding
    return torch.where(mask.unsqueeze(-1), seq, junk)


ENCODERS = {
    "tcn": make_cfg(),
    "tcn_msia_peg_sum": make_cfg(msia=True, peg=True, aggregation="sum"),
    "tcn_msia_peg_concat": make_cfg(msia=True, peg=True, aggregation="concat", rank=3),
    "gru": make_cfg(kind="gru"),
    "gru_uni": make_cfg(kind="gru", out_dim=7, bidirectional=False),
    "self_attention": make_cfg(kind="self_attention"),
}


def encoder(cfg: ModelConfig, seed: int = 0, profile_dim: int = P) -> ContextEncoder:
    torch.manual_seed(seed)
    return ContextEncoder(cfg, in_dim=IN, query_dim=Q, profile_dim=profile_dim)


# ----------------------------------------------------------------------------- TCN, eq. (5)


def test_tcn_cl0_is_a_per_position_linear_layer_with_relu():
    enc = encoder(make_cfg(cl=0, out_dim=7))
    seq, mask, cand, profile = make_inputs()
    cr, aux = enc(seq, mask, cand, profile)
    layer = enc.layers[0]
    assert layer.weight.shape == (7, IN, 1)
    expected = F.relu(F.linear(seq, layer.weight[:, :, 0], layer.bias))  # (B, L, 7)
    assert cr.shape == (len(LENGTHS), 23, 7) and aux.shape == (len(LENGTHS), 0) and enc.aux_dim == 0
    torch.testing.assert_close(cr[mask], expected[mask])
    assert (cr[~mask] == 0).all()


def test_tcn_zero_padding_at_both_ends_matches_hand_computed_eq5():
    cl = 2
    enc = encoder(make_cfg(cl=cl))
    with torch.no_grad():
        enc.layers[0].bias.normal_()
    seq, mask, cand, profile = make_inputs()
    cr, _ = enc(with_garbage(seq, mask), mask, cand, profile)
    w, b = enc.layers[0].weight, enc.layers[0].bias  # (C, C_in, 2cl+1), (C,)
    length = seq.shape[1]
    checked = 0
    for row, n in enumerate(LENGTHS):
        first = length - n
        for t in {first, first + 1, length - 2, length - 1}:  # first and last real items
            if n == 0 or not first <= t < length:
                continue
            acc = b.clone()
            for kappa in range(2 * cl + 1):
                u = t - cl + kappa
                if first <= u < length:  # zero padding outside the real items (eq. 5)
                    acc = acc + w[:, :, kappa] @ seq[row, u]
            torch.testing.assert_close(cr[row, t], torch.relu(acc))
            checked += 1
    assert checked >= 10


def test_activation_none_is_eq5_as_printed_and_dirac_init_starts_at_the_input():
    seq, mask, cand, profile = make_inputs()
    cfg = make_cfg(cl=2)
    cfg.context.activation = "none"
    enc = encoder(cfg)
    with torch.no_grad():
        enc.layers[0].bias.normal_()
    layer = enc.layers[0]
    expected = F.conv1d(F.pad(seq.transpose(1, 2), (2, 2)), layer.weight, layer.bias).transpose(1, 2)  # eq. 5, no ReLU
    cr, _ = enc(seq, mask, cand, profile)
    torch.testing.assert_close(cr[mask], expected[mask])
    assert (cr[mask] < 0).any()  # linear: negative outputs survive (the ReLU reading zeroes them)
    # init=dirac: cr_t = lhe_t at the start (noise 0), and scaled xavier noise on top otherwise.
    cfg.context.init, cfg.context.init_noise = "dirac", 0.0
    cr, _ = encoder(cfg)(seq, mask, cand, profile)
    torch.testing.assert_close(cr[mask], seq[mask])
    cfg.context.init_noise = 0.1
    w = encoder(cfg).layers[0].weight.detach()
    centre = w[:, :, 2] - torch.eye(IN)
    assert 0 < w[:, :, 0].abs().max() < 0.2 and 0 < centre.abs().max() < 0.2
    # init=box: cr_t starts as the mean of its 2cl+1 window (zero padding counted).
    cfg.context.init, cfg.context.init_noise = "box", 0.0
    cr, _ = encoder(cfg)(seq, mask, cand, profile)
    x = torch.where(mask.unsqueeze(-1), seq, 0.0)
    window_mean = F.avg_pool1d(F.pad(x.transpose(1, 2), (2, 2)), 5, 1).transpose(1, 2)
    torch.testing.assert_close(cr[mask], window_mean[mask])
    for key, value, match in (("activation", "tanh", "context.activation"), ("init", "zeros", "context.init"),
                              ("init_noise", -1.0, "context.init_noise")):
        with pytest.raises(ConfigError, match=match):
            preset_config("cain", {"context": {key: value}})


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_garbage_at_padded_positions_changes_nothing(name):
    enc = encoder(ENCODERS[name])
    seq, mask, cand, profile = make_inputs()
    cr, aux = enc(seq, mask, cand, profile)
    cr2, aux2 = enc(with_garbage(seq, mask), mask, cand, profile)
    assert torch.isfinite(cr2).all() and torch.isfinite(aux2).all()
    torch.testing.assert_close(cr2, cr)
    torch.testing.assert_close(aux2, aux)
    assert (cr[~mask] == 0).all()
    assert (cr[0] == 0).all() and (aux[0] == 0).all()  # empty sequence -> zeros
    assert cr.shape == (len(LENGTHS), 23, enc.out_dim) and aux.shape == (len(LENGTHS), enc.aux_dim)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_amount_of_left_padding_changes_nothing(name):
    """Windows are anchored on the most recent behaviour: more left padding leaves every output as is."""
    enc = encoder(ENCODERS[name])
    lengths = [1, 7, 22]
    seq, mask, cand, profile = make_inputs(lengths, length=23)
    extra = 14
    seq_long = torch.cat([torch.zeros(len(lengths), extra, IN), seq], dim=1)
    mask_long = torch.cat([torch.zeros(len(lengths), extra, dtype=torch.bool), mask], dim=1)
    cr, aux = enc(seq, mask, cand, profile)
    cr_long, aux_long = enc(seq_long, mask_long, cand, profile)
    torch.testing.assert_close(cr_long[:, extra:], cr)
    torch.testing.assert_close(aux_long, aux)


# ----------------------------------------------------------------------------- MSIA, eqs. (7)–(9)


def test_receptive_fields_follow_eq7_and_strides():
    unit = [(15, 1), (5, 1), (5, 1), (7, 1)]
    fields = receptive_fields(unit)
    assert fields[0] == 15
    for n in range(1, len(unit)):
        assert fields[n] == fields[n - 1] + unit[n][0] - 1  # eq. (7): cl_{n+1} = cl_n + fs_{n+1} - 1
    # Paper defaults: cl = 7 everywhere, stride 1 then 4, four layers.
    cfg = ModelConfig(context=ContextConfig(kind="tcn"), msia=MSIAConfig(enabled=True))
    assert msia_layer_specs(cfg) == [(15, 1), (15, 4), (15, 4), (15, 4)]
    assert receptive_fields(msia_layer_specs(cfg)) == [15, 29, 29 + 14 * 4, 29 + 14 * 4 + 14 * 16]
    assert output_lengths(msia_layer_specs(cfg), 500) == [500, 125, 32, 8]
    assert output_lengths(msia_layer_specs(cfg), 2000) == [2000, 500, 125, 32]


def test_msia_output_lengths_and_empirical_receptive_fields():
    """Each later output sees exactly r_n consecutive inputs centred where the anchoring says."""
    cfg = make_cfg(cl=2, msia=True, layers=4, later_cl=1, stride=2)
    enc = encoder(cfg)
    with torch.no_grad():  # positive weights and inputs: every path is active through the ReLUs
        for layer in enc.layers:
            layer.weight.copy_(layer.weight.abs() + 0.01)
            layer.bias.zero_()
    length = 120
    specs = msia_layer_specs(cfg)
    fields = receptive_fields(specs)
    assert fields == [5, 7, 11, 19]
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0])) for layer in enc.layers]
    seq = torch.rand(1, length, IN, requires_grad=True)
    mask = torch.ones(1, length, dtype=torch.bool)
    enc(seq, mask, torch.randn(1, Q), torch.randn(1, P))
    for h in hooks:
        h.remove()
    assert [o.shape[-1] for o in outs] == output_lengths(specs, length) == [120, 60, 30, 15]
    for n, (out, r) in enumerate(zip(outs, fields)):
        j = out.shape[-1] // 2
        centre, lengths = j, [length] + [o.shape[-1] for o in outs]
        for m in range(n, 0, -1):  # map output j of layer n back to input positions
            centre = lengths[m] - 1 - (lengths[m + 1] - 1 - centre) * specs[m][1]
        (grad,) = torch.autograd.grad(out[0, :, j].sum(), seq, retain_graph=True)
        seen = grad[0].abs().sum(-1).nonzero().flatten()
        assert seen.tolist() == list(range(centre - (r - 1) // 2, centre + (r - 1) // 2 + 1)), n


def _window_reference_conv(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Right-anchored strided conv = the standard padded conv on the time-reversed sequence."""
    half = (weight.shape[-1] - 1) // 2
    if stride == 1:
        return F.conv1d(x, weight, padding=half)  # eq. (5): zero padding cl on both ends
    return F.conv1d(x.flip(-1), weight.flip(-1), padding=half, stride=stride).flip(-1)


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_strided_layer_outputs_and_masks(stride):
    torch.manual_seed(0)
    layer = TCNLayer(IN, 5, cl=1, stride=stride)
    length = 23
    mask = torch.rand(6, length) > 0.5  # any pattern, not only left padding
    mask[0] = False
    mask[1, :-1] = False  # only the most recent
    mask[2, 1:] = False  # only the oldest
    x = torch.randn(6, length, IN) * mask.unsqueeze(-1)
    y, mask_out = layer(x.transpose(1, 2), mask, torch.zeros(6, 0))
    n_out = -(-length // stride)
    assert y.shape == (6, 5, n_out) and mask_out.shape == (6, n_out)
    for j in range(n_out):  # window j is centred on L-1-(n_out-1-j)*stride, half-width 1
        c = length - 1 - (n_out - 1 - j) * stride
        lo, hi = max(c - 1, 0), min(c + 1, length - 1)
        assert torch.equal(mask_out[:, j], mask[:, lo : hi + 1].any(1)), j
    expected = F.relu(_window_reference_conv(x.transpose(1, 2), layer.weight, stride) + layer.bias[:, None])
    torch.testing.assert_close(y, expected * mask_out.unsqueeze(1))
    assert mask_out[1, -1] and not mask_out[1, :-1].any()


def test_aux_attention_is_masked_softmax_over_valid_outputs():
    """Eqs. (8)–(9): IR_n = Σ_t softmax_valid(sa_t) W^V cr_t, recomputed by hand from the layer outputs."""
    enc = encoder(make_cfg(msia=True, layers=2, stride=3))
    seq, mask, cand, profile = make_inputs()
    outs = []
    hook = enc.layers[1].register_forward_hook(lambda m, i, o: outs.append(o))
    _, aux = enc(seq, mask, cand, profile)
    hook.remove()
    (h, m) = outs[0]
    att = enc.aux_attentions[0]
    crn = h.transpose(1, 2)  # (B, L_2, C)
    sa = (att.w_q(cand).unsqueeze(1) * att.w_k(crn)).sum(-1) / 4**0.5  # eq. (8)
    sa = torch.where(m, sa, torch.tensor(float("-inf")))
    weights = torch.nan_to_num(torch.softmax(sa, -1))  # empty row -> zeros
    ir = (weights.unsqueeze(-1) * att.w_v(crn)).sum(1)  # eq. (9)
    torch.testing.assert_close(aux, ir)


# ----------------------------------------------------------------------------- PEG, eqs. (10)–(12)


@pytest.mark.parametrize("aggregation", ["replace", "sum", "concat"])
@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("profile_dim,rank", [(P, 0), (P, 2), (0, 0)])
def test_peg_batched_conv_equals_per_user_loop(aggregation, stride, profile_dim, rank):
    torch.manual_seed(0)
    peg = PEGConfig(enabled=True, hidden=5, aggregation=aggregation, rank=rank)
    layer = TCNLayer(IN, 7, cl=2, stride=stride, peg=peg, profile_dim=profile_dim, keep_mask=stride == 1)
    with torch.no_grad():
        layer.bias.normal_()
        if layer.personal_bias is not None:
            layer.personal_bias.normal_()
    seq, mask, _, profile = make_inputs()
    profile = profile[:, :profile_dim]
    x = seq.transpose(1, 2)  # (B, C_in, L)
    y, mask_out = layer(x, mask, profile)
    assert (layer.weight is None) == (aggregation == "replace")
    for row in range(x.shape[0]):  # the reference loops over users; the model must not
        xb, pb = x[row : row + 1], profile[row : row + 1]
        if profile_dim:
            o = torch.relu(layer.generator.fc1(pb))  # eq. (10)
        else:
            o = torch.relu(layer.generator.const).unsqueeze(0)
        if rank:
            o = layer.generator.low(o)
        w_pc = layer.generator.fc2(o).view(7, IN, 5)  # eq. (11)
        personal = _window_reference_conv(xb, w_pc, stride)
        bias = layer.bias[:, None]
        if aggregation == "replace":
            ref = torch.relu(personal + bias)  # eq. (12)
        elif aggregation == "sum":
            ref = torch.relu(_window_reference_conv(xb, layer.weight, stride) + personal + bias)
        else:
            glob = torch.relu(_window_reference_conv(xb, layer.weight, stride) + bias)
            pers = torch.relu(personal + layer.personal_bias[:, None])
            ref = layer.proj(torch.cat([glob, pers], dim=1))
        torch.testing.assert_close(y[row], (ref * mask_out[row : row + 1].unsqueeze(1))[0])


def test_peg_filters_differ_per_user_and_start_at_xavier_scale():
    torch.manual_seed(0)
    c_in, c_out, k = 64, 64, 15
    layer = TCNLayer(c_in, c_out, cl=7, stride=1, peg=PEGConfig(enabled=True), profile_dim=128)
    profile = torch.randn(16, 128) * 0.1  # embedding-scale profile vectors
    filters = layer.generator(profile)  # (B, C, C_in, k)
    assert filters.shape == (16, c_out, c_in, k)
    xavier_std = (2.0 / (c_in * k + c_out * k)) ** 0.5
    assert 0.5 * xavier_std < filters.std().item() < 2.0 * xavier_std
    assert (filters - filters.mean(0)).abs().amax(0).mean() > 0.05 * xavier_std  # personalised


@pytest.mark.parametrize("peg_layers", ["all", "first", "later"])
def test_gradients_reach_peg_generators_and_profile(peg_layers):
    enc = encoder(make_cfg(msia=True, peg=True, aggregation="replace", peg_layers=peg_layers))
    expected = {"all": [0, 1, 2], "first": [0], "later": [1, 2]}[peg_layers]
    assert [i for i, layer in enumerate(enc.layers) if layer.generator is not None] == expected
    seq, mask, cand, profile = make_inputs()
    profile.requires_grad_(True)
    cr, aux = enc(seq, mask, cand, profile)
    (cr.square().sum() + aux.square().sum()).backward()
    for i in expected:
        gen = enc.layers[i].generator
        for p in (gen.fc1.weight, gen.fc1.bias, gen.fc2.weight, gen.fc2.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0, i
    assert profile.grad.abs().sum() > 0
    for name, p in enc.named_parameters():  # no unused parameters (DDP-safe)
        assert p.grad is not None, name


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_forward_dispatches_the_same_ops_whatever_the_batch_size(name):
    """A Python loop over users would dispatch ops in proportion to B; a host sync shows as _local_scalar_dense."""
    enc = encoder(ENCODERS[name])
    counts = []
    for lengths in ([3, 23], [0, 1, 7, 22, 23, 5, 9]):
        seq, mask, cand, profile = make_inputs(lengths)
        with _OpCounter() as counter:
            enc(seq, mask, cand, profile)
        counts.append(counter.ops)
    assert counts[0] == counts[1]
    assert "aten._local_scalar_dense" not in counts[0]
    if "peg" in name:
        assert counts[0]["aten.bmm"] >= 3  # one batched personal conv per layer, no per-user convs


def test_forward_on_meta_device():
    """Shape-only forward: no host syncs (.item(), .cpu(), .numpy()) and no device assumptions."""
    for cfg in ENCODERS.values():
        with torch.device("meta"):
            enc = encoder(cfg)
            seq, mask = torch.empty(4, 23, IN), torch.ones(4, 23, dtype=torch.bool)
            cr, aux = enc(seq, mask, torch.empty(4, Q), torch.empty(4, P))
        assert cr.device.type == "meta" and cr.shape == (4, 23, enc.out_dim) and aux.shape == (4, enc.aux_dim)


# ----------------------------------------------------------------------------- GRU / self-attention


def test_gru_and_self_attention_shapes_and_directions():
    seq, mask, cand, profile = make_inputs()
    for kind, out_dim, bidirectional in [("gru", 9, True), ("gru", 9, False), ("self_attention", 8, True)]:
        enc = encoder(make_cfg(kind=kind, out_dim=out_dim, bidirectional=bidirectional))
        cr, aux = enc(seq, mask, cand, profile)
        assert cr.shape == (len(LENGTHS), 23, out_dim) and aux.shape == (len(LENGTHS), 0)
        assert enc.out_dim == out_dim and enc.aux_dim == 0 and (cr[~mask] == 0).all()
        # Change the most recent behaviour of row 3 (length 22): what may move?
        seq2 = seq.clone()
        seq2[3, -1] += 1.0
        cr2, _ = enc(seq2, mask, cand, profile)
        delta = (cr2[3, :-1] - cr[3, :-1]).abs()
        if kind == "gru" and not bidirectional:
            assert delta.amax() == 0  # forward GRU: past -> t only
        elif kind == "gru":
            assert delta[:, :5].amax() == 0 and delta[mask[3, :-1], 5:].amax() > 0  # past half / future half
        else:
            assert delta[mask[3, :-1]].amax() > 0  # attention sees the whole sequence
        torch.testing.assert_close(cr2[[0, 1, 2, 4]], cr[[0, 1, 2, 4]])  # rows never mix


def test_default_output_size_and_build_from_preset():
    enc = build_context_encoder(preset_config("cain"), in_dim=IN, query_dim=Q, profile_dim=P)
    assert isinstance(enc, ContextEncoder) and enc.out_dim == IN
    assert len(enc.layers) == 4 and enc.aux_dim == 3 * 64
    # The preset's context length is the measured cl 3 (kernel 7); the paper's reading cl 7 (kernel 15).
    assert [layer.kernel for layer in enc.layers] == [7] * 4 and [layer.stride for layer in enc.layers] == [1, 4, 4, 4]
    paper = build_context_encoder(preset_config("cain_paper"), in_dim=IN, query_dim=Q, profile_dim=P)
    assert [layer.kernel for layer in paper.layers] == [15] * 4
    assert all(layer.generator is not None and layer.weight is None for layer in enc.layers)
    seq, mask, cand, profile = make_inputs()
    cr, aux = enc(seq, mask, cand, profile)
    assert cr.shape == (len(LENGTHS), 23, IN) and aux.shape == (len(LENGTHS), 192)
    assert build_context_encoder(ModelConfig(), IN, Q, P) is None


def test_config_errors_and_profile_free_peg():
    with pytest.raises(ConfigError, match="kind=tcn"):
        ContextEncoder(make_cfg(kind="gru", msia=True), IN, Q, P)
    with pytest.raises(ConfigError, match="peg.layers=later"):
        ContextEncoder(make_cfg(peg=True, peg_layers="later"), IN, Q, P)
    with pytest.raises(ConfigError, match="divisible"):
        ContextEncoder(make_cfg(kind="self_attention", out_dim=7), IN, Q, P)
    with pytest.raises(ConfigError, match="later_cl"):
        MSIAConfig(later_cl=-1).validate()
    with pytest.warns(UserWarning, match="same generated filters"):
        enc = ContextEncoder(make_cfg(msia=True, peg=True), IN, Q, 0)
    seq, mask, cand, _ = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cr, aux = enc(seq, mask, cand, torch.zeros(len(LENGTHS), 0))
    assert cr.shape == (len(LENGTHS), 23, IN) and torch.isfinite(aux).all()

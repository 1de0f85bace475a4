"""The assembled CTR model: every preset and backbone substitution, masks, CRP composition, device-agnostic forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raylsm.config import ConfigError
from raylsm.models.ctr import build_model
from raylsm.models.registry import preset_config
from raylsm.models.config import PRESETS
from tests.conftest import SMALL_VOCAB, OffMetaSpy, make_batch

SMALL = {"features": {"emb_dim": 8, "item_dropout": 0.0}, "head": [16, 8], "lap": {"k1": 12, "k2": 6, "att_dim": 8, "heads": 2, "ffn_dim": 16},
         "sim_soft": {"k": 12, "att_dim": 8}, "eta": {"k": 12, "att_dim": 8, "n_bits": 16}, "twin": {"k": 12, "att_dim": 8},
         "sdim": {"n_hashes": 4, "n_bits": 2}, "din": {"max_len": 20, "hidden": [8]}, "crp": {"m": 32},
         "msia": {"att_dim": 8}, "peg": {"hidden": 8}, "context": {"out_dim": 16}}


def small(name: str, **extra) -> torch.nn.Module:
    from raylsm.config import merge

    torch.manual_seed(0)
    return build_model(preset_config(name, merge(SMALL, extra)), SMALL_VOCAB)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_returns_logits_and_handles_padding(name):
    model = small(name)
    batch = make_batch(b=6, s=5, l=30, ll_lengths=[30, 3, 0, 12, 1, 29], st_lengths=[5, 0, 2, 1, 5, 0])
    logits, aux = model(batch)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    assert set(aux) == ({"crp"} if name in ("lcn", "lcn_paper") else set())
    # Garbage ids at padded positions (rows keep their masks) change nothing.
    noisy = dict(batch)
    for key in ("ll_items", "ll_cates", "ll_ctx", "ll_gap"):
        fill = torch.randint(1, 5, batch[key].shape)
        noisy[key] = torch.where(batch["ll_mask"], batch[key], fill)
    model.eval()
    torch.testing.assert_close(model(noisy)[0], model(batch)[0])


@pytest.mark.parametrize("backbone", ["sim_soft", "eta", "sdim", "twin", "din", "lap"])
@pytest.mark.parametrize("enhancement", [{"crp": {"enabled": True}}, {"context": {"kind": "tcn"}},
                                         {"context": {"kind": "tcn"}, "msia": {"enabled": True}, "peg": {"enabled": True}},
                                         {"context": {"kind": "gru"}}, {"context": {"kind": "self_attention"}}])
def test_backbone_substitution_trains_one_step(backbone, enhancement):
    model = small(backbone, **enhancement)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = make_batch(b=8, s=5, l=30, seed=3)
    logits, aux = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits, batch["label"]) + sum(model.aux_weights[k] * v for k, v in aux.items())
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "tables" not in n), [
        n for n, p in model.named_parameters() if p.grad is None]
    opt.step()
    assert torch.isfinite(model(batch)[0]).all()


@pytest.mark.parametrize("backbone", ["sim_soft", "eta", "twin", "lap"])
@pytest.mark.parametrize("merge", ["concat", "context"])
def test_context_merge_feeds_the_encoder_output_to_the_lifelong_module(backbone, merge):
    """Every merge reading reaches the lifelong module: the TCN gets a gradient through the loss and
    changing its output changes the logits."""
    model = small(backbone, context={"kind": "tcn", "merge": merge, "out_dim": 16})
    batch = make_batch(b=8, s=5, l=30, seed=3)
    logits, _ = model(batch)
    F.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    tcn = model.context_encoder.layers[0]
    assert tcn.weight.grad is not None and tcn.weight.grad.abs().sum() > 0
    model.eval()
    before = model(batch)[0]
    with torch.no_grad():
        tcn.bias.add_(1.0)
    assert not torch.allclose(model(batch)[0], before)


def test_context_input_context_reads_only_engagement_and_gap():
    """``context.input=context``: the encoder sees e_c only, so the behaviours' item ids do not move its output."""
    model = small("lap", context={"kind": "tcn", "merge": "context", "input": "context", "out_dim": 16}).eval()
    assert model.context_encoder.layers[0].weight.shape[1] == 2 * SMALL["features"]["emb_dim"]
    outs = []
    model.context_encoder.register_forward_hook(lambda m, i, o: outs.append(o[0]))
    batch = make_batch(b=6, s=5, l=30, seed=2)
    other = dict(batch, ll_items=torch.randint(1, 50, batch["ll_items"].shape), ll_cates=torch.randint(1, 9, batch["ll_cates"].shape))
    model(batch), model(other)
    torch.testing.assert_close(outs[0], outs[1])
    changed = dict(batch, ll_ctx=torch.where(batch["ll_mask"], 5 - batch["ll_ctx"].clamp(1, 4), 0))
    model(changed)
    assert not torch.allclose(outs[0], outs[2])
    with pytest.raises(ConfigError, match="model.context.input"):
        preset_config("lap", {"context": {"kind": "tcn", "input": "item"}})


@pytest.mark.parametrize("backbone", ["twin", "lap"])
def test_context_ffn_adds_a_nonlinear_reading_of_the_merged_context(backbone):
    """``context.ffn``: [z_t ‖ FFN(z_t)] with z_t = [e_c ‖ cr_t] reaches the lifelong module (gradient, output)."""
    model = small(backbone, context={"kind": "tcn", "merge": "context", "out_dim": 16, "ffn": 12})
    assert model.context_ffn[0].in_features == 2 * SMALL["features"]["emb_dim"] + 16
    assert model.context_ffn[0].out_features == 12 and model.context_ffn[2].out_features == 16
    batch = make_batch(b=8, s=5, l=30, seed=4)
    logits, _ = model(batch)
    F.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    assert model.context_ffn[0].weight.grad.abs().sum() > 0
    assert model.context_encoder.layers[0].weight.grad.abs().sum() > 0  # the TCN still trains through both paths
    model.eval()
    before = model(batch)[0]
    with torch.no_grad():
        model.context_ffn[2].bias.add_(1.0)
    assert not torch.allclose(model(batch)[0], before)
    with pytest.raises(ConfigError, match="model.context.ffn=8: needs model.context.merge=context"):
        preset_config("lap", {"context": {"kind": "tcn", "merge": "concat", "ffn": 8}})
    with pytest.raises(ConfigError, match="model.context.ffn"):
        preset_config("lap", {"context": {"kind": "tcn", "merge": "context", "ffn": -1}})


def test_context_merge_needs_a_module_that_reads_context():
    for backbone in ("din", "sdim"):
        with pytest.raises(ConfigError, match="model.context.merge=context"):
            preset_config(backbone, {"context": {"kind": "tcn", "merge": "context"}})
    preset_config("din", {"context": {"kind": "tcn", "merge": "concat"}})


def test_crp_weight_zero_is_exactly_the_backbone():
    lap, lcn = small("lap"), small("lcn", crp={"weight": 0.0})
    for (n1, p1), (n2, p2) in zip(lap.state_dict().items(), lcn.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (lap, lcn)]
    batch = make_batch(b=8, s=5, l=30, seed=1)
    for model, opt in zip((lap, lcn), opts):
        logits, aux = model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"]) + sum(model.aux_weights[k] * v for k, v in aux.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p1, p2 in zip(lap.parameters(), lcn.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    # With a positive weight the item embeddings move differently.
    assert small("lcn").aux_weights == {"crp": 16.0}


def test_unknown_and_inconsistent_config_keys_raise():
    with pytest.raises(ConfigError, match="model.lap.k3"):
        preset_config("lcn", {"lap": {"k3": 1}})
    with pytest.raises(ConfigError, match="unknown model"):
        preset_config("nope")
    with pytest.raises(ConfigError, match="model.msia"):
        preset_config("lap", {"msia": {"enabled": True}})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_forward_creates_no_tensor_off_the_input_device(name):
    model = small(name).to("meta")
    batch = {k: v.to("meta") for k, v in make_batch(b=4, s=5, l=30).items()}
    with OffMetaSpy() as spy:
        logits, aux = model(batch)
    assert logits.device.type == "meta" and logits.shape == (4,)
    assert not spy.offenders, spy.offenders


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_head_dropout_acts_in_training_only(dropout, small_vocab, batch_factory):
    """``model.head_dropout``: a Dropout after each hidden layer of the head; training passes differ, evaluation
    is deterministic; at 0 there is none and training passes agree."""
    torch.manual_seed(0)
    model = build_model(preset_config("lap", {"features": {"emb_dim": 8, "item_dropout": 0.0}, "head": [16, 8], "head_dropout": dropout,
                                              "lap": {"k1": 8, "k2": 4, "att_dim": 8, "heads": 2, "ffn_dim": 16}}),
                        small_vocab)
    drops = [m for m in model.head.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == (2 if dropout else 0) and all(m.p == dropout for m in drops)
    batch = batch_factory()
    model.train()
    first, second = model(batch)[0], model(batch)[0]
    assert torch.equal(first, second) == (dropout == 0)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch)[0], model(batch)[0])


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_match_counts_dropout_zeroes_whole_rows_in_training_only(dropout, small_vocab, batch_factory):
    """``model.match_counts_dropout``: in training each row's count inputs are zeroed together with that
    probability (the rest kept as they are, not rescaled); evaluation reads every row's counts; at 0 none is."""
    from raylsm.models.ctr import match_counts

    torch.manual_seed(0)
    model = build_model(preset_config("lap", {"features": {"emb_dim": 8}, "head": [16, 8], "match_counts_dropout": dropout,
                                              "lap": {"k1": 8, "k2": 4, "att_dim": 8, "heads": 2, "ffn_dim": 16}}),
                        small_vocab)
    batch = batch_factory(b=64, ll_lengths=[40] * 64)
    batch["ll_cates"][:, -3:] = batch["item_cate"].unsqueeze(1)  # (left-padded: the last behaviours are real)
    counts = match_counts(batch)
    assert counts.abs().sum(1).gt(0).all()  # every row has a count to drop
    seen: list = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, -6:].detach()))
    model.train()
    model(batch)
    kept = seen[-1].eq(counts).all(1)
    dropped = seen[-1].eq(0).all(1)
    assert (kept | dropped).all()  # a row keeps all its counts unscaled or loses all of them
    if dropout:
        assert 16 <= int(dropped.sum()) <= 48, int(dropped.sum())
    else:
        assert kept.all()
    model.eval()
    with torch.no_grad():
        model(batch)
    torch.testing.assert_close(seen[-1], counts)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_item_dropout_drops_item_ids_in_training_only_and_the_counts_read_the_real_ids(dropout, small_vocab, batch_factory):
    """``model.features.item_dropout``: in training each item id (candidate and sequences) becomes the padding id
    with that probability, categories untouched; evaluation reads every id; the count inputs count the real ids."""
    from raylsm.models.ctr import ITEM_COLUMNS, drop_item_ids, match_counts

    torch.manual_seed(0)
    batch = batch_factory(b=64, ll_lengths=[40] * 64)
    batch["ll_items"][:, -3:] = batch["item_id"].unsqueeze(1)  # item matches for the count inputs to count
    dropped = drop_item_ids(batch, 0.5)
    for name in ITEM_COLUMNS:
        real = batch[name] > 0
        gone = real & dropped[name].eq(0)
        assert 0.4 < float(gone.sum() / real.sum()) < 0.6, name  # about half of the real ids
        assert torch.equal(dropped[name][~gone], batch[name][~gone])  # the others (and the padding) as they were
    assert all(torch.equal(dropped[k], batch[k]) for k in batch if k not in ITEM_COLUMNS)  # categories, ctx, ...

    cfg = {"features": {"emb_dim": 8, "item_dropout": dropout}, "head": [16, 8],
           "lap": {"k1": 8, "k2": 4, "att_dim": 8, "heads": 2, "ffn_dim": 16}}
    model = build_model(preset_config("lap", cfg), small_vocab)
    seen: list = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model.train()
    first = model(batch)[0]
    torch.testing.assert_close(seen[-1][:, -6:], match_counts(batch))  # the real ids' counts, dropout or not
    assert torch.equal(first, model(batch)[0]) == (dropout == 0)  # a new draw of dropped ids each step
    model.eval()
    with torch.no_grad():
        evaluated = model(batch)[0]
        model.cfg.features.item_dropout = 0.0
        assert torch.equal(evaluated, model(batch)[0])  # evaluation reads every id
    for name in ("lap", "din", "sim_soft", "eta", "sdim", "twin", "cain"):  # the presets' measured reading
        assert preset_config(name).features.item_dropout == 0.8, name
    for name in ("lcn", "lcn_paper", "cain_paper"):
        assert preset_config(name).features.item_dropout == 0.0, name

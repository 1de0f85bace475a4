"""train.lr_decay: the learning rate after each epoch, on both loops' optimizers, and off at 1."""

from __future__ import annotations

import pytest
import torch

from raylsm.train.config import resolve_job
from raylsm.train.step import decay_lr


@pytest.mark.parametrize("factor,expect", [(0.5, [0.0015, 0.00075]), (1.0, [0.003, 0.003])])
def test_decay_lr_multiplies_every_group_once_per_call(factor, expect):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.003}], lr=0.003)
    seen = []
    for _ in range(2):
        decay_lr(opt, factor)
        seen.append([g["lr"] for g in opt.param_groups])
    assert seen == [[expect[0]] * 2, [expect[1]] * 2]
    # The decayed rate is part of the optimizer's state: a resumed run continues from it.
    fresh = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.003)
    fresh.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in fresh.param_groups] == [expect[1]] * 2


def test_lr_decay_is_checked():
    # A preset's own reading (raylsm.train.config.PRESET_TRAIN), under the job's and the command's.
    assert resolve_job(preset="lcn").train.lr_decay == 1.0 and resolve_job(preset="cain").train.lr_decay == 1.0
    for name in ("lcn", "cain"):  # their rollback at a plateau, and the patience that lets the run go on
        train = resolve_job(preset=name).train
        assert (train.on_plateau, train.early_stop_patience) == ("rollback", 2), name
    for name in ("lcn_paper", "cain_paper", "lap", "din"):  # the papers' runs and the baselines: no rollback
        train = resolve_job(preset=name).train
        assert (train.on_plateau, train.early_stop_patience) == ("continue", 1), name
    for name in ("lap", "din", "sim_soft", "eta", "sdim", "twin"):
        assert resolve_job(preset=name).train.lr_decay == 0.1, name
    assert resolve_job(preset="lap", overrides=["train.lr_decay=1"]).train.lr_decay == 1.0
    with pytest.raises(Exception, match="train.lr_decay"):
        resolve_job(preset="lap", overrides=["train.lr_decay=.nan"])
    with pytest.raises(Exception, match=r"train.lr_decay: must be in \(0, 1\]"):
        resolve_job(preset="lap", overrides=["train.lr_decay=1.5"])


def _trained_step(model, opt, seed: int) -> None:
    torch.manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(8, 3)).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("rollback", [True, False], ids=["rollback", "continue"])
def test_an_epoch_without_a_better_val_auc_is_rolled_back_and_the_rate_lowered(rollback):
    """``train.on_plateau``: rollback restores the best epoch's weights and Adam moments and multiplies the rate by
    ``plateau_lr_factor``; continue leaves the epoch's weights and the rate as they are."""
    from raylsm.train.step import BestState

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    best = BestState(rollback, 0.1)
    _trained_step(model, opt, 0)
    assert best.after_epoch(model, opt, {"val_auc": 0.7, "epochs_since_best": 0}) is None  # the best epoch: kept
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    kept_moment = opt.state[model[0].weight]["exp_avg"].clone()
    _trained_step(model, opt, 1)  # an epoch that over-fits
    after = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(after["0.weight"], kept["0.weight"])
    what = best.after_epoch(model, opt, {"val_auc": 0.6, "epochs_since_best": 1})
    if rollback:
        assert what.startswith("the best epoch's model and optimizer state restored, rate x0.1")
        assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
        assert torch.equal(opt.state[model[0].weight]["exp_avg"], kept_moment)
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.0003)]
        _trained_step(model, opt, 2)  # the optimizer still drives the restored parameters
        assert not torch.equal(model.state_dict()["0.weight"], kept["0.weight"])
    else:
        assert what is None and all(torch.equal(v, after[k]) for k, v in model.state_dict().items())
        assert [g["lr"] for g in opt.param_groups] == [0.003]
    # No validation split: nothing to compare, nothing done.
    assert best.after_epoch(model, opt, {"auc": 0.6}) is None


def test_a_process_without_the_best_state_lowers_the_rate_without_restoring():
    from raylsm.train.step import BestState

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    before = model.weight.detach().clone()
    what = BestState(True, 0.5).after_epoch(model, opt, {"val_auc": 0.6, "epochs_since_best": 1})
    assert what.startswith("rate x0.5 without restoring") and opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert torch.equal(model.weight, before)


def test_on_plateau_is_checked():
    assert resolve_job(preset="lap").train.on_plateau == "continue"
    with pytest.raises(Exception, match="train.on_plateau=rollback: needs train.early_stop_patience 0 or >= 2"):
        resolve_job(preset="lap", overrides=["train.on_plateau=rollback"])
    job = resolve_job(preset="lap", overrides=["train.on_plateau=rollback", "train.early_stop_patience=2"])
    assert job.train.on_plateau == "rollback" and job.train.plateau_lr_factor == 0.1
    with pytest.raises(Exception, match=r"train.plateau_lr_factor: must be in \(0, 1\]"):
        resolve_job(preset="lap", overrides=["train.plateau_lr_factor=0"])


@pytest.mark.parametrize("setting,epochs_run", [(["train.rollback_finetune=true"], 3),
                                                (["train.rollback_finetune=false"], 2),
                                                (["train.on_plateau=continue", "train.early_stop_patience=0"], 2)],
                         ids=["fine-tune", "fine-tune off", "continue"])
def test_a_rollback_after_the_budgets_last_epoch_is_followed_by_its_fine_tune(tmp_path, monkeypatch, setting, epochs_run):
    """``train.rollback_finetune``: the budget's last epoch brings no better validation AUC, so (with rollback) one
    more epoch fine-tunes the restored best state at the lowered rate; off, or without rollback, the run ends at the
    budget. Either way the returned model is the best epoch's."""
    import raylsm.train.local as local
    from raylsm.data.contract import read_manifest
    from raylsm.models.layers import Vocab
    from tests.conftest import small_world_dataset

    data = small_world_dataset(tmp_path / "ds", rows=600, users=60)
    real, calls = local.evaluate_arrays, []
    scripted_val = [0.70, 0.60, 0.65]  # epoch 0 the best; epoch 1, the budget's last, worse; the fine-tune too

    def evaluate(labels, logits, users):  # each epoch scores test, then validation
        out = real(labels, logits, users)
        calls.append(out)
        if len(calls) % 2 == 0:
            out["auc"] = scripted_val[len(calls) // 2 - 1]
        return out

    monkeypatch.setattr(local, "evaluate_arrays", evaluate)
    job = resolve_job(preset="lcn", overrides=[
        f"data.path={data}", "data.ll_len=40", "data.st_len=10", "model.features.emb_dim=8", "model.head=[16]",
        "model.lap.k1=16", "model.lap.k2=8", "model.lap.att_dim=8", "model.lap.heads=2", "model.lap.ffn_dim=16",
        "model.crp.m=32", "train.batch_size=64", "train.epochs=2", "train.max_steps_per_epoch=3", *setting])
    assert job.train.lr == 0.003
    captured: dict = {}
    keep = local.BestState.keep

    def keep_and_copy(self, model, optimizer):
        keep(self, model, optimizer)
        captured["best"] = {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(local.BestState, "keep", keep_and_copy)
    model, history = local.fit_local(job, Vocab.from_manifest(read_manifest(data)))
    assert [h["epoch"] for h in history] == list(range(epochs_run))
    assert [h["val_auc"] for h in history] == scripted_val[:epochs_run]
    # The rate each epoch trained at: the fine-tune at a tenth of it.
    assert [h["lr"] for h in history] == pytest.approx([0.003, 0.003, 0.0003][:epochs_run])
    assert history[-1]["epochs_since_best"] == epochs_run - 1
    assert local.chosen_epoch(history)["epoch"] == 0
    # The returned model holds epoch 0's weights (the best epoch's copy, restored at the end in every setting).
    assert all(torch.equal(v, captured["best"][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("since,epoch,setting,epochs,lowered", [
    (1, 1, [], 3, True),  # the budget's last epoch: the rollback and its fine-tune epoch
    (1, 0, [], 2, True),  # an earlier epoch: the rollback, the budget as it is
    (0, 1, [], 2, False),  # the checkpoint is the best: nothing pending
    (1, 1, ["train.rollback_finetune=false"], 2, True),
    (1, 1, ["train.on_plateau=continue", "train.early_stop_patience=1"], 2, False),
], ids=["last epoch", "earlier epoch", "best checkpoint", "fine-tune off", "continue"])
def test_a_resumed_run_takes_the_rollback_its_checkpoint_left_pending(since, epoch, setting, epochs, lowered):
    """A worker restarted from the checkpoint of an epoch without a better validation AUC: the rollback after that
    epoch was lost with the worker; the resumed run lowers the rate (no best state to restore in this process)
    and, after the budget's last epoch, trains the fine-tune epoch."""
    from raylsm.train.step import BestState, resume_plateau

    job = resolve_job(preset="lcn", overrides=["train.epochs=2", *setting])
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    before = model.weight.detach().clone()
    best = BestState(True, job.train.plateau_lr_factor) if job.train.on_plateau == "rollback" else None
    previous = {"epoch": epoch, "val_auc": 0.6, "best_val_auc": 0.7, "epochs_since_best": since}
    got, what = resume_plateau(best, job.train, epoch + 1, previous, model, opt)
    assert got == epochs
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0003 if lowered else 0.003)
    assert (what or "").startswith("rate x0.1 without restoring") == lowered
    assert torch.equal(model.weight, before)
    assert resume_plateau(best, job.train, 0, None, model, opt) == (2, None)  # a fresh run

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
    assert resolve_job(preset="lap").train.lr_decay == 0.1 and resolve_job(preset="din").train.lr_decay == 0.1
    assert resolve_job(preset="lap", overrides=["train.lr_decay=1"]).train.lr_decay == 1.0
    with pytest.raises(Exception, match="train.lr_decay"):
        resolve_job(preset="lap", overrides=["train.lr_decay=.nan"])
    with pytest.raises(Exception, match=r"train.lr_decay: must be in \(0, 1\]"):
        resolve_job(preset="lap", overrides=["train.lr_decay=1.5"])

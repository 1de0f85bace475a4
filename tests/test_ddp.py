"""Every preset trains under DDP with 2 CPU workers, and resume restores weights, optimizer and RNG exactly.

One TorchTrainer (2 workers, gloo) runs the project's ``train_loop_per_worker`` once per preset, two steps
each: DDP reports a parameter left without a gradient at the second step, so two steps are what it takes to
fail. Every run reports a checkpoint whose ``train_rows`` counts the rows of both workers.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from raylsm.data.collate import CollateSpec
from raylsm.data.contract import read_manifest
from raylsm.models.ctr import build_model
from raylsm.models.config import PRESETS
from raylsm.models.layers import Vocab
from raylsm.train.config import job_to_dict, resolve_job
from raylsm.train.checkpoint import load_checkpoint, restore_checkpoint
from raylsm.train.step import unused_parameters
from tests.conftest import small_world_dataset

BATCH = 32
STEPS = 2
TINY = [
    "data.ll_len=20", "data.st_len=5", "model.features.emb_dim=8", "model.head=[16]",
    "model.lap.k1=8", "model.lap.k2=4", "model.lap.att_dim=8", "model.lap.heads=2", "model.lap.ffn_dim=16",
    "model.crp.m=16", f"train.batch_size={BATCH}", "train.eval_batch_size=256", "train.epochs=1",
    f"train.max_steps_per_epoch={STEPS}",
]
# An enhancement (CRP) on a backbone that leaves the ctx/gap tables unused.
EXTRA = {"lcn+sim_soft(no ctx)": ("lcn", ["model.lifelong=sim_soft", "model.sim_soft.esu_ctx=false"])}


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    return small_world_dataset(tmp_path_factory.mktemp("ddp") / "synth", rows=1200, ll_len=20, st_len=5)


def _jobs(data: Path, tmp: Path) -> dict:
    runs = {name: (name, []) for name in sorted(PRESETS)} | EXTRA
    return {
        name: resolve_job(preset=preset, overrides=[f"data.path={data}", f"storage={tmp}", *TINY, *extra])
        for name, (preset, extra) in runs.items()
    }


def _each_job(config: dict) -> None:
    """Runs the project's worker function once per job, in this worker group.

    Each job is a fresh training: the checkpoint the previous job reported is not handed to the next.
    """
    from unittest import mock

    from raylsm.train.loop import train_loop_per_worker

    for job in config["jobs"]:
        with mock.patch("ray.train.get_checkpoint", return_value=None):
            train_loop_per_worker({"job": job, "vocab": config["vocab"], "mlflow_run_id": None, "tracking_uri": None})


def test_unused_parameters_found_only_where_there_are_some(ddp_data, tmp_path):
    vocab = Vocab.from_manifest(read_manifest(ddp_data))
    jobs = _jobs(ddp_data, tmp_path)
    found = {name: unused_parameters(job, vocab) for name, job in jobs.items()}
    assert found["din"] == ["features.tables.ctx.weight", "features.tables.gap.weight"]
    assert found["sdim"] and found["lcn+sim_soft(no ctx)"]
    for name in ("lcn", "cain", "lap", "twin"):  # no graph walk per step where none is needed
        assert found[name] == [], name
    # The probe draws no random numbers from the generator the training uses.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    unused_parameters(jobs["cain"], vocab)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.ray
def test_every_preset_trains_two_ddp_steps_with_two_workers(ray_local, ddp_data, tmp_path):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylsm.train.backend import LoopbackTorchConfig, torch_config

    from raylsm.data.pipeline import read_split

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests package
    assert isinstance(torch_config(), LoopbackTorchConfig)
    jobs = _jobs(ddp_data, tmp_path)
    manifest = read_manifest(ddp_data)
    spec = CollateSpec(5, 20, tuple(manifest.profile_fields))
    trainer = TorchTrainer(
        _each_job,
        train_loop_config={"jobs": [job_to_dict(j) for j in jobs.values()], "vocab": Vocab.from_manifest(manifest).__dict__},
        torch_config=torch_config(),  # gloo over a file rendezvous on this loopback cluster
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="ddp-presets", storage_path=str(tmp_path / "runs"),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
        datasets={"train": read_split(ddp_data, "train", spec, shuffle_seed=0), "test": read_split(ddp_data, "test", spec)},
    )
    stores_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "raylsm-pg-*")))
    result = trainer.fit()
    assert result.error is None, result.error
    # The file rendezvous of the group is removed with the group.
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "raylsm-pg-*"))) - stores_before == set()
    reported = sorted(result.best_checkpoints, key=lambda cm: cm[0].path)
    assert len(reported) == len(jobs)
    trained = []
    for checkpoint, metrics in reported:
        _, meta = load_checkpoint(checkpoint.path)
        trained.append((meta["job"]["preset"], meta["job"]["model"]["lifelong"]))
        assert metrics["train_rows"] == 2 * STEPS * BATCH, (meta["job"]["preset"], metrics)  # both workers, two steps
    assert sorted(trained) == sorted((j.preset, j.model.lifelong) for j in jobs.values())


def test_restore_checkpoint_restores_weights_optimizer_and_rng_exactly(ddp_data, tmp_path):
    from raylsm.train.checkpoint import save_checkpoint

    job = _jobs(ddp_data, tmp_path)["lcn"]
    vocab = Vocab.from_manifest(read_manifest(ddp_data))
    torch.manual_seed(1)
    model = build_model(job.model, vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):  # a few steps so that Adam has moments and a step count
        optimizer.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
    torch.rand(5)  # move the generator away from its seed
    save_checkpoint(str(tmp_path), model, optimizer, 4, job, vocab, {"auc": 0.5})
    saved, _ = load_checkpoint(str(tmp_path))

    torch.manual_seed(2)  # a fresh worker: other weights, empty optimizer, another RNG position
    fresh = build_model(job.model, vocab)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    name, param = next(iter(fresh.state_dict().items()))
    assert not torch.equal(param, saved["model"][name])
    assert restore_checkpoint(str(tmp_path), fresh, fresh_opt) == 5

    for key, value in saved["model"].items():
        assert torch.equal(fresh.state_dict()[key], value), key
    restored = fresh_opt.state_dict()
    assert restored["param_groups"] == saved["optimizer"]["param_groups"]
    assert restored["state"].keys() == saved["optimizer"]["state"].keys() and restored["state"]
    for idx, st in saved["optimizer"]["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(restored["state"][idx][key]), torch.as_tensor(value)), (idx, key)
    assert torch.equal(torch.get_rng_state(), saved["rng"][0]["torch"])
    import random

    import numpy as np

    from raylsm.train.checkpoint import set_rng_state

    set_rng_state(saved["rng"][0])
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_checkpoint(str(tmp_path), fresh, fresh_opt)
    # The same random numbers as the saved run would draw, from every generator.
    torch.testing.assert_close(torch.rand(4), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_each_rank_resumes_its_own_generators_and_another_world_size_is_reseeded(ddp_data, tmp_path, capsys):
    from raylsm.train.checkpoint import rng_state, save_checkpoint
    from raylsm.train.step import seed_everything

    job = _jobs(ddp_data, tmp_path)["lcn"]
    vocab = Vocab.from_manifest(read_manifest(ddp_data))
    model = build_model(job.model, vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    states, draws = [], []
    for rank in range(2):  # what two ranks seeded seed + rank hold at the checkpoint
        seed_everything(7 + rank)
        torch.rand(3)
        states.append(rng_state())
        draws.append(torch.rand(5))
    assert not torch.equal(draws[0], draws[1])
    save_checkpoint(str(tmp_path), model, optimizer, 2, job, vocab, {}, rng_states=states)
    for rank in range(2):
        torch.manual_seed(123)
        assert restore_checkpoint(str(tmp_path), model, optimizer, rank=rank, world_size=2, seed=7) == 3
        torch.testing.assert_close(torch.rand(5), draws[rank])
    # Three ranks from a two-rank checkpoint: no exact continuation, but distinct, seeded streams per rank.
    fresh = []
    for rank in range(3):
        restore_checkpoint(str(tmp_path), model, optimizer, rank=rank, world_size=3, seed=7)
        fresh.append(torch.rand(5))
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[1], fresh[2])
    restore_checkpoint(str(tmp_path), model, optimizer, rank=1, world_size=3, seed=7)
    torch.testing.assert_close(torch.rand(5), fresh[1])  # deterministic
    assert "written by 2 worker(s), resumed on 3" in capsys.readouterr().err

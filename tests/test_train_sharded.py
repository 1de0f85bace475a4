"""``train.embedding_sharding = row`` through the Ray Train worker on a local 2-CPU Ray: each of 2 workers holds
half of the item table, the run resumes from its checkpoint, and the checkpoint (whole tables and whole
row-wise Adam moments) resumes on one unsharded process and serves from it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raylsm.config import ConfigError
from raylsm.models.ctr import build_model
from raylsm.models.layers import Vocab
from raylsm.train.config import job_to_dict, resolve_job
from tests.test_sparse_embeddings import JOB_TINY

ITEM = "features.tables.item.weight"


def _moments(optimizer_state: dict, rows: int) -> list[dict]:
    """The optimizer entries whose moments have ``rows`` rows (the item table's)."""
    return [s for s in optimizer_state["state"].values() if "exp_avg" in s and s["exp_avg"].shape[0] == rows]


@pytest.mark.ray
def test_two_sharded_workers_train_resume_and_load_on_one_process(ray_local, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylsm.data.collate import CollateSpec, iter_local_batches
    from raylsm.data.contract import read_manifest, shard_files
    from raylsm.data.pipeline import read_split
    from raylsm.serving import LifelongCTRModel
    from raylsm.train.backend import torch_config
    from raylsm.train.checkpoint import load_checkpoint, model_from_checkpoint, restore_checkpoint
    from raylsm.train.loop import train_loop_per_worker
    from raylsm.train.optim import build_optimizer
    from raylsm.train.step import train_epoch
    from tests.conftest import small_world_dataset

    data = small_world_dataset(tmp_path / "synth", rows=600, ll_len=12, st_len=4)
    manifest = read_manifest(data)
    vocab = Vocab.from_manifest(manifest)
    spec = CollateSpec(4, 12, tuple(manifest.profile_fields))
    base = [f"data.path={data}", f"storage={tmp_path}", *JOB_TINY, "train.batch_size=32", "train.max_steps_per_epoch=2",
            "train.embedding_update=sparse", "train.embedding_sharding=row", "data.val_fraction=0"]

    def fit(job, name: str) -> str:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": job_to_dict(job), "vocab": vocab.__dict__, "mlflow_run_id": None, "tracking_uri": None},
            torch_config=torch_config(),
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path / "runs"),
                                           failure_config=ray.train.FailureConfig(max_failures=0)),
            datasets={"train": read_split(data, "train", spec, shuffle_seed=0), "test": read_split(data, "test", spec)},
        )
        result = trainer.fit()
        assert result.error is None, result.error
        return result.checkpoint.path

    first = fit(resolve_job(preset="lap", overrides=[*base, "train.epochs=1"]), "sharded-a")
    state, meta = load_checkpoint(first)
    # Every worker's own item tensor held at most this share of the rows (the largest over the workers).
    assert meta["metrics"]["item_rows_fraction"] == pytest.approx(((vocab.item + 1) // 2) / vocab.item)
    assert meta["metrics"]["item_rows_fraction"] <= 0.6
    # The unsharded layout: the whole item table and its whole row-wise Adam moments, both shards trained.
    assert state["model"][ITEM].shape == (vocab.item, 8)
    (moments,) = _moments(state["optimizer"], vocab.item)
    assert float(moments["step"]) == 2.0
    touched = moments["exp_avg_sq"].abs().sum(1).gt(0).nonzero().squeeze(1)
    assert touched.numel() > 20 and {0, 1} <= set((touched % 2).tolist())  # ids of both workers' shards moved

    # Resumed by two sharded workers: each takes its rows of the whole tables and moments.
    second = fit(resolve_job(preset="lap", overrides=[*base, "train.epochs=2", f"resume_from={first}"]), "sharded-b")
    state2, meta2 = load_checkpoint(second)
    assert state2["epoch"] == 1 and meta2["metrics"]["train_rows"] == 2 * 2 * 32
    (moments2,) = _moments(state2["optimizer"], vocab.item)
    assert float(moments2["step"]) == 4.0  # the restored count went on: 2 steps per epoch
    assert not torch.equal(state2["model"][ITEM], state["model"][ITEM])

    # One unsharded CPU process resumes it: weights and whole moments restored exactly, and it trains on.
    job = resolve_job(preset="lap", overrides=[*base, "train.embedding_sharding=none", "train.epochs=3"])
    model = build_model(job.model, vocab)
    opt = build_optimizer(model, job.train.lr, job.train.fused_adam, "sparse")
    assert restore_checkpoint(second, model, opt, rank=0, world_size=1, seed=0) == 2
    assert torch.equal(model.state_dict()[ITEM], state2["model"][ITEM])
    (mine,) = _moments(opt.state_dict(), vocab.item)
    assert torch.equal(mine["exp_avg"], moments2["exp_avg"]) and torch.equal(mine["exp_avg_sq"], moments2["exp_avg_sq"])
    batch = {k: torch.from_numpy(v) for k, v in next(iter_local_batches(data, "train", spec, 32)).items()}
    stats = train_epoch(model, opt, [batch], torch.device("cpu"))
    assert np.isfinite(stats.train_loss) and float(_moments(opt.state_dict(), vocab.item)[0]["step"]) == 5.0

    # The serving model (what MLflow logs) loads the checkpoint in this one process and scores contract rows.
    import pyarrow.parquet as pq

    served = LifelongCTRModel()
    served.load_context(SimpleNamespace(artifacts={"checkpoint": second}))
    frame = pq.read_table(shard_files(data, "test")[0], partitioning=None).slice(0, 16).to_pandas()
    test_batch = {k: torch.from_numpy(v) for k, v in next(iter_local_batches(data, "test", spec, 16)).items()}
    reference, _ = model_from_checkpoint(second)
    reference.eval()
    with torch.no_grad():
        expected = torch.sigmoid(reference(test_batch)[0]).numpy()
    np.testing.assert_allclose(np.asarray(served.predict(None, frame)), expected, rtol=1e-5, atol=1e-6)


def test_row_sharding_needs_sparse_updates():
    with pytest.raises(ConfigError, match=r"^train.embedding_sharding: row needs train.embedding_update=sparse or auto, got dense$"):
        resolve_job(preset="lcn", overrides=["train.embedding_sharding=row", "train.embedding_update=dense"])
    # auto (the default) with row sharding is sparse, whatever the vocabulary and the worker count.
    assert resolve_job(preset="lcn", overrides=["train.embedding_sharding=row"]).train.embedding_update == "sparse"
    with pytest.raises(ConfigError, match="embedding_sharding"):
        resolve_job(preset="lcn", overrides=["train.embedding_sharding=column"])
    assert resolve_job(preset="lcn").train.embedding_sharding == "none"

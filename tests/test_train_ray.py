"""Ray Train end to end on a local 2-CPU Ray: 1 vs 2 workers, exact metrics, resume, MLflow, row-sharded tables.

A training worker lost mid-run and replaced from the last checkpoint: the node-loss run of
``tests/test_faults.py`` (its worker goes with its node)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from raylsm.data.collate import CollateSpec, iter_local_batches
from raylsm.data.contract import read_manifest
from raylsm.train.config import resolve_job
from raylsm.train.checkpoint import load_checkpoint, model_from_checkpoint
from raylsm.train.step import predict
from raylsm.train.run import run_training
from tests.conftest import small_world_dataset

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return small_world_dataset(tmp_path_factory.mktemp("data") / "synth", rows=8000)


def _job(data: Path, tmp: Path, *extra: str, preset: str = "lcn"):
    return resolve_job(
        preset=preset,
        overrides=[
            f"data.path={data}", "data.ll_len=40", "data.st_len=10",
            "model.features.emb_dim=8", "model.head=[32,16]", "model.lap.k1=16", "model.lap.k2=8",
            "model.lap.att_dim=8", "model.lap.heads=2", "model.lap.ffn_dim=16", "model.crp.m=64",
            "model.crp.weight=0.01", "train.batch_size=128", "train.eval_batch_size=512", "train.cpus_per_worker=0.5",
            "train.epochs=3",
            "train.lr=0.005", f"storage={tmp / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            *extra,
        ],
    )


def _reference_metrics(checkpoint: str, data: Path) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Score a checkpoint in process and compute AUC/logloss with sklearn."""
    model, meta = model_from_checkpoint(checkpoint)
    spec = CollateSpec(10, 40, tuple(read_manifest(data).profile_fields))
    batches = ({k: torch.from_numpy(v) for k, v in b.items()} for b in iter_local_batches(data, "test", spec, 512))
    p = predict(model, batches, torch.device("cpu"))
    probs = 1 / (1 + np.exp(-p["logits"].astype(np.float64)))
    return roc_auc_score(p["labels"], p["logits"]), log_loss(p["labels"], probs), p["labels"], p["logits"]


def test_one_and_two_workers_metrics_exact_and_mlflow(ray_local, tiny_data, tmp_path, capsys):
    # Two workers with row-sharded tables (``train.embedding_sharding=row``: each holds half of the item table and
    # its row-wise Adam moments, looked up with all_to_all; the smaller tables trained row-sparse, their rows
    # exchanged; DDP over the dense parameters only); then one worker continues that run from its checkpoint
    # (--resume-from). Each run's metrics, gathered over the whole test split, must equal sklearn on its own
    # checkpoint's predictions: with one worker and with two (the ranks' scores gathered).
    results = {2: run_training(_job(tiny_data, tmp_path, "train.workers=2", "name=w2", "train.embedding_sharding=row"))}

    # --resume-from: a new run continues from a given checkpoint (its weights, optimizer and epoch) and trains
    # only the epochs after it: here the two sharded workers' checkpoint, whole (every table and its row-wise
    # moments in the unsharded layout), by one unsharded worker (the optimizer's state goes through the
    # checkpoint onto another worker count). (Resuming a run of the same name from its own checkpoints, as Ray
    # hands them back: the SIGKILL-then-restart sequence of tests/test_signals.py; whole states taken back by
    # sharded ranks: tests/test_sharded_embeddings.py.)
    state, meta = load_checkpoint(results[2]["checkpoint"])
    assert state["epoch"] == results[2]["epoch"]
    from raylsm.models.layers import Vocab

    vocab_items = Vocab.from_manifest(read_manifest(tiny_data)).item
    # Every worker's own item tensor held at most this share of the rows (the largest over the workers).
    assert meta["metrics"]["item_rows_fraction"] == pytest.approx(((vocab_items + 1) // 2) / vocab_items)
    assert len(state["optimizer"]["param_groups"]) == 2  # the row-wise part (tables) and Adam (dense parameters)
    item = "features.tables.item.weight"
    assert state["model"][item].shape[0] == vocab_items  # the whole table
    (moments,) = [s for s in state["optimizer"]["state"].values() if "exp_avg" in s and s["exp_avg"].shape[0] == vocab_items]
    touched = moments["exp_avg_sq"].abs().sum(1).gt(0).nonzero().squeeze(1)
    assert touched.numel() > 20 and {0, 1} <= set((touched % 2).tolist())  # ids of both workers' shards moved
    resumed = results[1] = run_training(_job(tiny_data, tmp_path, f"train.epochs={state['epoch'] + 2}",
                                             "train.workers=1", "train.embedding_update=sparse",
                                             "train.early_stop_patience=0", "train.rollback_finetune=false",
                                             "name=from-ckpt",  # exactly the one epoch after the checkpoint's
                                             f"resume_from={results[2]['checkpoint']}"))
    for workers, r in results.items():
        assert r["auc"] > 0.55, (workers, r)
        ref_auc, ref_logloss, labels, _ = _reference_metrics(r["checkpoint"], tiny_data)
        assert r["auc"] == pytest.approx(ref_auc, abs=1e-5)
        assert r["logloss"] == pytest.approx(ref_logloss, abs=1e-5)
        assert len(labels) == read_manifest(tiny_data).splits["test"]["rows"]
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=resumed["tracking_uri"]).get_metric_history(resumed["mlflow_run_id"], "test_auc")
    assert [m.step for m in history] == [state["epoch"] + 1]
    state2, _ = load_checkpoint(resumed["checkpoint"])
    assert state2["epoch"] == state["epoch"] + 1 and len(state2["optimizer"]["param_groups"]) == 2
    assert state2["model"][item].shape == state["model"][item].shape  # the whole table (not sharded)
    assert not torch.equal(state2["model"][item], state["model"][item])  # the resumed run trained the table

    # `raylsm eval` on the best checkpoint reproduces the run's figures.
    from raylsm.cli import main

    assert main(["eval", "--checkpoint", results[2]["checkpoint"], "--data", str(tiny_data)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("auc", "gauc", "logloss"):
        assert evaluated[key] == pytest.approx(results[2][key], abs=1e-5)

    # MLflow: params, per-epoch metrics, tags, and a model that reloads and scores a batch (the sharded run's: its
    # checkpoint serves in one unsharded process).
    import mlflow

    r = results[2]
    client = MlflowClient(tracking_uri=r["tracking_uri"])
    run = client.get_run(r["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.lap.k1"] == "16" and run.data.params["train.workers"] == "2"
    assert run.data.tags["raylsm.model"] == "lcn" and run.data.tags["raylsm.dataset"] == "synthetic-cross-domain"
    # lcn rolls back at a plateau: after the budget's last epoch (2) that brings one more, the fine-tune of the
    # restored best state at a tenth of the rate (train.rollback_finetune), on both sharded workers alike.
    series = {key: {m.step: m.value for m in client.get_metric_history(r["mlflow_run_id"], key)}
              for key in ("epochs_since_best", "lr")}
    epochs = 4 if series["epochs_since_best"][2] == 1 else 3  # at 2 the run stopped (patience 2)
    assert r["epochs_run"] == epochs
    if epochs == 4:
        assert series["lr"][3] == pytest.approx(series["lr"][2] * 0.1)
    for key in ("val_auc", "val_logloss", "test_auc", "test_gauc", "test_logloss", "train_loss", "crp_loss", "samples_per_s"):
        history = client.get_metric_history(r["mlflow_run_id"], key)
        assert [m.step for m in history] == list(range(epochs)), key
    assert client.get_metric_history(r["mlflow_run_id"], "crp_loss")[0].value > 0
    # Honest headline: the kept checkpoint is the best by validation AUC, and the run's auc is its test AUC.
    val = {m.step: m.value for m in client.get_metric_history(r["mlflow_run_id"], "val_auc")}
    test = {m.step: m.value for m in client.get_metric_history(r["mlflow_run_id"], "test_auc")}
    best_epoch = max(val, key=val.get)
    assert r["epoch"] == best_epoch and r["auc"] == pytest.approx(test[best_epoch])
    assert run.data.metrics["auc"] == pytest.approx(test[best_epoch]) and run.data.tags["raylsm.checkpoint"] == r["checkpoint"]
    assert "model.twin.k" not in run.data.params and run.data.tags.get("mlflow.user")
    assert run.inputs.dataset_inputs[0].dataset.name == "synthetic-cross-domain"
    assert "job.yaml" in {a.path for a in client.list_artifacts(r["mlflow_run_id"])}
    # The logged model loads without unpickling (code + weights-only checkpoint) and scores contract rows.
    import pyarrow.parquet as pq

    from raylsm.data.contract import shard_files

    mlflow.set_tracking_uri(r["tracking_uri"])
    loaded = mlflow.pyfunc.load_model(r["mlflow_model_uri"])
    assert loaded.metadata.signature is not None
    frame = pq.read_table(shard_files(tiny_data, "test")[0], partitioning=None).slice(0, 64).to_pandas()
    spec = CollateSpec(10, 40, tuple(read_manifest(tiny_data).profile_fields))
    batch = {k: torch.from_numpy(v) for k, v in next(iter_local_batches(tiny_data, "test", spec, 64)).items()}
    ckpt_model, _ = model_from_checkpoint(r["checkpoint"])
    ckpt_model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(ckpt_model(batch)[0]).numpy()
    np.testing.assert_allclose(np.asarray(loaded.predict(frame)), expected, rtol=1e-5, atol=1e-6)

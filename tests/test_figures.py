"""The LCN figures (``raylsm.experiments.figures``, ``raylsm.experiments.consistency``): separation scores, consistency, files, MLflow artifacts and the CLI.

Checkpoints are tiny models trained in process (``fit_local``, a few steps) on a small-world
synthetic dataset; the values asserted are ranges and exact identities, not learning results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raylsm.config import ConfigError
from raylsm.data.contract import read_manifest
from raylsm.experiments.consistency import Ranking, consistency, fig5, held_out_batch, level_rankings, recall
from raylsm.experiments.figures import fig4, knn_precision, load_checkpoints, separation, silhouette
from raylsm.models.layers import Vocab
from raylsm.train.config import resolve_job
from raylsm.train.checkpoint import save_checkpoint
from raylsm.train.local import fit_local
from tests.conftest import small_world_dataset

TINY = [
    "model.features.emb_dim=8", "model.head=[16]", "model.lap.k1=16", "model.lap.k2=8", "model.lap.att_dim=8",
    "model.lap.heads=2", "model.lap.ffn_dim=16", "model.crp.m=32", "model.sim_soft.k=8", "model.sim_soft.att_dim=8",
    "train.batch_size=64", "train.epochs=1", "train.max_steps_per_epoch=4", "train.eval_batch_size=512",
    "data.ll_len=40", "data.st_len=10",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A small-world dataset and one tiny checkpoint each of lap, lcn and sim_soft."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("figures")
    data = small_world_dataset(root / "ds", rows=1200, users=80, ll_len=40, st_len=10)
    vocab = Vocab.from_manifest(read_manifest(data))
    out = {"data": data}
    for preset in ("lap", "lcn", "sim_soft"):
        job = resolve_job(preset=preset, overrides=[f"data.path={data}", *TINY])
        model, history = fit_local(job, vocab)
        out[preset] = root / preset
        out[preset].mkdir()
        save_checkpoint(str(out[preset]), model, torch.optim.Adam(model.parameters()), 0, job, vocab, history[-1])
    return out


def _png(path: str) -> bytes:
    raw = Path(path).read_bytes()
    assert raw[:8] == PNG_MAGIC and len(raw) > 5_000, (path, len(raw))
    return raw


# ----------------------------------------------------------------------------- scores


def test_separation_scores_clustered_embeddings_above_shuffled_ones():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    tgt_y, src_y = rng.integers(0, 6, 120), rng.integers(0, 6, 300)
    tgt = centres[tgt_y] + 0.3 * rng.normal(size=(120, 16))
    src = centres[src_y] + 0.3 * rng.normal(size=(300, 16))
    clustered = separation(tgt, tgt_y, src, src_y, k=10)
    shuffled = separation(tgt, rng.permutation(tgt_y), src, rng.permutation(src_y), k=10)
    for name in clustered:
        assert clustered[name] > shuffled[name] + 0.3, (name, clustered[name], shuffled[name])
    assert clustered["knn_cross"] > 0.95 and clustered["silhouette_source"] > 0.5
    assert abs(shuffled["knn_cross"] - 1 / 6) < 0.08 and abs(shuffled["silhouette_source"]) < 0.1


def test_silhouette_equals_scikit_learn_cosine_silhouette():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(90, 5)), rng.integers(0, 4, 90)
    y[0] = 7  # a singleton class scores 0, as in scikit-learn
    assert silhouette(x, y) == pytest.approx(sklearn_metrics.silhouette_score(x, y, metric="cosine"), abs=1e-9)


def test_knn_precision_skips_the_item_itself_within_a_set():
    x = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    y = np.array([0, 0, 1, 1])
    assert knn_precision(x, y, x, y, k=1, same_set=True) == 1.0
    assert knn_precision(x, y, x, 1 - y, k=1) == 0.0  # with itself as neighbour but the labels flipped


def test_consistency_of_a_level_with_itself_is_one_and_with_a_disjoint_level_zero():
    idx = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # row 1: positions 1, 0 are padding
    level = Ranking(idx, valid)
    rows = torch.tensor([True, True])
    assert consistency(level, level, 2, rows).tolist() == [1.0, 1.0]
    other = Ranking(torch.tensor([[2, 3, 0, 1, 4, 5], [3, 2, 5, 4, 1, 0]]), valid)
    assert consistency(level, other, 2, rows).tolist() == [0.0, 0.0]
    assert consistency(level, other, 3, rows).tolist() == [pytest.approx(2 / 3), pytest.approx(2 / 3)]  # {0,1,2} vs {2,3,0}
    assert recall(level, Ranking(idx[:, :3], valid[:, :3]), 2, rows).tolist() == [1.0, 1.0]


def test_level_rankings_agree_with_the_models_own_cascade(trained):
    manifest = read_manifest(trained["data"])
    for preset, level, k in (("lap", "csa", 16), ("sim_soft", "gsu", 8)):
        (c,) = load_checkpoints([str(trained[preset])], manifest, str(trained["data"]))
        batch = held_out_batch(str(trained["data"]), c.meta, manifest, 64)
        levels, cascade, sizes = level_rankings(c.model, batch)
        assert sizes[level] == k
        rows = batch["ll_mask"].sum(1) > k
        assert rows.sum() > 10
        # The whole-sequence ranking's top-K is what the model selects at size K. The score depends on
        # the item alone and torch.topk breaks ties between repeats of one item as it likes: compare item ids.
        items = batch["ll_items"]
        top = torch.gather(items, 1, levels[level].idx[:, :k]).sort(1).values
        selected = torch.gather(items, 1, cascade[level].idx).sort(1).values
        assert torch.equal(top[rows], selected[rows])
        assert recall(levels[level], cascade[level], k, rows).mean() > 0.9  # positions: all but such ties
        final = levels[list(levels)[-1]]
        assert consistency(final, final, 8, rows).tolist() == [1.0] * int(rows.sum())


# ----------------------------------------------------------------------------- figures


def test_fig4_png_and_json_with_scores_in_range(trained, tmp_path):
    ckpts = [str(trained["lap"]), str(trained["lcn"])]
    res = fig4(ckpts, str(trained["data"]), str(tmp_path), max_items=150)
    _png(res["png"])
    saved = json.loads(Path(res["json"]).read_text())
    assert saved["models"] == res["models"] and res["mlflow_run_id"] is None
    assert [(m["preset"], m["crp"]) for m in res["models"]] == [("lap", False), ("lcn", True)]
    assert res["items"] == {"target": 150, "source": 150} and res["interests"] == 8
    for m in res["models"]:
        for name in ("silhouette_target", "silhouette_source", "silhouette_joint"):
            assert -1.0 <= m[name] <= 1.0, (name, m)
        for name in ("knn_target", "knn_source", "knn_cross"):
            assert 0.0 <= m[name] <= 1.0, (name, m)
    assert 0.08 < res["chance"]["knn_cross"] < 0.2  # 8 interests


def test_fig4_refuses_a_dataset_the_generator_does_not_reproduce(trained, tmp_path):
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(trained["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["source"]["params"]["seed"] += 1  # another world: other item -> category tables
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="disagrees with the generator"):
        fig4([str(trained["lap"])], str(data), str(tmp_path / "out"))


def test_fig5_lap_vs_sim_soft_logged_to_mlflow(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("figures", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    res = fig5([str(trained["lap"]), str(trained["sim_soft"])], str(trained["data"]), str(tmp_path / "out"),
               run_id=run_id, tracking_uri=uri, rows=200, top_n=8)
    _png(res["png"])
    lap, sim = res["models"]
    assert (lap["final_level"], sim["final_level"]) == ("fsa", "esu")
    assert set(lap["consistency"]) == {"csa", "msa"} and set(sim["consistency"]) == {"gsu"}
    for m in res["models"]:
        assert m["rows"] > 100
        assert all(0.0 <= v <= 1.0 for v in [*m["consistency"].values(), *m["cascade_recall"].values()]), m
        assert 0.2 < m["chance"] < 0.5  # top-8 of 16..40 valid behaviours
        assert m["chance"] - 1e-9 <= m["final_top_mass"] <= 1.0 + 1e-9  # the n largest of weights summing to 1
    # SIM's K = top-n = 8: its own top-8 and the first 8 of the full ranking are one set, up to behaviours tied
    # at the 8th score (a repeated item scores the same), which topk may pick either way: one position in 150 rows
    assert sim["cascade_recall"]["gsu"] == pytest.approx(sim["consistency"]["gsu"], abs=2 / (8 * 100))
    logged = sorted(a.path for a in client.list_artifacts(run_id, "figures"))
    assert logged == ["figures/fig5.json", "figures/fig5.png"] == sorted(res["artifacts"])


# ----------------------------------------------------------------------------- CLI


def test_cli_figures_last_line_is_json_and_bad_input_is_one_line(trained, tmp_path, capsys):
    from raylsm.cli import main

    base = ["figures", "fig5", "--checkpoints", str(trained["lap"]), "--data", str(trained["data"]),
            "--out", str(tmp_path), "--rows", "64"]
    assert main([*base, "--top-n", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["figure"] == "fig5" and Path(result["png"]).is_file()

    assert main([*base, "--top-n", "500"]) == 2  # longer than every sequence
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raylsm: error: --top-n 500") and "smaller --top-n" in err[0]

    assert main(["figures", "fig4", "--checkpoints", str(tmp_path / "nope"), "--data", str(trained["data"]),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such directory" in err[0]

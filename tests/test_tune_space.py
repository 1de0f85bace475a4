"""Search-space files: every shipped one loads; each kind of mistake is one line naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raylsm.cli import main
from raylsm.config import ConfigError
from raylsm.tune.space import expand, grid_points, load_space, trial_job

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "tune_spaces").glob("*.yaml"))


def test_the_three_spaces_ship():
    assert {p.stem for p in SHIPPED} >= {"lcn", "cain", "backbones"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_is_valid(path: Path):
    space = load_space(path)
    assert space.dists, path
    for params in grid_points(space)[:50]:  # every grid/choice combination resolves to a valid job
        trial_job(space, params, [])


def test_lcn_space_searches_crp_lap_sizes_and_the_learning_rate():
    space = load_space(ROOT / "tune_spaces/lcn.yaml")
    d = space.dists
    assert d["model.crp.weight"].kind == "loguniform" and d["model.crp.weight"].values == [0.01, 64.0]
    assert d["model.crp.m"].kind == "int" and d["model.crp.m"].log and d["model.crp.m"].values == [64, 4096]
    for key in ("model.crp.tau", "model.crp.lambda_pt", "model.crp.lambda_ps", "model.crp.lambda_pc",
                "model.lap.k1", "model.lap.k2", "model.lap.heads", "train.lr"):
        assert key in d


def test_cain_space_searches_the_readings_and_keeps_every_combination_valid():
    space = load_space(ROOT / "tune_spaces/cain.yaml")
    searched = set(space.file.params)
    assert {"model.context.merge", "model.context.input", "model.context.init", "model.lap.pooling",
            "model.peg.filters", "model.context.cl", "model.match_counts_dropout"} <= searched
    job = trial_job(space, {"peg": "concat", "model.context.merge": "replace", "model.context.cl": 9}, [])
    assert job.model.peg.enabled and job.model.peg.aggregation == "concat" and job.model.context.merge == "replace"
    job = trial_job(space, {"peg": "sum", "model.peg.filters": "full", "model.context.cl": 15}, [])
    assert job.model.context.kind == "tcn" and job.model.peg.aggregation == "sum" and job.model.peg.filters == "full"
    assert job.model.context.cl == 15
    assert expand(space, {"peg": "none"}) == {"model.peg.enabled": False}


def test_lcn_spaces_search_tau_from_005_to_5():
    for name in ("lcn.yaml", "lcn_crp.yaml"):
        space = load_space(ROOT / "tune_spaces" / name)
        assert space.file.params["model.crp.tau"] == {"loguniform": [0.05, 5.0]}


def test_backbones_grid_is_the_substitution_table():
    space = load_space(ROOT / "tune_spaces/backbones.yaml")
    points = grid_points(space)
    assert len(points) == 6 * 4 * 3
    job = trial_job(space, {"model.lifelong": "twin", "enhancement": "crp", "train.seed": 2}, [])
    assert job.model.lifelong == "twin" and job.model.crp.enabled and job.train.seed == 2


def test_sampled_values_reach_the_job_as_sampled():
    space = load_space(ROOT / "tune_spaces/lcn.yaml")
    for v in (1e-8, 0.001, 5.0, 2.5e-05):
        assert trial_job(space, {"train.lr": v}, []).train.lr == v  # typed: no text round trip


BAD = {
    "unknown top-level key": ("base: lcn\nsearch: optuna\nparams: {train.lr: {uniform: [0.1, 0.2]}}\n", "key search"),
    "not a config key": ("base: lcn\nparams: {model.lap.k9: {choice: [1, 2]}}\n", "'params.model.lap.k9'"),
    "inverted range": ("base: lcn\nparams: {train.lr: {loguniform: [0.1, 0.01]}}\n", "'params.train.lr': loguniform: low must be < high"),
    "log of zero": ("base: lcn\nparams: {model.crp.m: {int: [0, 64], log: true}}\n", "'params.model.crp.m': int: a log scale needs low > 0"),
    "two kinds": ("base: lcn\nparams: {train.lr: {uniform: [0.1, 0.2], choice: [1]}}\n", "'params.train.lr': needs exactly one of"),
    "unknown kind": ("base: lcn\nparams: {train.lr: {normal: [0, 1]}}\n", "'params.train.lr': normal: unknown distribution"),
    "bad value": ("base: lcn\nparams: {model.lap.k1: {choice: [100, -5]}}\n", "'params.model.lap.k1': model.lap.k1"),
    "bad corner": ("base: lcn\nparams: {model.lap.k1: {choice: [60, 100]}, model.lap.k2: {choice: [5, 150]}}\n", "highest values"),
    "unknown preset": ("base: nope\nparams: {}\n", "key 'base'"),
    "grid of a range": ("base: lcn\nsearcher: {kind: grid}\nparams: {train.lr: {uniform: [0.1, 0.2]}}\n", "cannot be enumerated"),
    "bad metric": ("base: lcn\nmetric: auc_test\nparams: {}\n", "key 'metric'"),
    "bad scheduler": ("base: lcn\nscheduler: {kind: asha, reduction_factor: 1}\nparams: {}\n", "reduction_factor"),
    "missing label": ("base: lcn\nparams: {ctx: {choice: [a, b]}}\nbundles: {ctx: {a: {model.context.kind: tcn}}}\n", "no label 'b'"),
    "bundle of bad key": ("base: lcn\nparams: {ctx: {choice: [a]}}\nbundles: {ctx: {a: {model.nope: 1}}}\n", "model.nope"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_is_one_line_naming_file_and_key(tmp_path: Path, case: str):
    text, expected = BAD[case]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_space(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and expected in message, message


def test_cli_bad_space_fails_before_ray(tmp_path: Path, capsys):
    import ray

    ray_before = ray.is_initialized()  # another test module may have started the session's Ray
    path = tmp_path / "space.yaml"
    path.write_text("base: lcn\nparams: {model.lap.k9: {choice: [1, 2]}}\n")
    assert main(["tune", "--space", str(path), "--data", str(tmp_path / "nodata"), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.lap.k9" in err[0] and str(path) in err[0]
    assert ray.is_initialized() == ray_before
    assert not (tmp_path / "runs").exists()


EXPERIMENTS = sorted((ROOT / "jobs" / "experiments").glob("*.yaml"))


def test_every_paper_table_ships():
    assert {p.stem for p in EXPERIMENTS} == {"lcn_table1", "lcn_table2", "lcn_table3", "cain_table1", "cain_table2",
                                              "cain_table3", "cain_table4", "headline"}


def test_grid_option_keeps_a_subset_of_cells_and_names_a_bad_value():
    from raylsm.experiments.tables import restrict
    from raylsm.config import ConfigError

    space = yaml.safe_load((ROOT / "jobs" / "experiments" / "cain_table2.yaml").read_text())
    restrict(space, "cain_table2", "model.lifelong=twin,lap")
    assert space["params"]["model.lifelong"] == {"grid": ["twin", "lap"]}
    with pytest.raises(ConfigError, match=r"--grid model.lifelong: foo not in"):
        restrict(space, "cain_table2", "model.lifelong=foo")
    with pytest.raises(ConfigError, match=r"--grid model.lap.k1: not a grid key of cain_table2"):
        restrict(space, "cain_table2", "model.lap.k1=8")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_grid_is_valid(path: Path):
    space = load_space(path)
    assert space.file.searcher.kind == "grid" and "train.seed" in space.dists
    jobs = [trial_job(space, p, []) for p in grid_points(space)]
    assert len({repr(j) for j in jobs}) == len(jobs)  # every cell and seed is a different job


def test_table_mean_and_spread():
    from raylsm.experiments.table import cell_rows, markdown

    children = [{"config": {"cell": "a", "train.seed": s}, "metrics": {"auc": v, "gauc": v, "logloss": 1 - v}}
                for s, v in enumerate([0.6, 0.7, 0.8])]
    children.append({"config": {"cell": "b", "train.seed": 0}, "metrics": {"auc": 0.5, "gauc": float("nan"), "logloss": 0.5}})
    rows = {r["cell"]: r for r in cell_rows(children)}
    assert rows["cell=a"]["n"] == 3 and rows["cell=a"]["auc_mean"] == pytest.approx(0.7)
    assert rows["cell=a"]["auc_std"] == pytest.approx(0.1)  # sample standard deviation
    assert rows["cell=b"]["auc_std"] == 0.0 and rows["cell=b"]["gauc_mean"] != rows["cell=b"]["gauc_mean"]
    assert "| cell=a | 3 | 0.7000 ± 0.1000" in markdown(list(rows.values()))


def test_bad_set_override_is_named_as_the_flag_not_a_key_of_the_space():
    from raylsm.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--set model.lap.k9=1: model.lap.k9: unknown config key"):
        load_space(ROOT / "tune_spaces/lcn.yaml", overrides=["model.lap.k9=1"])


def test_experiment_in_process_runs_every_cell_and_logs_the_table(tmp_path, capsys, monkeypatch):
    """``--in-process``: every cell x seed trained here, each an MLflow child run; the table from them."""
    import json

    from mlflow.tracking import MlflowClient

    from jobs.experiments.run import build_parser
    from raylsm.cli import main
    from tests.conftest import small_world_dataset

    monkeypatch.chdir(tmp_path)
    data = small_world_dataset(tmp_path / "data", rows=600)
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    budget = ["model.features.emb_dim=4", "model.head=[8]", "model.lap.k1=8", "model.lap.k2=4", "model.lap.att_dim=4",
              "model.lap.ffn_dim=8", "data.ll_len=40", "data.st_len=10", "train.batch_size=128", "train.epochs=2"]
    argv = ["headline", "--data", str(data), "--seeds", "2", "--grid", "variant=lap,lcn", "--in-process",
            "--tracking-uri", uri, "--storage", str(tmp_path / "runs"), *(x for b in budget for x in ("--set", b))]
    assert main(argv, parser=build_parser()) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "in_process" and out["cells"] == 4
    rows = {r["cell"]: r for r in out["rows"]}
    assert set(rows) == {"variant=lap", "variant=lcn"} and all(r["n"] == 2 for r in rows.values())
    client = MlflowClient(tracking_uri=uri)
    children = client.search_runs([client.get_run(out["parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        history = sorted(client.get_metric_history(r.info.run_id, "test_auc"), key=lambda m: m.step)
        val = sorted(client.get_metric_history(r.info.run_id, "val_auc"), key=lambda m: m.step)
        # A run that rolls back at a plateau: a rollback after the budget's last epoch brings its fine-tune epoch.
        rolled_back = r.data.params["train.on_plateau"] == "rollback" and val[1].value <= val[0].value
        epochs = [0, 1, 2] if rolled_back else [0, 1]
        assert [m.step for m in history] == epochs and [m.step for m in val] == epochs
        # The headline is the test AUC of the epoch chosen on validation (the earliest of ties), not the last one.
        best = max(val, key=lambda m: (m.value, -m.step)).step
        assert r.data.metrics["best_epoch"] == best and r.data.metrics["auc"] == history[best].value
        assert 0.0 < r.data.metrics["auc"] < 1.0 and r.data.params["train.epochs"] == "2"
    lcn = [r for r in children if json.loads(r.data.tags["raylsm.trial_config"])["variant"] == "lcn"]
    assert all(r.data.params["model.crp.enabled"] == "True" for r in lcn)
    table = client.download_artifacts(out["parent_run_id"], "table.md", str(tmp_path))
    assert "variant=lcn" in open(table).read()


@pytest.mark.parametrize("credentialed", [True, False])
def test_a_trial_connects_with_the_credentialed_uri_of_its_parameter(tmp_path: Path, monkeypatch, credentialed):
    """A trial's job holds the redacted tracking URI; the real one comes as the trainable's ``secret`` parameter
    (never from a runtime env or the cluster's environment) and is what the trial's training connects with.
    Without the parameter the trial has only the redacted URI."""
    import logging
    import os

    import ray.tune
    import ray.tune.integration.ray_train

    import raylsm.train.run
    import raylsm.train.uri
    from raylsm.train.uri import SECRET_URI_ENV, real_uri, redact_uri, secret_env
    from raylsm.tune import search
    from tests.test_tune import _space

    uri = "http://alice:S3CRET@127.0.0.1:5000"
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != SECRET_URI_ENV})
    # Resolving the credentialed URI guards this process's log records: undone after the test.
    monkeypatch.setattr(raylsm.train.uri, "_GUARDED", set())
    factory = logging.getLogRecordFactory()
    connected = []
    monkeypatch.setattr(raylsm.train.run, "run_training", lambda job, **kw: connected.append(real_uri(job.mlflow.tracking_uri)))
    monkeypatch.setattr(search, "finished_trial_epochs", lambda *args: [])
    monkeypatch.setattr(ray.tune, "get_context", lambda: type("Context", (), {"get_trial_id": lambda self: "t0"})())
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: None)  # needs a Tune session
    space = load_space(_space(tmp_path, "s", "fifo", {"train.lr": {"grid": [0.01]}}, 1))
    try:
        search.tune_trial({"train.lr": 0.01}, space=space, overrides=[f"mlflow.tracking_uri={redact_uri(uri)}"],
                          flags={}, parent_run_id="p", search_name="s", trials_storage=str(tmp_path),
                          secret=secret_env(uri) if credentialed else None)
    finally:
        logging.setLogRecordFactory(factory)
    assert connected == [uri if credentialed else "http://***@127.0.0.1:5000"]

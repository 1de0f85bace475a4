"""Command line: JSON last line, one-line errors, exit codes; every shipped YAML validates."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylsm.cli import main
from raylsm.config import ConfigError
from raylsm.train.config import resolve_job

ROOT = Path(__file__).resolve().parents[1]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_yaml_validates(path):
    job = resolve_job(config_file=str(path))
    assert job.preset == path.stem
    assert job.model.lifelong in ("din", "sim_soft", "eta", "sdim", "twin", "lap")


def test_resolve_job_precedence_and_errors(tmp_path):
    job = resolve_job(config_file=str(ROOT / "jobs" / "lcn.yaml"), overrides=["model.lap.k1=100", "train.lr=0.01"],
                      flags={"train.epochs": 5, "data.path": "/x"})
    assert (job.model.lap.k1, job.train.lr, job.train.epochs, job.data.path) == (100, 0.01, 5, "/x")
    assert job.model.crp.enabled and job.model.crp.weight == 16.0  # the lcn preset's measured CRP setting
    with pytest.raises(ConfigError, match="train.lr"):
        resolve_job(preset="lap", overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="trian"):
        resolve_job(preset="lap", overrides=["trian.lr=0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: lcn\nmodel: {lap: {k2: 500}}\n")
    with pytest.raises(ConfigError, match="model.lap.k2"):
        resolve_job(config_file=str(bad))


def test_synth_check_and_corrupt(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--rows", "300", "--users", "20", "--ll-len", "30",
                 "--shards", "2", "--st-noise", "0.8", "--ctx-noise", "1", "--focus", "1", "--quiet"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["rows"] == 300 and len(summary["files"]) == 4
    params = json.loads((out / "manifest.json").read_text())["source"]["params"]
    assert params["st_noise"] == 0.8 and params["ctx_noise"] == [1.0, 1.0, 1.0, 1.0] and params["focus"] == 1.0
    assert main(["data", "check", str(out)]) == 0
    assert _last_json(capsys.readouterr().out)["ok"] is True

    shard = out / "test" / "part-00000.parquet"
    table = pq.read_table(shard)
    labels = pa.array([3] * table.num_rows, pa.int8())
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", labels), shard)
    assert main(["data", "check", str(out)]) == 1
    captured = capsys.readouterr()
    result = _last_json(captured.out)
    assert result["ok"] is False and any("column 'label'" in p for p in result["problems"])
    assert "column 'label'" in captured.err


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--model", "lcn", "--data", str(tmp_path), "--set", "model.lap.k9=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.lap.k9" in err[0]
    assert main(["train", "--model", "lcn", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("raylsm: error:") for line in err) and "does not exist" in err[0]
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--rows", "0", "--quiet"]) == 2
    assert "--rows" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--st-noise", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--st-noise" in err[0] and "[0, 1]" in err[0]
    with pytest.raises(SystemExit):  # argparse's own one-line usage error
        main(["data", "synth", "--out", str(tmp_path / "x"), "--ctx-noise", "0.5,0.5", "--quiet"])
    assert "--ctx-noise" in capsys.readouterr().err


def test_the_store_check_limits_only_its_own_request(monkeypatch, tmp_path):
    """The store check's one try and its timeout apply to that request only (later requests keep MLflow's
    retries), and a user's own setting wins."""
    import os

    from raylsm.train import tracking

    seen = []

    class Probe:
        def search_experiments(self, max_results):
            seen.append((os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"), os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")))

    monkeypatch.setattr(tracking, "client", lambda uri: Probe())
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    tracking.check_store("http://127.0.0.1:9")
    assert seen == [("0", str(tracking.CHECK_TIMEOUT_S))]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    tracking.check_store("http://127.0.0.1:9")
    assert seen[-1] == ("0", "7") and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_unreachable_tracking_store_fails_before_training(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--rows", "200", "--users", "20", "--ll-len", "10", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "lap", "--data", str(out), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tracking-uri" in err[0] and "unreachable" in err[0]

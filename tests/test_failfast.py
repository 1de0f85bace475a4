"""User mistakes fail in one line, in seconds, before Ray starts, and leave nothing in MLflow."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from raylsm.cli import main
from raylsm.train.tracking import redact_uri, used_config
from tests.conftest import small_world_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_world_dataset(tmp_path_factory.mktemp("ff") / "synth", rows=1500)


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _run(argv: list[str], capsys) -> tuple[int, list[str], float]:
    ray_before = _ray_up()  # another test module may have started the session's Ray
    start = time.perf_counter()
    code = main(argv)
    assert _ray_up() == ray_before, "the command started Ray before failing"
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines, time.perf_counter() - start


def _no_runs(db: Path) -> bool:
    if not db.exists():
        return True
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("gpu without GPUs", ["--gpu"], "--gpu: 1 workers x 1 GPU need 1 GPUs but this machine has 0"),
        ("gpu fraction", ["--gpu", "--workers", "2", "--set", "train.gpus_per_worker=0.5"], "need 1 GPUs"),
        ("storage under a file", ["--storage", "{file}/runs"], "--storage {file}/runs: not a writable directory"),
        ("cpu budget", ["--workers", "8"], "train.cpus_per_worker: 8 workers x 1.0 CPU"),
        ("validation fraction", ["--set", "data.val_fraction=1.5"], "data.val_fraction: must be in [0, 1)"),
        ("unknown key", ["--set", "model.lap.k9=3"], "model.lap.k9: unknown config key"),
        ("bad type", ["--set", "train.lr=fast"], "train.lr: must be a number"),
        ("early stop", ["--set", "train.early_stop_patience=-1"], "train.early_stop_patience: must be >= 0"),
    ],
)
def test_train_mistakes_fail_fast(data: Path, tmp_path: Path, capsys, case, extra, expected):
    import torch

    if "--gpu" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    extra = [e.replace("{file}", str(blocker)) for e in extra]
    db = tmp_path / "mlflow.db"
    argv = ["train", "--model", "din", "--data", str(data), "--tracking-uri", f"sqlite:///{db}"]
    if "--storage" not in extra:
        argv += ["--storage", str(tmp_path / "runs")]
    code, lines, seconds = _run(argv + extra, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert expected.replace("{file}", str(blocker)) in lines[0], lines[0]
    assert seconds < 20, seconds
    assert _no_runs(db)


def test_tune_mistakes_fail_before_ray(data: Path, tmp_path: Path, capsys):
    space = Path(__file__).resolve().parents[1] / "tune_spaces" / "lcn.yaml"
    code, lines, _ = _run(["tune", "--space", str(space), "--data", str(data), "--gpu",
                           "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capsys)
    import torch

    if not torch.cuda.is_available():
        assert code == 2 and len(lines) == 1 and "--gpu" in lines[0], lines
    code, lines, _ = _run(["tune", "--space", str(space), "--data", str(data), "--resume", "--storage",
                           str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capsys)
    assert code == 2 and len(lines) == 1 and "--resume: no search of lcn.yaml" in lines[0], lines
    assert _no_runs(tmp_path / "m.db")


def test_no_credentials_in_params():
    from raylsm.train.config import resolve_job

    uri = "https://alice:s3cret@mlflow.example.com:5000/api"
    assert redact_uri(uri) == "https://***@mlflow.example.com:5000/api"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    job = resolve_job(preset="din", overrides=[f"mlflow.tracking_uri={uri}"])
    flat = used_config(job)
    assert "s3cret" not in repr(flat)


def test_params_are_the_parts_the_model_uses():
    from raylsm.config import flatten
    from raylsm.train.config import resolve_job

    din = flatten(used_config(resolve_job(preset="din")))
    assert any(k.startswith("model.din.") for k in din)
    assert not any(k.startswith(("model.twin.", "model.lap.", "model.sim_soft.")) for k in din)
    assert din["model.crp.enabled"] is False and "model.crp.tau" not in din
    cain = flatten(used_config(resolve_job(preset="cain")))
    assert "model.peg.aggregation" in cain and "model.msia.layers" in cain and "model.context.cl" in cain
    assert "model.crp.tau" not in cain

"""`raylsm bench`: every subcommand's JSON is internally consistent (the ratio is the stated quotient of
its own figures), its figures are plausible, it is logged to MLflow, and mistakes are one-line errors.

Sizes are tiny: these tests check the measuring, not the speed.
"""

from __future__ import annotations

import json

import pytest

from raylsm.cli import main
from tests.conftest import small_world_dataset

TINY_MODEL = ["--set", "features.emb_dim=4", "--set", "lap.k1=8", "--set", "lap.k2=4", "--set", "crp.m=16",
              "--set", "head=[8]"]
TINY_JOB = [x if x == "--set" else f"model.{x}" for x in TINY_MODEL]


def _run(capsys, *argv: str) -> dict:
    assert main(["bench", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(small_world_dataset(tmp_path_factory.mktemp("bench") / "synth", rows=1200, ll_len=30, st_len=6))


def test_step_ratio_is_its_own_quotient_and_is_logged_to_mlflow(capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    from raylsm.models.ctr import build_model
    from raylsm.models.registry import preset_config
    from raylsm.models.config import ModelConfig
    from raylsm.config import apply_overrides
    from raylsm.models.layers import Vocab
    from raylsm.bench.common import DEFAULT_VOCAB

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _run(capsys, "step", "--models", "lap", "--batch", "16", "--ll-len", "20,80", "--steps", "2", "--threads", "1",
               *TINY_MODEL, "--tracking-uri", uri)
    short, long_ = out["results"]
    assert (short["ll_len"], long_["ll_len"]) == (20, 80)
    assert out["ratio"] == pytest.approx(long_["train_ms_fp32"] / short["train_ms_fp32"], rel=1e-2)
    for row in out["results"]:
        assert row["train_ms_fp32"] > 0 and row["infer_ms_fp32"] > 0
        assert row["train_samples_per_s_fp32"] == pytest.approx(16 / (row["train_ms_fp32"] / 1000), rel=2e-2)
        assert row["peak_rss_mb"] >= row["rss_before_steps_mb"] > 50  # a process with torch loaded
    overrides = [s for s in TINY_MODEL if s != "--set"]
    net = build_model(preset_config("lap", apply_overrides({}, overrides, ModelConfig)), Vocab(**DEFAULT_VOCAB))
    assert short["params"] == sum(p.numel() for p in net.parameters())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["raylsm.bench"] == "step"
    assert client.get_experiment(run.info.experiment_id).name == "bench"
    assert run.data.metrics["ratio"] == pytest.approx(out["ratio"])
    assert run.data.metrics["results.1.train_ms_fp32"] == pytest.approx(long_["train_ms_fp32"])


def test_latency_and_memory_ratios_against_their_references(capsys):
    out = _run(capsys, "latency", "--models", "lcn,lap", "--ll-len", "30", "--candidates", "10", "--repeats", "2",
               "--threads", "1", *TINY_MODEL, "--no-mlflow")
    ms = {r["model"]: r["ms"] for r in out["results"]}
    assert set(ms) == {"lcn", "lap", "sim_soft"}  # the references are measured even when not asked for
    assert all(v > 0 for v in ms.values())
    assert out["ratio"] == pytest.approx(ms["lcn"] / ms["sim_soft"], rel=1e-2)
    assert next(r for r in out["results"] if r["model"] == "lap")["vs_lap"] == 1.0
    out = _run(capsys, "memory", "--models", "lcn", "--batch", "8", "--ll-len", "30", "--steps", "1", "--threads", "1",
               *TINY_MODEL, "--no-mlflow")
    peak = {r["model"]: r["peak_rss_mb"] for r in out["results"]}
    assert set(peak) == {"lcn", "lap"} and out["measure"] == "peak_rss_mb"
    assert out["ratio"] == pytest.approx(peak["lcn"] / peak["lap"], rel=1e-2)


@pytest.mark.ray
def test_stream_samples_every_workers_memory_over_the_rows_it_reads(capsys, ray_local, tiny_data):
    """2 workers x 6 steps x 32 rows through Ray Data: every step's rows are counted, each worker is sampled before
    the first step, every 2 steps and after the last, and the figures are the stated functions of the samples."""
    out = _run(capsys, "stream", "--data", tiny_data, "--steps", "6", "--batch", "32", "--workers", "2",
               "--cpus-per-worker", "0.5", "--sample-every", "2", "--warmup", "0.3", *TINY_JOB, "--no-mlflow")
    assert (out["workers"], out["steps"], out["ll_len"]) == (2, 6, 30) and len(out["per_worker"]) == 2
    assert out["rows_read"] == 2 * 6 * 32
    for w in out["per_worker"]:
        assert [p["steps"] for p in w["curve"]] == [0, 2, 4, 6]
        assert [p["rows"] for p in w["curve"]] == [0, 64, 128, 192]
        assert all(p["rss_mb"] >= p["private_mb"] > 50 for p in w["curve"])  # a process with torch loaded
        assert w["start"]["steps"] == 2 and w["end"]["steps"] == 6  # the first sample at >= 30 % of the steps
        assert w["ratio"] == pytest.approx(w["end"]["rss_mb"] / w["start"]["rss_mb"], abs=1e-3)
        assert w["peak_rss_mb"] == max(p["rss_mb"] for p in w["curve"])
    assert out["ratio"] == max(w["ratio"] for w in out["per_worker"])


def test_stream_summary_of_a_curve_that_grows_and_one_that_does_not():
    """The memory summary on made-up samples: a worker whose RSS grows 10 MiB per 1 000 rows has that slope and
    end / start ratio; a flat one has slope 0 and ratio 1."""
    from raylsm.bench.stream import summarise

    growing = [[s, s, 100 * s, 500 + s, 400 + s] for s in range(11)]  # 1 MiB per step of 100 rows
    out = summarise(growing, steps=10, warmup=0.2)
    assert out["start"]["steps"] == 2 and out["end"]["steps"] == 10 and out["middle"]["steps"] == 6
    assert out["slope_mb_per_million_rows"] == pytest.approx(10_000) and out["ratio"] == round(510 / 502, 3)
    assert out["private_slope_mb_per_million_rows"] == pytest.approx(10_000) and out["private_ratio"] == round(410 / 402, 3)
    flat = summarise([[s, s, 100 * s, 500.0, 400.0] for s in range(11)], steps=10, warmup=0.2)
    assert flat["slope_mb_per_million_rows"] == 0 and flat["ratio"] == 1.0 and flat["rows_read"] == 1000
    # Thirds of the 9 samples after the warm-up (steps 2-4, 5-7, 8-10): their means, and last ÷ first.
    assert out["rss_thirds_mb"] == [503.0, 506.0, 509.0] and out["private_thirds_mb"] == [403.0, 406.0, 409.0]
    assert out["thirds_ratio"] == round(509 / 503, 3) and flat["thirds_ratio"] == 1.0
    # A curve that swings between two levels with no trend: the end ÷ start quotient reads the swing
    # (first sample low, last high), the thirds do not.
    swing = summarise([[s, s, 100 * s, 1100.0 if s % 2 == 0 else 900.0, 700.0] for s in range(1, 13)], steps=12, warmup=0.0)
    assert swing["ratio"] == round(1100 / 900, 3)
    assert swing["rss_thirds_mb"] == [1000.0, 1000.0, 1000.0] and swing["thirds_ratio"] == 1.0
    assert flat["private_slope_mb_per_million_rows"] == 0 and flat["private_ratio"] == 1.0


def test_time_to_mark_interrupts_the_command_and_reaps_what_it_started(tmp_path):
    """The timed command is stopped once its mark is written (SIGINT, as Ctrl-C), and every process it started
    is gone when the figure comes back; the figure is the mark's time, not the command's end."""
    import subprocess
    import sys
    import time

    import psutil

    from raylsm.bench.startup import _time_to_mark

    mark, pids = tmp_path / "mark", tmp_path / "pids"
    code = (f"import subprocess, sys, time; from pathlib import Path; "
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"time.sleep(0.5); Path({str(pids)!r}).write_text(f'{{child.pid}}'); "
            f"Path({str(mark)!r}).write_text(repr(time.time())); time.sleep(600)")
    start = time.time()
    seconds = _time_to_mark([sys.executable, "-c", code], mark, timeout=60, env={}, grace=2)
    assert 0.4 < seconds < time.time() - start < 30
    # The child ignored its parent's end (a Ray process would not); it was killed after the grace period.
    try:
        assert psutil.Process(int(pids.read_text())).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass  # reaped


def test_time_to_mark_names_a_command_that_exits_without_its_mark(tmp_path):
    import sys

    from raylsm.bench.startup import _time_to_mark

    with pytest.raises(RuntimeError, match="exited 3 before its first batch: no data here"):
        _time_to_mark([sys.executable, "-c", "import sys; print('no data here', file=sys.stderr); sys.exit(3)"],
                      tmp_path / "mark", timeout=60, env={})


def test_local_cluster_polls_workers_every_half_second_and_reports_no_usage_unless_the_user_says(monkeypatch):
    """ensure_ray's local cluster: Ray Train's worker poll interval is 0.5 s and Ray's usage statistics are off
    by default; a user's values win."""
    import os

    import ray

    from raylsm.train import cluster

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    # ensure_ray sets several variables for the Ray it starts: a copy keeps them from reaching later tests.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                     "RAY_USAGE_STATS_ENABLED")})
    cluster.ensure_ray(num_cpus=1, quiet=True)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5" and calls[0]["dashboard_host"] == "127.0.0.1"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    cluster.ensure_ray(num_cpus=1, quiet=True)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3" and os.environ["RAY_USAGE_STATS_ENABLED"] == "1"


@pytest.mark.parametrize("argv, option", [
    (["ingest", "--cpus", "0"], "--cpus"),
    (["step", "--models", "nope"], "--models"),
    (["step", "--ll-len", "500,x"], "--ll-len"),
    (["step", "--dtypes", "bf16"], "--dtypes bf16"),
    (["latency", "--device", "cuda"], "--device cuda"),
    (["stream", "--steps", "0"], "--steps"),
    (["stream", "--warmup", "1"], "--warmup"),
    (["stream", "--object-store-mb", "50"], "--object-store-mb"),
])
def test_mistakes_are_one_line_errors(capsys, argv, option):
    import torch

    if option == "--device cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", *argv, "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"raylsm: error: {option}")

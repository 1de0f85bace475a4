"""`raylsm bench suite`: one quick run of every part (tiny sizes, CPU) whose JSON and Markdown reports agree with its
last stdout line and whose per-part ratios are those parts' own quotients; the budget's shares, shrinking and
skipping (a fake clock, and a real 1 s budget); one-line errors for bad options.

The quick run is the file's main cost (its Ray parts share one local cluster); everything else takes seconds.
It also serves the checks of ``bench scale`` (dense and sharded, 1 and 2 workers) and of ``bench startup`` on
a running cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raylsm.bench import suite
from raylsm.cli import main

QUICK_PARTS = ["step-b8", "step-b16", "latency", "memory", "scale", "ingest", "train", "startup"]


def _suite(out, *argv: str) -> tuple[subprocess.CompletedProcess, dict]:
    # The environment of a user's shell: not the loopback setting this test process made before importing Ray,
    # so each part's own command must make it before it imports Ray (a joined 127.0.0.1 cluster, else unreachable).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "raylsm", "bench", "suite", "--device", "cpu", "--quick", "--no-mlflow",
                           "--out", str(out), *argv], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "report"
    _, line = _suite(out)
    return out, line, json.loads((out / "suite.json").read_text()), (out / "suite.md").read_text()


def _section(md: str, name: str) -> list[str]:
    """The lines of the Markdown section ``## name``."""
    lines = md.split("\n")
    start = lines.index(f"## {name}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


@pytest.mark.ray
def test_quick_suite_runs_every_part_and_its_reports_agree_with_its_last_line(quick):
    out, line, report, md = quick
    assert line["bench"] == "suite" and list(line["parts"]) == QUICK_PARTS
    failed = {n: report["details"][n].get("stderr_tail") for n, p in line["parts"].items() if p["status"] != "ok"}
    assert not failed
    assert line["reports"] == {"json": str(out / "suite.json"), "markdown": str(out / "suite.md")}
    assert {k: report[k] for k in line} == line  # the report holds the line's content, and more
    assert set(report) - set(line) == {"command", "started_utc", "machine", "details"}
    assert report["machine"]["cpus"] == os.cpu_count() and report["command"].startswith("raylsm bench suite --device cpu")
    # Two lanes side by side (--quick), each one part after the other: ingest and startup, and the local parts then train.
    lanes = {name: d["lane"] for name, d in report["details"].items()}
    assert {n for n, lane in lanes.items() if lane == "ray"} == set(suite.RAY_PARTS) - set(suite.LOCAL_LANE_RAY_PARTS) == {"ingest", "startup"}
    assert set(lanes.values()) == {"local", "ray"}
    for lane in ("local", "ray"):
        assert sum(p["seconds"] for n, p in line["parts"].items() if lanes[n] == lane) <= line["seconds"]
    assert line["seconds"] <= line["budget_s"]
    for name, d in report["details"].items():
        assert d["result"]["bench"] == d["bench"] and line["parts"][name]["ratio"] == d["result"]["ratio"]
        assert d["seconds"] <= d["timeout_s"] <= line["budget_s"]
    # The Ray parts joined one local cluster, and it is bound to loopback (its GCS address is 127.0.0.1).
    addresses = {d.get("ray_address") for n, d in report["details"].items() if d["bench"] in suite.RAY_PARTS}
    assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:"), addresses
    assert all("ray_address" not in d for d in report["details"].values() if d["bench"] not in suite.RAY_PARTS)


@pytest.mark.ray
def test_quick_suite_ratios_are_each_parts_own_quotients(quick):
    from raylsm.models.registry import PRESETS

    details = quick[2]["details"]
    r = {name: d["result"] for name, d in details.items()}
    for b in (8, 16):
        rows = r[f"step-b{b}"]["results"]
        assert {x["model"] for x in rows} == {"lcn", "cain", "lap"} and {x["batch"] for x in rows} == {b}  # --quick's three
        short, long_ = [x for x in rows if x["model"] == "lcn"]  # lcn is first: it carries the ratio
        assert (short["ll_len"], long_["ll_len"]) == (12, 24)
        assert r[f"step-b{b}"]["ratio"] == pytest.approx(long_["train_ms_fp32"] / short["train_ms_fp32"], rel=1e-2, abs=1e-3)
    ms = {x["model"]: x["ms"] for x in r["latency"]["results"]}
    assert set(ms) == set(PRESETS) and r["latency"]["ratio"] == pytest.approx(ms["lcn"] / ms["sim_soft"], rel=1e-2)
    peak = {x["model"]: x["peak_rss_mb"] for x in r["memory"]["results"]}
    assert r["memory"]["ratio"] == pytest.approx(peak["lcn"] / peak["lap"], rel=1e-2)
    _check_scale(r["scale"])
    # ingest: every row of the generated 600-row dataset's training split (7 of its 8 days) counted, each Ray
    # rate scaled against the one-process reader, with all of the node's CPUs at the top
    ingest = r["ingest"]
    assert ingest["rows"] == 525 and ingest["single_process_rows_per_s"] > 0
    assert list(ingest["ray_rows_per_s"]) == suite.cpu_steps(os.cpu_count()).split(",")  # up to all the node's CPUs
    for n, rate in ingest["ray_rows_per_s"].items():
        assert rate > 0  # scaling is reported to 3 decimals: allow that rounding
        assert ingest["scaling"][n] == pytest.approx(rate / (int(n) * ingest["single_process_rows_per_s"]), rel=1e-2, abs=5e-4)
    assert ingest["ratio"] == ingest["scaling"][str(os.cpu_count())]
    # train: two Ray epochs, the first (warm-up) not counted, against the step alone on one thread
    train = r["train"]
    assert len(train["ray_epochs_samples_per_s"]) == 2 and train["threads_per_worker"] == 1
    assert train["ray_samples_per_s"] == train["ray_epochs_samples_per_s"][1]
    assert train["ratio"] == pytest.approx(train["ray_samples_per_s"] / train["step_only_samples_per_s"], rel=1e-2)
    assert 0 < train["ratio"] < 5
    # startup on the suite's running cluster (ingest and train ran on it too), whose workers do not inherit the
    # command's environment: the first-batch mark still reaches them (through the train loop's config). Ray's
    # start-up is on top of the imports, and Ray's own floor (a bare TorchTrainer) is measured in the same run.
    start = r["startup"]
    assert start["cluster"] == "running" and start["seconds_to_first_batch"] > start["in_process_seconds"] > 0
    assert start["ratio"] == pytest.approx(start["seconds_to_first_batch"] / start["in_process_seconds"], rel=1e-2)
    assert start["ray_floor_seconds"] > start["in_process_seconds"] and len(start["repeats"]["ray_floor"]) == 1
    assert start["over_floor"] == pytest.approx(start["seconds_to_first_batch"] / start["ray_floor_seconds"], rel=1e-2)


def _check_scale(out: dict) -> None:
    """``bench scale`` at the quick sizes (emb 8, 2 steps, item vocabularies 50 and 3 000, dense and sharded on 1
    and 2 workers): a ratio per mode and worker count that is the quotient of its own figures."""
    assert out["bench"] == "scale" and out["vocabs"] == [50, 3000]
    keys = {f"{m}/{w}w" for m in ("dense", "sharded") for w in (1, 2)}
    assert set(out["ratio"]) == set(out["cpu_ratio"]) == set(out["memory_ratio"]) == set(out["table_memory_ratio"]) == keys
    rows = {(r["mode"], r["workers"], r["item_vocab"]): r for r in out["results"]}
    assert len(rows) == 8
    for key in keys:
        mode, w = key.split("/")
        lo, hi = rows[(mode, int(w[:-1]), 50)], rows[(mode, int(w[:-1]), 3000)]
        assert out["ratio"][key] == pytest.approx(hi["step_ms"] / lo["step_ms"], rel=1e-2)
        assert out["cpu_ratio"][key] == pytest.approx(hi["step_cpu_ms"] / lo["step_cpu_ms"], rel=1e-2)
        assert out["memory_ratio"][key] == pytest.approx(hi["peak_rss_mb_per_worker"] / lo["peak_rss_mb_per_worker"], rel=1e-2)
        assert hi["table_mb_per_worker"] > lo["table_mb_per_worker"] > 0  # 60x the item rows: more table bytes
    for r in out["results"]:
        assert 0 < r["step_ms"] < 60_000 and 0 < r["step_cpu_ms"]
        assert r["peak_rss_mb_per_worker"] >= r["built_rss_mb_per_worker"] > 50
        sharded = r["mode"] == "sharded" and r["workers"] == 2  # each worker holds half of the item rows
        assert r["item_rows_per_worker"] == (r["item_vocab"] // 2 if sharded else r["item_vocab"])


@pytest.mark.ray
def test_quick_suite_markdown_has_a_table_per_part(quick):
    _, line, report, md = quick
    summary = [x for x in _section(md, "Parts") if x.startswith("| ")]
    assert len(summary) == 1 + len(QUICK_PARTS)  # header and one row per part
    for name, d in report["details"].items():
        rows = [x for x in _section(md, name) if x.startswith("|")]
        assert rows[1].startswith("|---|"), name
        figures = d["result"].get("results")
        expected = len(figures) if isinstance(figures, list) else {"ingest": 1 + len(d["result"].get("scaling", {})),
                                                                   "train": 1, "startup": 3}[d["bench"]]
        assert len(rows) == 2 + expected, name
    step = _section(md, "step-b8")
    lcn_short = next(x for x in report["details"]["step-b8"]["result"]["results"] if x["model"] == "lcn")
    assert any(x.startswith(f"| lcn | 8 | 12 | {suite._fmt(lcn_short['train_ms_fp32'])} |") for x in step)


def test_a_spent_budget_skips_the_later_parts_and_still_writes_both_reports(tmp_path):
    _, line = _suite(tmp_path / "r", "--budget", "1")
    first, *rest = line["parts"].values()
    assert list(line["parts"]) == QUICK_PARTS and first["status"] == "timeout" and first["ratio"] is None
    assert all(p["status"] == "skipped" and p["seconds"] == 0 for p in rest)
    report = json.loads((tmp_path / "r" / "suite.json").read_text())
    assert report["details"]["step-b8"]["timeout_s"] <= 1 and "stderr_tail" in report["details"]["step-b8"]
    md = (tmp_path / "r" / "suite.md").read_text()
    assert all("Skipped: budget spent." in _section(md, name) for name in QUICK_PARTS[1:])
    assert "timeout after" in "\n".join(_section(md, "step-b8"))


def test_budget_shares_shrink_the_step_table_and_never_pass_the_budget(monkeypatch):
    """A fake clock: the first step part takes 95 of 100 s; the larger batch is shrunk away (its share is less than
    what the smaller one took), latency gets the 5 s left (not its 10 s floor), and the rest is skipped."""
    import argparse

    class Clock:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

    clock, timeouts = Clock(), {}

    def fake_run(part, timeout, env=None):
        timeouts[part.name] = timeout
        took = 95.0 if part.name == "step-b8" else timeout
        clock.now += took
        return {"bench": part.bench, "argv": part.argv, "status": "ok" if took < timeout else "timeout", "seconds": took}

    monkeypatch.setattr(suite, "time", clock)
    monkeypatch.setattr(suite, "run_part", fake_run)
    todo = suite.plan(argparse.Namespace(quick=True, device="cpu", parts=list(suite.PARTS)))
    records = suite.run_parts(todo, budget=100.0)
    assert timeouts["step-b8"] == pytest.approx(100 * 2.0 / sum(suite.WEIGHTS[p.bench] for p in todo))
    assert records["step-b16"]["status"] == "skipped" and records["step-b16"]["reason"].startswith("shrunk: step-b8 took 95 s")
    assert records["latency"]["status"] == "timeout" and timeouts["latency"] == pytest.approx(5.0)
    assert [records[n]["reason"] for n in QUICK_PARTS[3:]] == ["budget spent"] * 5 and clock.now == pytest.approx(100.0)


def test_quick_lanes_join_one_cluster_and_a_cluster_that_never_starts_fails_only_the_ray_parts(monkeypatch):
    """--quick with the cluster and the parts faked: the local parts and then train run in one lane and the other
    Ray parts in the other, each Ray part with the cluster's address, the cluster with two logical CPUs per core;
    and when the cluster never comes up, the Ray parts are recorded failed with the reason (the report still
    renders) while the local parts run on."""
    import argparse
    import contextlib

    ran: dict[str, dict | None] = {}

    def fake_run(part, timeout, env=None):
        ran[part.name] = env
        return {"bench": part.bench, "argv": part.argv, "status": "ok", "seconds": 0.1, "result": {"ratio": 1.0}}

    asked: list = []

    def cluster(up: bool):
        @contextlib.contextmanager
        def starting(num_cpus=None):
            asked.append(num_cpus)
            def address(timeout):
                if not up:
                    raise RuntimeError("the local cluster for `--cluster running` did not start within 5 s")
                return "127.0.0.1:6000"
            yield address
        return starting

    monkeypatch.setattr(suite, "run_part", fake_run)
    todo = suite.plan(argparse.Namespace(quick=True, device="cpu", parts=list(suite.PARTS)))
    import raylsm.bench.startup as startup

    monkeypatch.setattr(startup, "starting_local_cluster", cluster(True))
    records = suite.run_parts(todo, budget=100.0, shared_cluster=True)
    assert list(records) == QUICK_PARTS and all(r["status"] == "ok" for r in records.values())
    assert {n: r["lane"] for n, r in records.items()} == {n: "ray" if n in ("ingest", "startup") else "local" for n in QUICK_PARTS}
    assert list(records)[-3:] == ["ingest", "train", "startup"] and asked == [2 * (os.cpu_count() or 1)]
    assert {n: (e or {}).get("RAY_ADDRESS") for n, e in ran.items()} == {
        n: "127.0.0.1:6000" if n in suite.RAY_PARTS else None for n in QUICK_PARTS}
    assert all(records[n]["ray_address"] == "127.0.0.1:6000" for n in suite.RAY_PARTS)

    ran.clear()
    monkeypatch.setattr(startup, "starting_local_cluster", cluster(False))
    records = suite.run_parts(todo, budget=100.0, shared_cluster=True)
    assert set(ran) == {n for n in QUICK_PARTS if n not in suite.RAY_PARTS}  # the local lane ran on
    for n in suite.RAY_PARTS:
        assert records[n]["status"] == "failed" and "did not start" in records[n]["stderr_tail"][0]
    report = {"command": "raylsm bench suite --quick", "device": "cpu", "quick": True, "budget_s": 100.0, "seconds": 1.0,
              "started_utc": "now", "machine": {"cpus": 2}, "details": {n: records[n] for n in suite.RAY_PARTS},
              "parts": {n: {"status": records[n]["status"], "seconds": 0.0, "ratio": None} for n in suite.RAY_PARTS}}
    assert "did not start" in "\n".join(_section(suite.markdown(report), "ingest"))


def test_ingest_cpus_go_up_to_all_of_the_node():
    assert [suite.cpu_steps(n) for n in (1, 2, 6, 16)] == ["1", "1,2", "1,2,4,6", "1,2,4,8,16"]


@pytest.mark.parametrize("argv, option", [
    (["--budget", "0"], "--budget"),
    (["--parts", "step,nope"], "--parts"),
    (["--device", "cuda"], "--device cuda"),
])
def test_mistakes_are_one_line_errors(capsys, tmp_path, argv, option):
    import torch

    if option == "--device cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "suite", *argv, "--out", str(tmp_path / "r"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"raylsm: error: {option}")
    assert not (tmp_path / "r").exists()  # nothing written for a command that did not run

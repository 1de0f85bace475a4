"""``raylsm bench suite``: every bench part in one command, within a time budget, into a JSON and a Markdown report.

Each part is ``python -m raylsm bench <part> ... --no-mlflow`` in a child process of its own (its stderr
progress passed through with a ``[part]`` prefix, its JSON taken from its last stdout line). Order: the
cheapest and most important first: the step table (one part per batch size), latency, memory, scale,
ingest, train, startup. Before each part, what is left of ``--budget`` is shared among the parts still to
run in proportion to :data:`WEIGHTS` (their rough relative cost), and the part's timeout is its share (at
least :data:`MIN_PART_S`, never past the budget). A part that fails or times out is recorded with its status
and its last stderr lines, and the suite goes on; a part not started because the budget is spent is
``skipped``. Under budget pressure the step table shrinks first: a larger batch size is skipped when the
previous one took longer than the share the larger one would get.

``--quick`` (tiny sizes: a check that every part runs and reports, not figures) runs the Ray parts (ingest, train,
startup) on one local cluster, beside the local parts, in two lanes: about 2 minutes on a 2-core CPU.

Exit code 0 whenever the reports are written, whatever the parts' statuses (they are in the JSON).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from raylsm.bench.common import csv_names, log, machine, resolve_device

PARTS = ("step", "latency", "memory", "scale", "ingest", "train", "startup")
# Relative cost of a part (a step part is one batch size): each part's share of what is left of the budget.
WEIGHTS = {"step": 2.0, "latency": 0.5, "memory": 1.0, "scale": 1.5, "ingest": 1.0, "train": 1.0, "startup": 1.5}
MIN_PART_S = 10.0  # a started part gets at least this (or what is left, if less)
MIN_START_S = 0.5  # with less than this left, the remaining parts are skipped
REAP_GRACE_S = 20.0  # a timed-out part: SIGINT, then this long for it (and the Ray it started) to stop
TAIL_LINES = 20
RAY_PARTS = ("ingest", "train", "startup")  # the parts that start (or, with --quick, join) a Ray cluster
# --quick: the Ray part that runs in the local lane, after the local parts (on the shared cluster), so that the
# two lanes take about as long; and the shared cluster's logical CPUs per core, so that two Ray Train runs at once
# (a worker and Ray Data's read tasks each) never wait on each other's CPUs.
LOCAL_LANE_RAY_PARTS = ("train",)
QUICK_CLUSTER_CPUS_PER_CORE = 2
TINY_MODEL = ("features.emb_dim=8", "lap.k1=8", "lap.k2=4", "crp.m=16", "head=[8]")  # --quick


@dataclass
class Part:
    name: str  # step-b512, latency, ...
    bench: str  # the ``raylsm bench`` subcommand
    argv: list[str] = field(default_factory=list)

    @property
    def weight(self) -> float:
        return WEIGHTS[self.bench]


def _sets(values, prefix: str = "") -> list[str]:
    return [x for v in values for x in ("--set", prefix + v)]


def cpu_steps(cpus: int) -> str:
    """``1,2,4,...,cpus``: Ray Data's CPUs for ingest, up to all of the node's."""
    steps = [1]
    while steps[-1] * 2 < cpus:
        steps.append(steps[-1] * 2)
    return ",".join(str(n) for n in sorted(set(steps + [cpus])))


def plan(args: argparse.Namespace) -> list[Part]:
    """The parts of ``--parts`` with their options: the full sizes, or tiny ones with ``--quick``."""
    from raylsm.models.registry import PRESETS

    quick, dev = args.quick, ["--device", args.device]
    every = ",".join(["lcn", "cain", *(m for m in PRESETS if m not in ("lcn", "cain"))])  # the first carry the ratios
    models = "lcn,cain,lap" if quick else every  # a process per (model, length): ~4 s each on a 2-core CPU
    tiny = _sets(TINY_MODEL) if quick else []
    tiny_job = _sets(TINY_MODEL, "model.") if quick else []
    tiny_data = ["--rows", "600", "--shards", "2", "--ll-len", "24", "--st-len", "6"] if quick else []
    step = ["--ll-len", "12,24", "--steps", "1", "--threads", "1"] if quick else ["--ll-len", "500,2000"]
    dtypes = "fp32,bf16" if args.device == "cuda" else "fp32"
    parts = {
        "step": [Part(f"step-b{b}", "step", [*dev, "--models", models, "--batch", str(b), "--dtypes", dtypes, *step, *tiny])
                 for b in ((8, 16) if quick else (512, 2048, 8192))],
        "latency": [Part("latency", "latency", [*dev, "--models", every, *tiny,
                                                *(["--ll-len", "24", "--candidates", "8", "--repeats", "1", "--threads", "1"] if quick else [])])],
        "memory": [Part("memory", "memory", [*dev, "--models", models, *tiny,
                                             *(["--batch", "8", "--ll-len", "24", "--steps", "1", "--threads", "1"] if quick else [])])],
        # scale measures the CPU build (gloo workers) whatever the suite's device
        "scale": [Part("scale", "scale", ["--device", "cpu", *(["--vocab", "50,3000", "--modes", "dense,sharded", "--emb", "8", "--batch", "8", "--ll-len", "12",
                                                               "--st-len", "4", "--steps", "2", "--warmup", "1",
                                                               *_sets(("lap.k1=8", "lap.k2=4", "head=[8]"))] if quick else [])])],
        "ingest": [Part("ingest", "ingest", [*dev, "--cpus", cpu_steps(os.cpu_count() or 1), *tiny_data,
                                             *(["--batch", "64", "--repeats", "1"] if quick else [])])],
        "train": [Part("train", "train", [*dev, *tiny_data, *tiny_job,
                                          *(["--batch", "128", "--epochs", "2", "--steps", "2", "--repeats", "1"] if quick else [])])],
        # --quick: on the suite's one running local cluster (fresh clusters are the full suite's figure)
        "startup": [Part("startup", "startup", [*dev, "--repeats", "1", *tiny_data, *tiny_job,
                                                *(["--cluster", "running"] if quick else [])])],
    }
    return [p for name in PARTS if name in args.parts for p in parts[name]]


# ----------------------------------------------------------------------------- running the parts


def _relay(stream, name: str, tail: collections.deque) -> None:
    for line in stream:
        sys.stderr.write(f"[{name}] {line}")
        sys.stderr.flush()
        tail.append(line.rstrip())


def run_part(part: Part, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run one part as a child process within ``timeout`` seconds (in ``env``, default this process's
    environment); its record (status, seconds, its JSON, ...)."""
    from raylsm.bench.startup import interrupt_and_reap

    cmd = [sys.executable, "-m", "raylsm", "bench", part.bench, *part.argv, "--no-mlflow"]
    log(f"suite: {part.name} (timeout {timeout:.0f} s): raylsm bench {shlex.join(cmd[4:])}")
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        reader = threading.Thread(target=_relay, args=(proc.stderr, part.name, tail), daemon=True)
        reader.start()
        try:
            status = "ok" if proc.wait(timeout=timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            interrupt_and_reap(proc, REAP_GRACE_S)  # SIGINT, as Ctrl-C: a Ray the part started stops with it
        seconds = time.monotonic() - start
        reader.join(timeout=5)
        out.seek(0)
        lines = out.read().strip().splitlines()
    record = {"bench": part.bench, "argv": part.argv, "timeout_s": round(timeout, 1), "status": status,
              "seconds": round(seconds, 1), "returncode": proc.returncode}
    if status == "ok":
        try:
            record["result"] = json.loads(lines[-1])
        except (IndexError, ValueError):
            record["status"] = "failed"
            tail.append("(no JSON object on the last stdout line)")
    if record["status"] != "ok":
        record["stderr_tail"] = list(tail)
    log(f"suite: {part.name} {record['status']} after {seconds:.1f} s")
    return record


def run_parts(todo: list[Part], budget: float, shared_cluster: bool = False) -> dict[str, dict]:
    """Every part within ``budget`` seconds: a weighted share of what is left each; records by name, in plan order.

    ``shared_cluster`` (``--quick``): two lanes run side by side, each in plan order: the Ray parts
    (:data:`RAY_PARTS`) on one local cluster started with the suite (instead of each starting its own), ingest and
    startup in one lane, the local parts and then train (:data:`LOCAL_LANE_RAY_PARTS`) in the other. A check that
    every part runs, not figures: the lanes share the machine. Each record says its ``lane``.
    """
    from raylsm.bench.startup import starting_local_cluster

    started = time.monotonic()
    if not shared_cluster:
        return _run_lane(todo, budget, started)
    records: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:  # holds the shared cluster until both lanes end
        wants = budget >= MIN_PART_S and any(p.bench in RAY_PARTS for p in todo)
        cpus = QUICK_CLUSTER_CPUS_PER_CORE * (os.cpu_count() or 1)
        cluster = _SharedCluster(stack.enter_context(starting_local_cluster(cpus))) if wants else None
        local = [p for p in todo if p.bench not in RAY_PARTS]
        lanes = {"local": local + [p for p in todo if p.bench in LOCAL_LANE_RAY_PARTS],
                 "ray": [p for p in todo if p.bench in RAY_PARTS and p.bench not in LOCAL_LANE_RAY_PARTS]}
        threads = [threading.Thread(target=lambda n=name, parts=parts: records.update(
                       _run_lane(parts, budget, started, n, cluster)), name=f"suite-{name}")
                   for name, parts in lanes.items() if parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {p.name: records[p.name] for p in todo}


class _SharedCluster:
    """The suite's one local cluster, as both lanes see it: the environment that joins it, once it is up."""

    def __init__(self, address) -> None:
        self._address, self._lock, self._env = address, threading.Lock(), None

    def env(self, timeout: float) -> dict[str, str]:
        with self._lock:  # the first lane to need it waits for it; a failure is raised to every caller
            if self._env is None:
                start = time.monotonic()
                at = self._address(timeout)
                log(f"suite: the Ray parts join one local cluster ({at}, up after {time.monotonic() - start:.1f} s more)")
                self._env = {**os.environ, "RAY_ADDRESS": at}
            return self._env


def _run_lane(todo: list[Part], budget: float, started: float, lane: str | None = None,
              cluster: _SharedCluster | None = None) -> dict[str, dict]:
    """``todo`` one after the other within what is left of ``budget`` (counted from ``started``); the Ray parts
    on ``cluster`` when there is one."""
    records: dict[str, dict] = {}
    last_step: tuple[str, float] | None = None
    for i, part in enumerate(todo):
        left = budget - (time.monotonic() - started)
        share = left * part.weight / sum(p.weight for p in todo[i:])
        reason = None
        if left < MIN_START_S or (cluster is None and part.bench in RAY_PARTS and lane is not None):
            reason = "budget spent"  # (--quick starts its cluster only with MIN_PART_S of budget or more)
        elif part.bench == "step" and last_step and last_step[1] > share:
            reason = f"shrunk: {last_step[0]} took {last_step[1]:.0f} s, more than this batch size's share ({share:.0f} s)"
        if reason:
            log(f"suite: {part.name} skipped ({reason})")
            records[part.name] = {"bench": part.bench, "argv": part.argv, "status": "skipped", "seconds": 0.0,
                                  "reason": reason}
        else:
            env = None
            if cluster is not None and part.bench in RAY_PARTS:
                try:
                    env = cluster.env(left)
                except RuntimeError as e:
                    log(f"suite: {part.name} failed ({e})")
                    records[part.name] = {"bench": part.bench, "argv": part.argv, "status": "failed", "seconds": 0.0,
                                          "returncode": None, "stderr_tail": [str(e)]}
            if part.name not in records:
                records[part.name] = run_part(part, min(left, max(share, MIN_PART_S)), env)
                if env is not None:
                    records[part.name]["ray_address"] = env["RAY_ADDRESS"]  # the shared cluster (loopback)
            if part.bench == "step":
                last_step = (part.name, records[part.name]["seconds"])
        if lane is not None:
            records[part.name]["lane"] = lane
    return records


# ----------------------------------------------------------------------------- reports


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows), ""]


def step_table(r: dict) -> list[str]:
    dtypes = [d for d in ("fp32", "bf16") if f"train_ms_{d}" in r["results"][0]]
    cols = [f"{what} ms {d}" for d in dtypes for what in ("train", "infer")]
    peak = "peak_gpu_mb" if "peak_gpu_mb" in r["results"][0] else "peak_rss_mb"
    return md_table(["model", "B", "L", *cols, peak.replace("_", " "), "params"],
                    [[x["model"], x["batch"], x["ll_len"], *(x.get(f"{what}_ms_{d}") for d in dtypes for what in ("train", "infer")),
                      x[peak], x["params"]] for x in r["results"]])


def latency_table(r: dict) -> list[str]:
    return md_table(["model", "candidates", "L", "ms", "× sim_soft", "× lap"],
                    [[x["model"], x["candidates"], x["ll_len"], x["ms"], x["vs_sim_soft"], x["vs_lap"]] for x in r["results"]])


def memory_table(r: dict) -> list[str]:
    key = r["measure"]
    return md_table(["model", "B", "L", key.replace("_", " "), "RSS before steps MB", "params"],
                    [[x["model"], x["batch"], x["ll_len"], x[key], x["rss_before_steps_mb"], x["params"]] for x in r["results"]])


def scale_table(r: dict) -> list[str]:
    return md_table(["mode", "workers", "item ids", "step ms", "step CPU ms", "peak RSS/worker MB", "tables/worker MB"],
                    [[x["mode"], x["workers"], x["item_vocab"], x["step_ms"], x["step_cpu_ms"], x["peak_rss_mb_per_worker"],
                      x["table_mb_per_worker"]] for x in r["results"]])


def ingest_table(r: dict) -> list[str]:
    rows = [["one process (iter_local_batches)", 1, r["single_process_rows_per_s"], 1.0]]
    rows += [["Ray Data", int(n), rate, r["scaling"][n]] for n, rate in r["ray_rows_per_s"].items()]
    return md_table(["path", "CPUs", "rows/s", "÷ (CPUs × one process)"], rows)


def train_table(r: dict) -> list[str]:
    return md_table(["model", "B", "L", "Ray Train samples/s", "step-only samples/s", "Ray ÷ step-only"],
                    [[r["model"], r["batch"], r["ll_len"], r["ray_samples_per_s"], r["step_only_samples_per_s"], r["ratio"]]])


def startup_table(r: dict) -> list[str]:
    return md_table(["path", "seconds to first batch"],
                    [["raylsm train (Ray)", r["seconds_to_first_batch"]], ["in-process", r["in_process_seconds"]],
                     ["bare TorchTrainer (Ray's floor)", r["ray_floor_seconds"]]])


TABLES = {"step": step_table, "latency": latency_table, "memory": memory_table, "scale": scale_table,
          "ingest": ingest_table, "train": train_table, "startup": startup_table}


def markdown(report: dict) -> str:
    """The report a reader wants: the run, the machine, a summary, and one table per part."""
    lines = ["# raylsm bench suite", "", f"`{report['command']}`", "",
             f"Device {report['device']}{' (quick sizes)' if report['quick'] else ''}; budget {report['budget_s']:.0f} s, "
             f"used {report['seconds']:.1f} s; {report['started_utc']}."
             + (" The local and the Ray parts ran side by side (two lanes): a check, not figures." if report["quick"] else ""),
             "", "## Machine", "",
             *md_table(["what", "value"], [[k, v] for k, v in report["machine"].items()]), "## Parts", "",
             *md_table(["part", "status", "seconds", "timeout s", "ratio", "ratio is"],
                       [[name, p["status"], p["seconds"], d.get("timeout_s"), _ratio_text(p["ratio"]),
                         d.get("result", {}).get("ratio_is", d.get("reason", ""))]
                        for (name, p), d in zip(report["parts"].items(), report["details"].values())])]
    for name, d in report["details"].items():
        lines += [f"## {name}", "", f"`raylsm bench {d['bench']} {shlex.join(d['argv'])}`", ""]
        if d["status"] == "ok":
            lines += TABLES[d["bench"]](d["result"])
        elif d["status"] == "skipped":
            lines += [f"Skipped: {d['reason']}.", ""]
        else:
            lines += [f"{d['status']} after {d['seconds']:.1f} s (exit code {d['returncode']}); last stderr lines:", "",
                      "```", *d["stderr_tail"], "```", ""]
    return "\n".join(lines)


def _ratio_text(ratio) -> str:
    if isinstance(ratio, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in ratio.items())
    return _fmt(ratio)


def command_line(args: argparse.Namespace) -> str:
    argv = ["raylsm", "bench", "suite", "--device", args.device, "--budget", f"{args.budget:g}", "--out", args.out]
    argv += ["--parts", ",".join(args.parts)] if list(args.parts) != list(PARTS) else []
    return shlex.join(argv + (["--quick"] if args.quick else []) + (["--no-mlflow"] if args.no_mlflow else []))


def run_suite(args: argparse.Namespace) -> dict:
    """The parts within the budget; writes ``suite.json`` and ``suite.md`` under ``--out``; returns the summary."""
    from raylsm.storage import make_private_dir

    if not args.budget > 0:
        raise ValueError(f"--budget: must be > 0 seconds, got {args.budget:g}")
    args.parts = csv_names(args.parts, "--parts", PARTS)
    resolve_device(args.device)
    now = datetime.now(timezone.utc)
    args.out = args.out or f"runs/bench-suite-{now:%Y%m%dT%H%M%SZ}"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} exists and is not a directory")
    out = make_private_dir(args.out)
    started, machine_info = time.monotonic(), machine()  # the machine (its load) before the parts run
    details = run_parts(plan(args), args.budget, shared_cluster=args.quick)
    summary = {
        "bench": "suite", "device": args.device, "quick": args.quick, "budget_s": args.budget,
        "parts": {name: {"status": d["status"], "seconds": d["seconds"], "ratio": d.get("result", {}).get("ratio")}
                  for name, d in details.items()},
        "reports": {"json": str(out / "suite.json"), "markdown": str(out / "suite.md")},
        "seconds": round(time.monotonic() - started, 1),
    }
    report = {**summary, "command": command_line(args), "started_utc": f"{now:%Y-%m-%d %H:%M:%S} UTC",
              "machine": machine_info, "details": details}
    (out / "suite.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "suite.md").write_text(markdown(report))
    log(f"suite: {sum(p['status'] == 'ok' for p in summary['parts'].values())}/{len(details)} parts ok in "
        f"{summary['seconds']:.0f} s; reports in {out}")
    return summary


def add_suite_parser(sub, common) -> None:
    """The ``raylsm bench suite`` subcommand on ``sub`` (``common`` adds --device and the MLflow options)."""
    p = sub.add_parser("suite", help="every bench part in one command within a time budget: JSON and Markdown reports")
    common(p)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all the parts together (default 480)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"the parts to run, comma-separated (they run in this order: {','.join(PARTS)})")
    p.add_argument("--out", help="report directory (default runs/bench-suite-<UTC timestamp>)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (emb 8, B 8/16, L 12/24, tiny data): a check of every part in a few minutes on a CPU")

"""The main job end to end on embedded defaults: generate data, train LCN and CAIN on local Ray, compare.

``python -m jobs.demo`` (what ``make demo`` runs):
1. writes a synthetic cross-domain dataset (``raylsm data synth``) unless it exists, and validates it;
2. trains ``lcn`` and ``cain`` briefly with Ray Train, each logged as an MLflow run in the
   local store (``sqlite:///<cwd>/mlflow.db``);
3. prints a comparison table on stderr and the JSON summary as the last stdout line.

What the terminal shows is the demo's own progress (one line per epoch, read back from the MLflow
run that the workers log to) and the table: Ray is started quiet (its INFO logs, the workers' output
and Ray Data's progress bars stay in Ray's log files under the session directory), MLflow's INFO logs
and artifact progress bars are off.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from raylsm.cli import emit
from raylsm.data.check import validate_dataset
from raylsm.data.contract import read_manifest
from raylsm.train.config import default_tracking_uri, resolve_job
from raylsm.train.cluster import ensure_ray
from raylsm.train.run import run_training


DEMO_WORLD = {"interests": 8, "cates_per_interest": 1, "tgt_items": 500, "src_items": 2000}
# Laptop-sized model settings (the presets' paper defaults are sized for GPUs).
DEMO_MODEL = ["model.features.emb_dim=16", "model.lap.k1=50", "model.lap.k2=20", "train.batch_size=256"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/synth-demo")
    p.add_argument("--rows", type=int, default=30_000)
    p.add_argument("--users", type=int, default=1_000)
    p.add_argument("--ll-len", type=int, default=100)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--models", default="lcn,cain")
    p.add_argument("--experiment", default="raylsm-demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--prepare-only", action="store_true", help="write and validate the dataset, train nothing")
    return p


class EpochPrinter(threading.Thread):
    """Prints a line per epoch of the run in progress, from the metrics rank 0 logs to MLflow."""

    def __init__(self, tracking_uri: str, experiment: str, label: str, epochs: int):
        super().__init__(daemon=True)
        self.uri, self.experiment, self.label, self.epochs = tracking_uri, experiment, label, epochs
        self.started = time.time()
        self.done = threading.Event()
        self.printed = 0
        self.run_id: str | None = None

    def run(self) -> None:
        while not self.done.wait(2.0):
            try:
                self.poll()
            except Exception:  # the store is busy or not created yet: try again at the next poll
                pass

    def poll(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        if self.run_id is None:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                return
            runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1,
                                      order_by=["attributes.start_time DESC"])
            if not runs or runs[0].info.start_time < self.started * 1000 - 5000:
                return
            self.run_id = runs[0].info.run_id
        run_id = self.run_id
        history = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
                   for key in ("train_loss", "val_auc", "test_auc")}
        for epoch in sorted(history["train_loss"]):
            if epoch < self.printed:
                continue
            shown = "  ".join(f"{k} {v[epoch]:.4f}" for k, v in history.items() if epoch in v)
            print(f"  {self.label} epoch {epoch + 1}/{self.epochs}: {shown}  ({time.time() - self.started:.0f} s)",
                  file=sys.stderr, flush=True)
            self.printed = epoch + 1


def quiet_mlflow() -> None:
    """MLflow's INFO logs, artifact progress bars and its UserWarnings about the logged model stay off the terminal."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case it already was
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_mlflow()
    if not (Path(args.data) / "manifest.json").is_file():
        from raylsm.data.synth import SynthConfig, generate_config

        # A compact world (8 interests, one category each, few items) so that a brief run on a laptop
        # shows the models learning; `raylsm data synth` defaults to a larger world that needs more rows.
        generate_config(args.data, SynthConfig(users=args.users, rows=args.rows, ll_len=args.ll_len, st_len=20,
                                               shards=4, seed=0, **DEMO_WORLD))
    validate_dataset(args.data)
    manifest = read_manifest(args.data)
    if args.prepare_only:
        emit({"data": args.data, "rows": manifest.splits})
        return 0
    ll_len = manifest.max_len["ll"]
    print(f"dataset {args.data}: {manifest.splits['train']['rows']} train / {manifest.splits['test']['rows']} test rows; "
          "starting a local Ray (loopback only)", file=sys.stderr, flush=True)
    ensure_ray(quiet=True)
    results = {}
    for name in args.models.split(","):
        job = resolve_job(
            preset=name,
            overrides=[f"data.path={args.data}", f"data.ll_len={ll_len}", "data.st_len=20", f"train.epochs={args.epochs}",
                       f"mlflow.experiment={args.experiment}", *DEMO_MODEL, *args.overrides],
        )
        print(f"training {name} ({args.epochs} epochs) ...", file=sys.stderr, flush=True)
        printer = EpochPrinter(job.mlflow.tracking_uri or default_tracking_uri(), args.experiment, name, args.epochs)
        printer.start()
        try:
            results[name] = run_training(job)
        finally:
            printer.done.set()
            printer.join()
        printer.poll()  # the last epoch, if it landed after the last poll
        print(f"  {name} done in {time.time() - printer.started:.0f} s", file=sys.stderr, flush=True)
    header = f"{'model':8s} {'auc':>8s} {'gauc':>8s} {'logloss':>8s} {'rows/s':>8s}  mlflow run"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(f"{name:8s} {r['auc']:8.4f} {r['gauc']:8.4f} {r['logloss']:8.4f} {r['samples_per_s']:8.0f}  {r['mlflow_run_id']}")
    uri = default_tracking_uri()
    lines.append(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print("\n".join(lines), file=sys.stderr)
    emit({"data": args.data, "tracking_uri": uri, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job end to end on embedded defaults: generate data, train LCN and CAIN on local Ray, compare.

``python -m jobs.demo`` (what ``make demo`` runs):
1. writes a synthetic cross-domain dataset (``raylsm data synth``) unless it exists, and validates it;
2. trains ``lcn`` and ``cain`` briefly with Ray Train, each logged as an MLflow run in the
   local store (``sqlite:///<cwd>/mlflow.db``);
3. prints a comparison table on stderr and the JSON summary as the last stdout line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raylsm.cli import emit
from raylsm.data.contract import read_manifest, validate_dataset
from raylsm.train.config import default_tracking_uri, resolve_job
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (Path(args.data) / "manifest.json").is_file():
        from raylsm.data.synth import SynthConfig, generate_config

        # A compact world (8 interests, one category each, few items) so that a brief run on a laptop
        # shows the models learning; `raylsm data synth` defaults to a larger world that needs more rows.
        generate_config(args.data, SynthConfig(users=args.users, rows=args.rows, ll_len=args.ll_len, st_len=20,
                                               shards=4, seed=0, **DEMO_WORLD))
    validate_dataset(args.data)
    ll_len = read_manifest(args.data).max_len["ll"]
    results = {}
    for name in args.models.split(","):
        job = resolve_job(
            preset=name,
            overrides=[f"data.path={args.data}", f"data.ll_len={ll_len}", "data.st_len=20", f"train.epochs={args.epochs}",
                       f"mlflow.experiment={args.experiment}", *DEMO_MODEL, *args.overrides],
        )
        results[name] = run_training(job)
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

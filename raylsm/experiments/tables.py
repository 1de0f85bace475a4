"""The table runner behind ``python -m jobs.experiments.run``: reproduce one of the papers' tables: ``python -m jobs.experiments.run lcn_table1 --data DIR [--seeds N] [--set k=v ...]``.

Tables (each a grid space in this folder, every cell an MLflow child run, seeds repeated):
lcn_table1 (CRP ablation), lcn_table2 (backbone + CRP), lcn_table3 (K1 x K2), cain_table1 (context
encoder), cain_table2 (backbone + TCN), cain_table3 (backbone + MSIA), cain_table4 (PEG placement and
aggregation). The table (mean ± spread over seeds of the test metrics of each cell's checkpoint chosen on
validation) is printed on stderr and logged to the search's parent run as ``table.md``/``table.csv``;
the last stdout line is the JSON with the rows. ``--set`` fixes any config key (the budget: data
sizes, model sizes, epochs). ``--in-process`` trains the cells in this process without Ray
(``fit_local``: the same validation cut, early stopping and validation-chosen epoch as a Ray run), each still an
MLflow child run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from raylsm.config import ConfigError

# The tables' spaces: the grid YAMLs of jobs/experiments/ (run from the repository root).
TABLES_DIR = Path("jobs/experiments")


def tables(folder: Path = TABLES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def parser(folder: Path = TABLES_DIR) -> argparse.ArgumentParser:
    """The options of ``python -m jobs.experiments.run``; the tables are the grid spaces in ``folder``."""
    p = argparse.ArgumentParser(prog="python -m jobs.experiments.run", description="Reproduce one of the papers' tables: ``python -m jobs.experiments.run lcn_table1 --data DIR [--seeds N] [--set k=v ...]``.")
    p.add_argument("table", choices=tables(folder))
    p.set_defaults(tables_dir=Path(folder))
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (train.seed 0..N-1)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--workers-per-trial", type=int)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--grid", dest="grids", action="append", default=[], metavar="KEY=V1,V2",
                   help="run only these values of one of the table's grid keys (a subset of its cells)")
    p.add_argument("--experiment", help="MLflow experiment (default: the table's name)")
    p.add_argument("--tracking-uri")
    p.add_argument("--storage", default="runs/experiments")
    p.add_argument("--in-process", action="store_true",
                   help="train the cells here, one after another, without Ray (fit_local: validation cut, early "
                        "stopping, test metrics of the epoch chosen on validation): quick screens on one machine")
    return p


def run_table(args: argparse.Namespace) -> dict:
    """Run ``args.table``: a search over its grid (or, ``--in-process``, every cell here); returns the JSON result."""
    from raylsm.tune.search import SearchRequest, run_search
    from raylsm.experiments.table import log_table, markdown, search_table

    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
    space = yaml.safe_load((Path(args.tables_dir) / f"{args.table}.yaml").read_text())
    space["params"]["train.seed"] = {"grid": list(range(args.seeds))}
    for spec in args.grids:
        restrict(space, args.table, spec)
    storage = Path(args.storage)
    storage.mkdir(parents=True, exist_ok=True)
    space_path = storage / f"{args.table}.yaml"  # the space as run (seeds applied): logged with the search
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    if args.in_process:
        return run_in_process(args, space_path)
    req = SearchRequest(space=str(space_path), data=args.data, concurrency=args.concurrency,
                        workers_per_trial=args.workers_per_trial, gpu=args.gpu, overrides=args.overrides,
                        experiment=args.experiment or args.table, tracking_uri=args.tracking_uri, storage=str(storage))
    summary = run_search(req)
    from raylsm.train.config import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    rows = search_table(uri, summary["parent_run_id"])
    log_table(uri, summary["parent_run_id"], rows)
    print(f"\n{args.table} ({args.seeds} seeds; test metrics of the checkpoint chosen on validation)\n{markdown(rows)}",
          file=sys.stderr)
    return {"table": args.table, "rows": rows, "parent_run_id": summary["parent_run_id"], "counts": summary["counts"]}


def run_in_process(args: argparse.Namespace, space_path: Path) -> dict:
    """Every cell x seed trained in this process (``fit_local``), each an MLflow child run of one parent.

    Each child logs the trial's config (tag ``raylsm.trial_config``, as a search's children do), the
    resolved model params, every epoch's ``val_*``, ``test_*`` and ``train_loss`` (step = epoch) and, as
    its headline ``auc``/``gauc``/``logloss`` and ``best_epoch``, the test metrics of the epoch chosen on
    validation (:func:`~raylsm.train.local.chosen_epoch`), as a Ray run does; the table is built from the
    headlines exactly as for a search.
    """
    from mlflow.entities import Metric, Param

    from raylsm.config import flatten
    from raylsm.data.check import validate_dataset
    from raylsm.models.layers import Vocab
    from raylsm.train.config import default_tracking_uri
    from raylsm.train.local import chosen_epoch, fit_local
    from raylsm.train.tracking import client as tracking_client, log_params, check_store, experiment_id, start_parent_run, used_config
    from raylsm.tune.space import describe, grid_points, load_space, trial_job
    from raylsm.experiments.table import log_table, markdown, search_table

    name = args.experiment or args.table
    overrides = [f"data.path={args.data}", f"mlflow.experiment={name}", *args.overrides]
    if args.gpu:
        overrides.append("train.use_gpu=true")
    space = load_space(space_path, None, overrides)
    points = grid_points(space)
    jobs = [trial_job(space, point, overrides) for point in points]  # every cell checked before any training
    manifest = validate_dataset(args.data)
    uri = args.tracking_uri or default_tracking_uri()
    check_store(uri)
    client = tracking_client(uri)
    settings = {"mode": "in_process", "cells": len(points)}
    parent = start_parent_run(uri, jobs[0], manifest, f"{args.table}-in-process", settings, describe(space), space_path)
    exp = experiment_id(uri, name)
    vocab = Vocab.from_manifest(manifest)
    status = "FAILED"
    try:
        for i, (point, job) in enumerate(zip(points, jobs)):
            config = json.dumps(point, sort_keys=True)
            print(f"[{i + 1}/{len(points)}] {config}", file=sys.stderr, flush=True)
            run = client.create_run(exp, run_name=f"{args.table}-{i:03d}",
                                    tags={"mlflow.parentRunId": parent, "raylsm.trial_config": config,
                                          "raylsm.kind": "in_process", "raylsm.model": job.preset or ""})
            run_id = run.info.run_id
            try:
                log_params(client, run_id, [Param(k, str(v)[:6000]) for k, v in flatten(used_config(job)).items()])
                _, history = fit_local(job, vocab, progress=True)
                now, best = int(time.time() * 1000), chosen_epoch(history)
                per_epoch = [Metric(name, float(h[k]), now, int(h["epoch"])) for h in history for k, name in
                             (("auc", "test_auc"), ("gauc", "test_gauc"), ("logloss", "test_logloss"),
                              ("train_loss", "train_loss"), ("val_auc", "val_auc"), ("val_gauc", "val_gauc"),
                              ("val_logloss", "val_logloss")) if k in h]
                headline = [Metric(k, float(best[k]), now, 0) for k in ("auc", "gauc", "logloss")]
                client.log_batch(run_id, metrics=[*per_epoch, *headline,
                                                  Metric("best_epoch", float(best["epoch"]), now, 0)])
            except BaseException:
                client.set_terminated(run_id, "FAILED")
                raise
            client.set_terminated(run_id, "FINISHED")
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status)
    rows = search_table(uri, parent)
    log_table(uri, parent, rows)
    print(f"\n{args.table} ({args.seeds} seeds; in process: test metrics of the epoch chosen on validation)\n"
          f"{markdown(rows)}",
          file=sys.stderr)
    return {"table": args.table, "mode": "in_process", "rows": rows, "parent_run_id": parent, "cells": len(points)}


def restrict(space: dict, table: str, spec: str) -> None:
    """``--grid KEY=V1,V2``: keep only these values of the table's grid ``KEY`` (each must be one of them)."""
    key, sep, values = spec.partition("=")
    grid = space["params"].get(key, {}).get("grid") if isinstance(space["params"].get(key), dict) else None
    if not sep or not values:
        raise ConfigError(f"--grid {spec}: expected KEY=V1,V2")
    if grid is None or key == "train.seed":
        names = ", ".join(k for k, v in space["params"].items() if isinstance(v, dict) and "grid" in v and k != "train.seed")
        raise ConfigError(f"--grid {key}: not a grid key of {table} (its grid keys: {names}; seeds: --seeds)")
    by_text = {str(v): v for v in grid}
    wanted = [v.strip() for v in values.split(",")]
    unknown = [v for v in wanted if v not in by_text]
    if unknown:
        raise ConfigError(f"--grid {key}: {', '.join(unknown)} not in the table's values {', '.join(by_text)}")
    space["params"][key] = {"grid": [by_text[v] for v in wanted]}

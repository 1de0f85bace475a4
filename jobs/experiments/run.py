"""Reproduce one of the papers' tables: ``python -m jobs.experiments.run lcn_table1 --data DIR [--seeds N] [--set k=v ...]``.

Tables (each a grid space in this folder, every cell an MLflow child run, seeds repeated):
lcn_table1 (CRP ablation), lcn_table2 (backbone + CRP), lcn_table3 (K1 x K2), cain_table1 (context
encoder), cain_table2 (backbone + TCN), cain_table3 (backbone + MSIA), cain_table4 (PEG placement and
aggregation). The table (mean ± spread over seeds of the test metrics of each cell's checkpoint chosen on
validation) is printed on stderr and logged to the search's parent run as ``table.md``/``table.csv``;
the last stdout line is the JSON with the rows. ``--set`` fixes any config key (the budget: data
sizes, model sizes, epochs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from raylsm.cli import emit, main
from raylsm.config import ConfigError

HERE = Path(__file__).resolve().parent
TABLES = sorted(p.stem for p in HERE.glob("*.yaml"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.experiments.run", description=__doc__.splitlines()[0])
    p.add_argument("table", choices=TABLES)
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
    p.set_defaults(fn=run_table)
    return p


def run_table(args: argparse.Namespace) -> int:
    from raylsm.tune.search import SearchRequest, run_search
    from raylsm.tune.table import log_table, markdown, search_table

    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
    space = yaml.safe_load((HERE / f"{args.table}.yaml").read_text())
    space["params"]["train.seed"] = {"grid": list(range(args.seeds))}
    for spec in args.grids:
        _restrict(space, args.table, spec)
    storage = Path(args.storage)
    storage.mkdir(parents=True, exist_ok=True)
    space_path = storage / f"{args.table}.yaml"  # the space as run (seeds applied): logged with the search
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
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
    emit({"table": args.table, "rows": rows, "parent_run_id": summary["parent_run_id"], "counts": summary["counts"]})
    return 0


def _restrict(space: dict, table: str, spec: str) -> None:
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], parser=_parser()))

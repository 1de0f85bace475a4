"""The ``raylsm`` command line (docs/design.md, "Command line").

Progress goes to stderr; the last stdout line of every command is one JSON
object with its results. A user mistake (bad option, bad config key, invalid
dataset) is one ``raylsm: error: ...`` line on stderr and exit code 2 (1 for
``data check`` finding problems), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

from raylsm.config import ConfigError


class UserError(Exception):
    """A mistake in the user's input; printed as one line."""


def emit(result: dict[str, Any]) -> None:
    """Print the final JSON line (NaN -> null so every JSON reader accepts it)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    sys.stdout.flush()
    print(json.dumps(clean(result)), flush=True)


# ----------------------------------------------------------------------------- data


def _ctx_noise(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1 or 4 comma-separated probabilities, got {text!r}") from None
    if len(values) not in (1, 4):
        raise argparse.ArgumentTypeError(f"expected 1 or 4 comma-separated probabilities, got {text!r}")
    return values * 4 if len(values) == 1 else values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def cmd_data_synth(args: argparse.Namespace) -> int:
    from raylsm.data.synth import SynthConfig, generate_config

    cfg = SynthConfig(
        users=args.users, rows=args.rows, ll_len=args.ll_len, st_len=args.st_len, shards=args.shards,
        domains=args.domains, seed=args.seed, interests=args.interests, cates_per_interest=args.cates_per_interest,
        tgt_items=args.tgt_items, src_items=args.src_items, p_real=args.p_real, p_decoy=args.p_decoy,
        st_noise=args.st_noise, ctx_noise=args.ctx_noise, focus=args.focus, bridge=args.bridge == "on", context_effect=args.context_effect == "on",
    )
    emit(generate_config(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite))
    return 0


def cmd_data_taobao(args: argparse.Namespace) -> int:
    from raylsm.data.taobao import convert

    emit(convert(args.raw, args.out, variant=args.variant, ll_len=args.ll_len, overwrite=args.overwrite))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from raylsm.data.check import iter_problems

    problems = list(iter_problems(args.dir))
    for p in problems:
        print(p, file=sys.stderr)
    emit({"dir": args.dir, "ok": not problems, "problems": problems})
    return 1 if problems else 0


# ----------------------------------------------------------------------------- train / eval


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``raylsm train`` and ``python -m jobs.train``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model preset: lcn, cain, lap, din, sim_soft, eta, sdim, twin")
    src.add_argument("--config", help="job YAML (see jobs/*.yaml)")
    p.add_argument("--data", help="dataset directory (manifest.json + train/ test/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key by dotted path, e.g. --set model.lap.k1=100 (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--storage", help="Ray Train storage path for checkpoints (default ./runs)")
    p.add_argument("--name", help="run name; re-running with the same name and storage resumes from its latest checkpoint")
    p.add_argument("--max-failures", type=int, help="worker failures to recover from (-1 = unlimited)")
    p.add_argument("--resume-from", help="checkpoint directory to continue training from")


def job_from_args(args: argparse.Namespace):
    from raylsm.train.config import FLAG_KEYS, job_flags, resolve_job

    flags = job_flags(**{name: getattr(args, name) for name in FLAG_KEYS})
    return resolve_job(preset=args.model, config_file=args.config, overrides=args.overrides, flags=flags)


def cmd_train(args: argparse.Namespace) -> int:
    from raylsm.train.run import run_training

    job = job_from_args(args)
    emit(run_training(job))
    return 0


def add_tune_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``raylsm tune`` and ``python -m jobs.tune``."""
    p.add_argument("--space", required=True, help="search-space YAML (see tune_spaces/*.yaml)")
    p.add_argument("--data", help="dataset directory (manifest.json + train/ test/)")
    p.add_argument("--trials", type=int, help="trials to sample (grid: repeats of the grid); default: the space file's")
    p.add_argument("--concurrency", type=int, help="trials running at once; default: the space file's")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers of each trial")
    p.add_argument("--gpu", action="store_true", help="each trial's workers get train.gpus_per_worker GPUs (fractions share)")
    p.add_argument("--searcher", choices=["optuna", "random", "grid"], help="default: the space file's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key for every trial, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--storage", help="where the search and its trials' checkpoints live (default ./runs)")
    p.add_argument("--name", help="search name (default: <space>-<time>); with --resume, which search to continue")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (the named one, else the latest of this space) without re-running finished trials")


def cmd_tune(args: argparse.Namespace) -> int:
    from raylsm.tune.search import SearchRequest, run_search

    for flag, value in (("--trials", args.trials), ("--concurrency", args.concurrency)):
        if value is not None and value < 1:  # not "unset": 0 would silently become the space file's value
            raise UserError(f"{flag}: must be >= 1, got {value}")
    req = SearchRequest(space=args.space, data=args.data, trials=args.trials, concurrency=args.concurrency,
                        workers_per_trial=args.workers_per_trial, gpu=args.gpu, searcher=args.searcher,
                        overrides=args.overrides, experiment=args.experiment, tracking_uri=args.tracking_uri,
                        storage=args.storage, name=args.name, resume=args.resume)
    emit(run_search(req))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raylsm.train.evaluate import evaluate_checkpoint

    emit(evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    """``raylsm figures fig4|fig5``: the LCN paper's Fig. 4 / Fig. 5 from checkpoints, as PNG + JSON (+ MLflow artifacts)."""
    from raylsm.experiments.consistency import fig5
    from raylsm.experiments.figures import fig4

    common = dict(checkpoints=args.checkpoints, data=args.data, out=args.out, run_id=args.run_id,
                  tracking_uri=args.tracking_uri)
    if args.figure == "fig4":
        emit(fig4(**common, max_items=args.max_items, k=args.k, projection=args.projection, embedding=args.embedding,
                  max_rows=args.max_rows))
    else:
        emit(fig5(**common, rows=args.rows, top_n=args.top_n))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``raylsm bench <name>``: figures with a reference from the same run and a top-level ``ratio``."""
    from raylsm.bench.cli import run_bench

    emit(run_bench(args))
    return 0


# ----------------------------------------------------------------------------- parser

OVERWRITE_HELP = ("replace the dataset already in --out (only a raylsm dataset; it is swapped out once the new "
                  "one is complete and checked)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylsm", description="Train lifelong-sequence CTR models (LCN, CAIN and baselines) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write, convert and check datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate a synthetic dataset with planted effects")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--ll-len", type=int, default=500)
    p.add_argument("--st-len", type=int, default=50)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--domains", choices=["cross", "single"], default="cross")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interests", type=int, default=32, help="hidden interests (world size)")
    p.add_argument("--cates-per-interest", type=int, default=4)
    p.add_argument("--tgt-items", type=int, default=10_000, help="target-domain items (candidates, st_tgt)")
    p.add_argument("--src-items", type=int, default=50_000, help="source-domain items (lifelong, st_src)")
    p.add_argument("--bridge", choices=["on", "off"], default="on",
                   help="cross-domain co-occurrence in the short-term sequences (rewards CRP)")
    p.add_argument("--context-effect", choices=["on", "off"], default="on",
                   help="session engagement (ctx) tells real from decoy sessions (rewards a context encoder)")
    p.add_argument("--p-real", type=float, default=0.4, help="share of real (liked-interest) sessions")
    p.add_argument("--p-decoy", type=float, default=0.4,
                   help="share of decoy sessions: > p_real makes decoys the frequent interests (counting misleads)")
    p.add_argument("--st-noise", type=float, default=0.2,
                   help="share of st_tgt items of a random interest instead of a current one: higher weakens the "
                        "short-term shortcut (and the bridge) so the lifelong sequence matters more")
    p.add_argument("--ctx-noise", type=_ctx_noise, default=(0.6, 0.7, 0.8, 0.9), metavar="Q[,Q,Q,Q]",
                   help="probability that a focus behaviour's own engagement is random, by user activity 1..4 (one "
                        "value: all four); 1 leaves only the neighbours' engagement to tell real from decoy sessions")
    p.add_argument("--focus", type=float, default=0.5,
                   help="share of a session's behaviours of its focus interest (the rest: feed items of random "
                        "interests); 1 removes the session-topic signal a window could use to tell focus from feed items")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(fn=cmd_data_synth)

    p = data.add_parser("taobao", help="convert the public Taobao logs")
    p.add_argument("--raw", required=True, help="folder with the raw CSV files")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", required=True, choices=["ad-click", "user-behavior"])
    p.add_argument("--ll-len", type=int, default=500)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(fn=cmd_data_taobao)

    p = data.add_parser("check", help="validate a dataset's manifest and every shard")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_data_check)

    p = sub.add_parser("train", help="train a model with Ray Train")
    add_train_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune (each trial a Ray Train run and a child MLflow run)")
    add_tune_args(p)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("eval", help="AUC, GAUC and logloss of a checkpoint on a dataset's test split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=_positive_int, default=2048)
    p.set_defaults(fn=cmd_eval)

    figures = sub.add_parser("figures", help="the LCN paper's Fig. 4 and Fig. 5 from trained checkpoints (PNG + JSON, MLflow artifacts)")
    figs = figures.add_subparsers(dest="figure", required=True)
    for name, text in (("fig4", "item embeddings of both domains coloured by hidden interest, with vs without CRP"),
                       ("fig5", "consistency of the levels: share of the final level's top-n each earlier level finds")):
        p = figs.add_parser(name, help=text)
        p.add_argument("--checkpoints", nargs="+", required=True, metavar="DIR",
                       help="checkpoint directories (fig4: e.g. lap and lcn; fig5: lap, sim_soft or eta)")
        p.add_argument("--data", required=True, help="the dataset the checkpoints were trained on")
        p.add_argument("--out", required=True, help="folder for <figure>.png and <figure>.json")
        p.add_argument("--run-id", help="MLflow run to log both files to, under figures/")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
        if name == "fig4":
            p.add_argument("--max-items", type=int, default=1000, help="most frequent items per domain to map")
            p.add_argument("--k", type=int, default=10, help="neighbours of the k-NN interest precision")
            p.add_argument("--projection", choices=["pca", "tsne"], default="pca")
            p.add_argument("--embedding", choices=["behaviour", "item"], default="behaviour",
                           help="an item's e^h = [e_item ‖ e_cate] (what CSA and CRP see), or e_item alone")
            p.add_argument("--max-rows", type=int, default=20_000, help="train rows read to find each domain's items")
        else:
            p.add_argument("--rows", type=int, default=512, help="test rows scored")
            p.add_argument("--top-n", type=int, default=50, help="size of the real and test sets (the paper: 50)")
        p.set_defaults(fn=cmd_figures)

    from raylsm.bench.cli import add_bench_parsers

    p = sub.add_parser("bench", help="benchmarks: ingest, step, train, latency, memory, startup, scale, suite (JSON with a ratio)")
    add_bench_parsers(p)
    p.set_defaults(fn=cmd_bench)
    return parser


def entry_parser(prog: str, doc: str, add_args, fn) -> argparse.ArgumentParser:
    """The parser of a ``python -m jobs.<name>`` entry point: one command's flags under its own name."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    add_args(p)
    p.set_defaults(fn=fn)
    return p


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    from raylsm.data.contract import ContractError
    from raylsm.train.cluster import prepare_ray_import
    from raylsm.train.tracking import TrackingError

    prepare_ray_import()  # before any command imports Ray

    try:
        return args.fn(args)
    except ContractError as e:
        for line in e.problems:
            print(f"raylsm: error: {line}", file=sys.stderr)
        return 2
    except (ConfigError, UserError, TrackingError, FileNotFoundError, ValueError) as e:
        if os.environ.get("RAYLSM_DEBUG"):
            raise
        print(f"raylsm: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raylsm: interrupted", file=sys.stderr)
        return 130

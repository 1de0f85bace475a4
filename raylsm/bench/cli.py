"""``raylsm bench``: the subcommands' options, running one, and its MLflow record."""

from __future__ import annotations

import argparse
import time

from raylsm.bench.common import log
from raylsm.bench.local import run_latency, run_memory, run_step


# ----------------------------------------------------------------------------- MLflow record


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of ``result`` as MLflow metric names (``results.0.train_ms_fp32`` ...)."""
    out: dict[str, float] = {}
    items = result.items() if isinstance(result, dict) else enumerate(result)
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and v == v:
            out[name] = float(v)
        elif isinstance(v, (dict, list)):
            out.update(flat_metrics(v, name + "."))
    return out


def log_result(result: dict, args: argparse.Namespace, artifacts=()) -> str | None:
    """One run in the MLflow experiment (``--experiment``, default ``bench``), with the files ``artifacts``; returns its id."""
    import json

    from raylsm.train.config import default_tracking_uri
    from raylsm.train.tracking import client as tracking_client, check_store, experiment_id

    uri = args.tracking_uri or default_tracking_uri()
    check_store(uri)
    client = tracking_client(uri)
    run = client.create_run(experiment_id(uri, args.experiment), run_name=f"bench-{args.bench}",
                            tags={"raylsm.bench": args.bench, "raylsm.device": result.get("device", "")})
    run_id = run.info.run_id
    try:
        params = {k: str(v) for k, v in vars(args).items() if k not in ("fn", "tracking_uri") and v is not None}
        for k, v in params.items():
            client.log_param(run_id, k, v[:500])
        for k, v in flat_metrics(result).items():
            client.log_metric(run_id, k.replace(":", "_"), v)
        client.log_text(run_id, json.dumps(result, indent=2), "bench.json")
        for path in artifacts:
            client.log_artifact(run_id, path)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id



def run_bench(args: argparse.Namespace) -> dict:
    """Run the subcommand named by ``args.bench``, log it to MLflow (unless ``--no-mlflow``), return its JSON."""
    from raylsm.bench import ray_runs, scale, startup, stream, suite

    runners = {"step": run_step, "memory": run_memory, "latency": run_latency,
               "ingest": ray_runs.run_ingest, "train": ray_runs.run_train, "startup": startup.run_startup,
               "scale": scale.run_scale, "stream": stream.run_stream, "suite": suite.run_suite}
    started = time.perf_counter()
    result = runners[args.bench](args)
    result.setdefault("seconds", round(time.perf_counter() - started, 1))  # the suite's own, as in its reports
    if not args.no_mlflow:
        try:
            # the suite's reports (JSON and Markdown) go with its run as files
            result["mlflow_run_id"] = log_result(result, args, artifacts=result.get("reports", {}).values())
        except Exception as e:  # the figures are printed whatever the store does
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log(f"raylsm: bench result not logged to MLflow ({reason})")
            result["mlflow_run_id"] = None
    return result


# ----------------------------------------------------------------------------- command line


def add_bench_parsers(bench: argparse.ArgumentParser) -> None:
    """The ``raylsm bench <name>`` subcommands and their options."""
    sub = bench.add_subparsers(dest="bench", required=True, metavar="{ingest,step,train,latency,memory,startup,scale,stream,suite}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        p.add_argument("--experiment", default="bench", help="MLflow experiment (default: bench)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
        p.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")

    def models(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--models", default=default, help="comma-separated presets")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="model config override, e.g. --set features.emb_dim=32 (repeatable)")
        p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")

    def data(p: argparse.ArgumentParser, rows: int, ll_len: int) -> None:
        p.add_argument("--data", help="dataset directory; default: a synthetic one generated in a temporary directory")
        p.add_argument("--rows", type=int, default=rows, help="rows of the generated dataset")
        p.add_argument("--shards", type=int, default=8, help="shards of the generated dataset")
        p.add_argument("--ll-len", type=int, default=ll_len, help="lifelong length (generated and collated)")
        p.add_argument("--st-len", type=int, default=50, help="short-term length (generated and collated)")

    p = sub.add_parser("ingest", help="rows/s of the Ray Data path with 1..N CPUs vs the one-process reader")
    common(p)
    data(p, 60_000, 500)
    p.add_argument("--cpus", default="1,2", help="CPUs Ray Data may use, comma-separated (default 1,2)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--block-rows", type=int, default=8192, help="data.block_rows of the Ray path")
    p.add_argument("--prefetch", type=int, default=2, help="train.prefetch_batches of the Ray path")
    p.add_argument("--repeats", type=int, default=3)

    p = sub.add_parser("step", help="train and inference step time per model, length and dtype (synthetic batch)")
    common(p)
    models(p, "lcn,cain")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ll-len", default="500,2000", help="comma-separated lifelong lengths; ratio = last / first")
    p.add_argument("--dtypes", default="fp32", help="fp32,bf16 (bf16: CUDA only, as in training)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up); the median is reported")
    p.add_argument("--no-infer", action="store_true", help="training steps only")
    p.add_argument("--compile", action="store_true",
                   help="also time the model after torch.compile (train.compile), in the same process: *_compiled keys")

    p = sub.add_parser("train", help="samples/s of a short Ray Train run vs the training step alone")
    common(p)
    data(p, 20_000, 500)
    p.add_argument("--model", default="lcn")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="job config override, e.g. --set model.features.emb_dim=16 (repeatable)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="Ray epochs; the first (warm-up) is not counted")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=10, help="timed steps of the step-only reference")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the step-only reference")

    p = sub.add_parser("latency", help="scoring one user against C candidates, per model; ratios to sim_soft and lap")
    common(p)
    models(p, "lcn,cain,lap,sim_soft")
    p.add_argument("--ll-len", type=int, default=500)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)

    p = sub.add_parser("memory", help="peak RSS / GPU memory of one training process per model")
    common(p)
    models(p, "cain,lcn")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ll-len", type=int, default=500)
    p.add_argument("--steps", type=int, default=2)

    p = sub.add_parser("startup", help="seconds from `raylsm train` starting to its first training batch")
    common(p)
    data(p, 20_000, 500)
    p.add_argument("--model", default="lcn")
    p.add_argument("--cluster", choices=("fresh", "running"), default="fresh",
                   help="fresh: each run starts its own local cluster (timed); running: every run joins one local "
                        "loopback cluster started before the first (untimed), as `ray start` would leave one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="job config override for the measured `raylsm train` (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for one `raylsm train`")

    from raylsm.bench.scale import add_scale_parser
    from raylsm.bench.stream import add_stream_parser
    from raylsm.bench.suite import add_suite_parser

    add_scale_parser(sub, common)
    add_stream_parser(sub, common)
    add_suite_parser(sub, common)

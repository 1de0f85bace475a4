"""MLflow record (docs/design.md, "MLflow record"): one run per training, created and closed by the driver.

The driver runs every check first (nothing is logged for a run that never starts), then opens
the run with the context tags ``mlflow.start_run`` would set (source, git commit, user), the
``raylsm.*`` tags, the params of the parts of the model the run uses (flattened, dotted; URIs
with credentials redacted), the resolved job YAML as an artifact and the dataset as an input
(digest from the manifest). Rank 0 of the training workers logs per-epoch metrics into that run
id (NaN logged as NaN) and samples system metrics (CPU, memory, GPU). The driver logs the kept
checkpoint as an MLflow model that loads without unpickling (``raylsm/serving.py``: code + a
weights-only checkpoint, with a signature), the headline metrics of that checkpoint, and ends
the run FINISHED, FAILED or KILLED. A tuning trial's run is created with ``parent_run_id``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from raylsm.config import flatten, to_dict
from raylsm.storage import absolute
from raylsm.train.uri import SECRET_URI_ENV, has_secret, real_uri, redact_uri, scrub, secret_env  # noqa: F401 (public API)

_PARAM_CHUNK = 100  # MLflow accepts at most 100 params per log_batch call


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


def client(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri`` (redacted or not); a credentialed URI is never printed by MLflow."""
    from mlflow.tracking import MlflowClient

    uri = real_uri(tracking_uri)
    if has_secret(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # its "View run at <uri>" line
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def request_limits(retries: int, timeout_s: int):
    """MLflow's HTTP retries and timeout (seconds) for the requests made inside; a user's own settings win."""
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    set_here = {k: v for k, v in limits.items() if k not in os.environ}
    os.environ.update(set_here)
    try:
        yield
    finally:
        for key in set_here:
            os.environ.pop(key, None)


# The store check: one try (a refused connection fails at once), but a store that answers slowly (a loaded
# host, a fresh SQL store creating its tables) is given a minute; later requests keep MLflow's own retries.
CHECK_TIMEOUT_S = 60


def check_store(tracking_uri: str) -> None:
    """Fail with one clear line if the tracking store cannot be reached."""
    try:
        with request_limits(0, CHECK_TIMEOUT_S):
            client(tracking_uri).search_experiments(max_results=1)
    except Exception as e:  # any failure here means training must not start
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = scrub(first, real_uri(tracking_uri))
        cause = re.search(r"Connection refused|Read timed out[^)]*|Name or service not known|"
                          r"Temporary failure in name resolution|timed out", first)  # urllib3's reason, at the end
        why = f"{cause.group(0)}; {first[:160]}" if cause and cause.group(0) not in first[:160] else first[:200]
        raise TrackingError(f"--tracking-uri {redact_uri(tracking_uri)}: MLflow tracking store unreachable ({why})") from None


def experiment_id(tracking_uri: str, name: str) -> str:
    """Get or create the experiment; new ones keep artifacts under ./mlartifacts (absolute path)."""
    mc = client(tracking_uri)
    exp = mc.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if tracking_uri.startswith("sqlite:") or "://" not in tracking_uri:
        artifacts = (Path.cwd() / "mlartifacts").resolve().as_uri()
    try:
        return mc.create_experiment(name, artifact_location=artifacts)
    except Exception:
        exp = mc.get_experiment_by_name(name)  # created concurrently by another trial
        if exp is None:
            raise
        return exp.experiment_id


def used_config(job) -> dict[str, Any]:
    """The resolved job config reduced to what the run uses: the chosen lifelong module's block and the
    enabled enhancements only (a ``din`` run logs no ``model.twin.*``); the tracking URI redacted."""
    cfg = _redacted(job)
    model = cfg["model"]
    kept = {"lifelong": model["lifelong"], "head": model["head"], "features": model["features"],
            model["lifelong"]: model[model["lifelong"]]}
    for block, on in (("crp", model["crp"]["enabled"]), ("msia", model["msia"]["enabled"]),
                      ("peg", model["peg"]["enabled"])):
        kept[block] = model[block] if on else {"enabled": False}
    kept["context"] = model["context"] if model["context"]["kind"] != "none" else {"kind": "none"}
    cfg["model"] = kept
    return cfg


def _redacted(job) -> dict:
    """The job as plain data with its tracking URI's credentials removed."""
    cfg = to_dict(job)
    if cfg.get("mlflow", {}).get("tracking_uri"):
        cfg["mlflow"]["tracking_uri"] = redact_uri(cfg["mlflow"]["tracking_uri"])
    return cfg


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` plus what ``mlflow.start_run`` would add: source name/type, user, git commit."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags(tags)
    if "mlflow.source.git.commit" not in tags and (commit := _git_commit()):
        tags["mlflow.source.git.commit"] = commit  # MLflow finds it only with GitPython installed
    return tags


def log_params(client, run_id: str, params: list) -> None:
    for i in range(0, len(params), _PARAM_CHUNK):
        client.log_batch(run_id, params=params[i : i + _PARAM_CHUNK])


def manifest_digest(manifest) -> str:
    """A short content digest of the dataset's manifest (what the MLflow UI shows for the input)."""
    text = json.dumps(manifest.to_json() if hasattr(manifest, "to_json") else manifest, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _dataset_input(job, manifest):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = absolute(job.data.path)
    try:
        with warnings.catch_warnings():  # MLflow registers two local sources of one name and warns for any path
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(path)
    except Exception:  # no registered source for this scheme: record the path as an HTTP-like URI
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        source = HTTPDatasetSource(path)
    return MetaDataset(source=source, name=manifest.name, digest=manifest_digest(manifest))


def start_run(
    tracking_uri: str,
    job,
    manifest,
    run_name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, Callable[[], None]]:
    """Create a run with its context tags; return its id and the function that writes the rest of the record.

    The rest (used params, the ``raylsm.*`` tags, the job YAML, the dataset input) takes a few seconds
    against a SQL store; :func:`run_training` writes it in a thread while the cluster starts the training.
    """
    check_store(tracking_uri)
    mc = client(tracking_uri)
    all_tags = {"raylsm.model": job.preset, "raylsm.dataset": manifest.name, "raylsm.lifelong": job.model.lifelong,
                "raylsm.dataset_digest": manifest_digest(manifest), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags = _context_tags(all_tags)
    run = mc.create_run(experiment_id(tracking_uri, job.mlflow.experiment), tags=all_tags, run_name=run_name or None)
    run_id = run.info.run_id
    return run_id, functools.partial(record_run, tracking_uri, run_id, job, manifest, all_tags)


def record_run(tracking_uri: str, run_id: str, job, manifest, all_tags: dict[str, str]) -> None:
    """The run's used params, ``raylsm.*`` tags, job YAML and dataset input (see :func:`start_run`)."""
    import yaml
    from mlflow.entities import DatasetInput, InputTag, Param, RunTag

    mc = client(tracking_uri)
    log_params(mc, run_id, [Param(k, str(v)[:6000]) for k, v in flatten(used_config(job)).items()])
    mc.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items() if k.startswith("raylsm.")])
    mc.log_text(run_id, yaml.safe_dump(_redacted(job), sort_keys=False), "job.yaml")
    dataset = DatasetInput(_dataset_input(job, manifest)._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
    for attempt in range(3):
        try:
            mc.log_inputs(run_id, datasets=[dataset])
            break
        except Exception as e:  # concurrent trials insert the same dataset row: the retry finds it
            if attempt == 2:
                print(f"raylsm: dataset input not logged ({str(e).splitlines()[0][:160]})", file=sys.stderr)
            time.sleep(0.5 * (attempt + 1))


class RecordWriter:
    """Runs the record function of :func:`start_run` in a thread; :meth:`join` waits and re-raises its error."""

    def __init__(self, record: Callable[[], None]):
        import threading

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(record,), name="raylsm-mlflow-record", daemon=True)
        self.thread.start()

    def _run(self, record: Callable[[], None]) -> None:
        try:
            record()
        except BaseException as e:  # handed to join()
            self.error = e

    def join(self, timeout: float = 300.0) -> None:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error


def _git_commit() -> str | None:
    """The commit of the checkout the raylsm package runs from, if it is one."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def start_system_metrics(tracking_uri: str, run_id: str, interval: float = 10.0):
    """Sample CPU/memory/GPU of this process's node into the run (rank 0's node); return the monitor or None."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        client(tracking_uri)  # no URL printed for a credentialed store
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                       tracking_uri=real_uri(tracking_uri))
        monitor.start()
        return monitor
    except Exception as e:  # psutil missing or the store refused: training goes on, the user is told once
        reason = scrub(str(e).splitlines()[0][:120] if str(e) else "", real_uri(tracking_uri))
        print(f"raylsm: system metrics not logged ({type(e).__name__}: {reason})", file=sys.stderr)
        return None


def log_epoch_metrics(tracking_uri: str, run_id: str, metrics: dict[str, Any], step: int, timestamp_ms: int | None = None) -> None:
    """Log the numeric metrics of one epoch at ``step``, stamped ``timestamp_ms`` (default now); raises if the store refuses."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)  # NaN is logged as NaN, never dropped
    ]
    try:
        client(tracking_uri).log_batch(run_id, metrics=batch)
    except Exception as e:  # the store's message may quote the URI: re-raised without its secret
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrackingError(scrub(first, real_uri(tracking_uri))) from None


def finish_run(tracking_uri: str, run_id: str, metrics: dict[str, Any], tags: dict[str, str]) -> None:
    """Log the headline metrics (of the kept checkpoint) and the tags that link the run to Ray's outputs."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    client(tracking_uri).log_batch(run_id, metrics=batch, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def start_parent_run(tracking_uri: str, job, manifest, name: str, settings: dict, space: dict, space_file: Path) -> str:
    """The parent run of a tuning search: settings as params, the space file and its parsed form as artifacts."""
    from mlflow.entities import Param, RunTag

    mc = client(tracking_uri)
    tags = {"raylsm.search": name, "raylsm.kind": "search", "raylsm.dataset": manifest.name,
            "raylsm.dataset_digest": manifest_digest(manifest), "raylsm.model": job.preset}
    tags = _context_tags(tags)
    run = mc.create_run(experiment_id(tracking_uri, job.mlflow.experiment), tags=tags, run_name=name)
    run_id = run.info.run_id
    params = [Param(f"search.{k}", str(v)[:6000]) for k, v in settings.items()]
    params += [Param(f"space.{k}", json.dumps(v)[:6000]) for k, v in space.items()]
    log_params(mc, run_id, params)
    mc.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items() if k.startswith("raylsm.")])
    mc.log_artifact(run_id, str(space_file))
    mc.log_dict(run_id, space, "space.json")
    return run_id


def finish_parent_run(tracking_uri: str, run_id: str, summary: dict, table: list[dict]) -> None:
    """The best trial's config (params ``best.<key>``) and metrics, trial counts, and the trials table."""
    import csv
    import io

    from mlflow.entities import Metric, Param

    mc = client(tracking_uri)
    now = int(time.time() * 1000)
    best = summary.get("best") or {}
    existing = mc.get_run(run_id).data.params
    params = [Param(f"best.{k}", str(v)[:6000]) for k, v in (best.get("config") or {}).items()
              if f"best.{k}" not in existing]  # a resumed search keeps the params it logged first
    metrics = [Metric(f"best_{k}", float(v), now, 0) for k, v in best.items()
               if k in ("auc", "gauc", "logloss", "val_auc") and isinstance(v, (int, float))]
    metrics += [Metric(f"trials_{k}", float(v), now, 0) for k, v in summary.get("counts", {}).items()]
    mc.log_batch(run_id, metrics=metrics, params=params)
    if best.get("mlflow_run_id"):
        mc.set_tag(run_id, "raylsm.best_run_id", best["mlflow_run_id"])
    mc.log_dict(run_id, summary, "best.json")
    if table:
        buf = io.StringIO()
        keys = sorted({k for row in table for k in row}, key=lambda k: (k.startswith("param."), k))
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
        mc.log_text(run_id, buf.getvalue(), "trials.csv")


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close the run as FINISHED / FAILED / KILLED."""
    client(tracking_uri).set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------- runs whose driver died

NOTE_TAG = "raylsm.note"
DRIVER_TAG = "raylsm.driver"  # host:pid of the process that opened the run


def driver_tag() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def driver_alive(tag: str) -> bool:
    """Whether the process a ``raylsm.driver`` tag names still runs (on another host: assumed gone)."""
    import socket

    host, _, pid = (tag or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that pid now: not the driver
        return False
    return True


def fail_stale_runs(tracking_uri: str, experiment: str, match: Callable[[Any], bool], note: str) -> list[str]:
    """Mark FAILED, with ``note`` in ``raylsm.note``, every RUNNING run of ``experiment`` that ``match`` selects
    and whose driver is gone (killed with SIGKILL, its host lost): nothing else would ever end it."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    failed = []
    for run in c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        if not match(run) or driver_alive(run.data.tags.get(DRIVER_TAG, "")):
            continue
        c.set_tag(run.info.run_id, NOTE_TAG, note)
        c.set_terminated(run.info.run_id, status="FAILED")
        failed.append(run.info.run_id)
    return failed

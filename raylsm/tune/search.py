"""``raylsm tune``: Ray Tune over real distributed trainings, every trial a child MLflow run.

The search (docs/design.md, the overview and "MLflow record"):

1. **Before Ray**: the space file is loaded and checked (:mod:`raylsm.tune.space`), the dataset
   validated once, the storage, GPUs and tracking store checked.
2. **Parent run**: the driver opens one MLflow run per search: the space file as an artifact,
   the searcher/scheduler settings as params. A resumed search reopens the same parent run.
3. **Trials**: the Tune trainable :func:`tune_trial` builds and fits the same ``TorchTrainer``
   that ``raylsm train`` uses (Ray Data, checkpoints, the MLflow record) with the trial's
   config; its MLflow run is a child of the parent (``mlflow.parentRunId``). Ray's
   ``TuneReportCallback`` hands each epoch's metrics to Tune, so ``ASHAScheduler`` stops weak
   trials after ``grace_period`` epochs. The inner Ray Train run is named after the trial id,
   so a trial restarted by ``--resume`` continues from its last checkpoint.
4. **Searcher**: ``OptunaSearch`` (TPE, seeded) under a concurrency limit, or Tune's basic
   variant generator for ``random`` and ``grid``.
5. **Reconcile**: when the search ends, stops or fails, every child run still RUNNING (a trial
   ASHA stopped kills its trainer, so the run cannot end itself) is ended KILLED and tagged
   ``raylsm.trial_status=stopped_by_scheduler``; finished ones are tagged ``completed``, failed
   ones ``failed``. The parent gets the best trial's config and metrics and a trials table.

Resources: each trial reserves ``TRIAL_CPU`` for its driver and ``train.cpus_per_worker`` for each
worker (``train.gpus_per_worker`` with ``--gpu``), and leaves ``data.task_cpus`` free for its Ray Data
read tasks, which run outside any placement group; ``concurrency`` trials together must fit the cluster, or the search is refused
before it starts (without an explicit ``train.cpus_per_worker`` the worker CPU is sized to fit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from raylsm.config import ConfigError
from raylsm.storage import absolute, check_trusted_dir, make_private_dir
from raylsm.train.config import default_tracking_uri
from raylsm.tune.record import children, fail_stale_search, read_state, reconcile_children, trials_table, tune_status
from raylsm.tune.request import SearchRequest, flags_of, kept_options, resumed  # noqa: F401 (SearchRequest: public API)
from raylsm.tune.space import EPOCH_METRICS, Space, describe, load_space, trial_job

# A trial is a Tune actor that only waits on its TorchTrainer (whose controller takes 0 CPU): it
# reserves TRIAL_CPU. Ray Data's read tasks run outside every placement group, so each concurrent
# trial must also leave ``data.task_cpus`` of the cluster free for them, or its reads never start.
TRIAL_CPU = 0.1
STATE_FILE = "raylsm-search.json"


def _explicit(space: Space, overrides: list[str], key: str) -> bool:
    return key in space.file.fixed or key in space.dists or any(o.split("=", 1)[0].strip() == key for o in overrides)


def fit_resources(space: Space, req: SearchRequest, job, concurrency: int, total_cpus: float) -> list[str]:
    """Extra ``--set`` overrides that size the worker CPU so ``concurrency`` trials fit; or a one-line error."""
    workers, trial_cpu = job.train.workers, TRIAL_CPU + job.data.task_cpus
    per_trial = trial_cpu + workers * job.train.cpus_per_worker
    if concurrency * per_trial <= total_cpus + 1e-9:
        return []
    if not _explicit(space, req.overrides, "train.cpus_per_worker"):
        cpw = math.floor((total_cpus / concurrency - trial_cpu) / workers * 20) / 20  # multiples of 0.05
        if cpw >= 0.25:
            print(f"raylsm tune: train.cpus_per_worker={cpw:g} so that {concurrency} concurrent trials x ({trial_cpu:g} "
                  f"+ {workers} workers) fit {total_cpus:g} CPUs", file=sys.stderr)
            return [f"train.cpus_per_worker={cpw}"]
    raise ConfigError(
        f"--concurrency {concurrency}: {concurrency} trials x ({TRIAL_CPU} + data.task_cpus {job.data.task_cpus:g} + {workers} workers x "
        f"{job.train.cpus_per_worker:g} CPU) do not fit the cluster's {total_cpus:g} CPUs; lower --concurrency, "
        "--workers-per-trial, train.cpus_per_worker or data.task_cpus"
    )


# ----------------------------------------------------------------------------- the trainable


def tune_trial(config: dict, *, space: Space, overrides: list[str], flags: dict,
               parent_run_id: str, search_name: str, trials_storage: str, secret: dict[str, str] | None = None) -> None:
    """One trial: the sampled config -> a full ``run_training`` whose epochs Tune sees.

    ``space`` is the driver's loaded and checked space (handed over by ``tune.with_parameters``), and
    ``config`` holds the sampled values as Tune drew them: nothing is re-read or re-parsed here. ``secret``
    (:func:`raylsm.train.uri.secret_env`) carries a credentialed tracking URI in memory, as a parameter of the
    trainable (Ray's object store), never in a runtime env, whose variables Ray's agent writes to its log.
    """
    os.environ.update(secret or {})  # for real_uri in this trial's process; run_training hands it to its workers
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylsm.train.run import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    job = trial_job(space, config, overrides, {**flags, "storage": trials_storage, "name": f"trial-{trial_id}"})
    job.mlflow.run_name = f"{search_name}/{trial_id}"
    done = finished_trial_epochs(job.mlflow.tracking_uri or default_tracking_uri(), parent_run_id, trial_id)
    if done:
        # This trial's training already finished and is recorded, but the search was interrupted before
        # Tune noted the trial as ended: hand Tune the recorded epochs again instead of training twice.
        for metrics in done:
            ray.tune.report(metrics)
        return
    run_training(job, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()], validated=True,
                 extra_tags={"raylsm.trial_id": trial_id, "raylsm.search": search_name,
                             "raylsm.trial_config": json.dumps(config, sort_keys=True)})


def finished_trial_epochs(tracking_uri: str, parent_run_id: str, trial_id: str) -> list[dict[str, float]]:
    """The per-epoch metrics, in epoch order, of ``trial_id``'s child run when it already FINISHED; else []."""
    from raylsm.train.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = [r for r in children(client, experiment, parent_run_id)
            if r.data.tags.get("raylsm.trial_id") == trial_id and r.info.status == "FINISHED"]
    if not runs:
        return []
    by_epoch: dict[int, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        if key in runs[0].data.metrics:
            for m in client.get_metric_history(runs[0].info.run_id, key):
                by_epoch.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]


# ----------------------------------------------------------------------------- progress


def _progress_callback(metric: str, mode: str, total: int):
    from ray.tune import Callback

    class Progress(Callback):
        """One stderr line per trial event: finished/running counts and the best value so far."""

        def __init__(self) -> None:
            self.best: tuple[float, str] | None = None
            self.done = 0

        def _line(self, trials, what: str) -> None:
            running = sum(t.status == "RUNNING" for t in trials)
            best = f"best {metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else f"best {metric} -"
            print(f"[tune] {self.done}/{total} done, {running} running | {what} | {best}", file=sys.stderr, flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            if isinstance(value, (int, float)) and value == value:
                if self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0]):
                    self.best = (float(value), trial.trial_id)
            self._line(trials, f"{trial.trial_id} epoch {result.get('epoch')} {metric}={value}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            self._line(trials, f"{trial.trial_id} ended")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            self._line(trials, f"{trial.trial_id} failed")

    return Progress()


# ----------------------------------------------------------------------------- the search


def _search_dir(storage: Path, space: Space, name: str | None, resume: bool) -> tuple[str, Path]:
    if name:
        return name, storage / name
    if resume:
        candidates = sorted((p for p in storage.glob(f"{space.path.stem}-*") if (p / STATE_FILE).is_file()),
                            key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"--resume: no search of {space.path.name} under {storage} to resume (give --name)")
        return candidates[-1].name, candidates[-1]
    name = f"{space.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name, storage / name


def run_search(req: SearchRequest) -> dict:
    """Run (or resume) a search; return the JSON-able summary printed as the last stdout line."""
    from raylsm.train.run import check_run_name

    check_run_name(req.name or "")
    if req.resume:
        name, state = _state_of(req)
        req = resumed(dataclasses.replace(req, name=name), state.get("request"))
    return _start(req)


def _state_of(req: SearchRequest) -> tuple[str, dict]:
    """The name and record of the search ``--resume`` continues (its directory checked as trusted first)."""
    from raylsm.train.run import check_storage

    space = load_space(req.space, req.searcher, req.overrides)
    probe = trial_job(space, {k: d.values[0] for k, d in space.dists.items()}, req.overrides, flags_of(req))
    name, search_dir = _search_dir(check_storage(probe.storage), space, req.name, True)
    state_path = search_dir / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(f"--resume: {search_dir} holds no search to resume")
    check_trusted_dir(search_dir, "--resume")  # Tuner.restore unpickles it (docs/security.md)
    return name, read_state(state_path)


def _start(req: SearchRequest) -> dict:
    from raylsm.train.cluster import ensure_ray
    from raylsm.train.run import check_storage, preflight, stop_signals_interrupt
    from raylsm.train.tracking import redact_uri

    space = load_space(req.space, req.searcher, req.overrides)  # before any Ray work
    f = space.file
    searcher = req.searcher or f.searcher.kind
    trials = req.trials or f.trials
    concurrency = req.concurrency or f.concurrency
    if trials < 1 or concurrency < 1:
        raise ConfigError(f"--trials/--concurrency: must be >= 1, got {trials}/{concurrency}")
    flags = flags_of(req)
    probe = trial_job(space, {k: d.values[0] for k, d in space.dists.items()}, req.overrides, flags)
    storage = check_storage(probe.storage)
    name, search_dir = _search_dir(storage, space, req.name, req.resume)
    state_path = search_dir / STATE_FILE
    if req.resume and not state_path.is_file():
        raise ConfigError(f"--resume: {search_dir} holds no search to resume")
    if req.resume:
        check_trusted_dir(search_dir, "--resume")  # Tuner.restore unpickles it (docs/security.md)
        read_state(state_path)  # checked before Ray starts
    if not req.resume and state_path.is_file():
        raise ConfigError(f"--name {name}: a search of that name exists under {storage}; add --resume or pick another name")
    manifest, _, tracking_uri = preflight(probe)
    # Trials run in working directories of Ray Tune's choosing: each gets the store resolved here (the default
    # one is relative to this directory) and an absolute data path. The URI is the redacted one (it is in every
    # trial's job); the credentialed one reaches their processes through the environment.
    pinned = [("mlflow.tracking_uri", redact_uri(tracking_uri)), ("data.path", absolute(probe.data.path))]
    probe = trial_job(space, {k: d.values[0] for k, d in space.dists.items()}, [*req.overrides, *pinned], flags)

    # Progress is the per-epoch [tune] lines; Ray's chatter and Ray Data bars stay off. The credentialed URI
    # reaches the trials as a parameter of their trainable (_fit), not through the cluster's environment.
    ensure_ray(quiet=True)
    with stop_signals_interrupt():
        return _search(req, space, searcher, trials, concurrency, flags, probe, storage, name, search_dir, state_path,
                       manifest, tracking_uri, pinned)


def _search(req: SearchRequest, space: Space, searcher: str, trials: int, concurrency: int, flags: dict, probe,
            storage: Path, name: str, search_dir: Path, state_path: Path, manifest, tracking_uri: str,
            pinned: list[tuple[str, str]]) -> dict:
    """:func:`run_search` once Ray is up: the parent run opened (or reopened), the trials fitted, the record closed."""
    import ray

    f = space.file

    overrides = [*req.overrides, *pinned]
    overrides += fit_resources(space, req, probe, concurrency, ray.cluster_resources().get("CPU", 0.0))
    probe = trial_job(space, {k: d.values[0] for k, d in space.dists.items()}, overrides, flags)
    from raylsm.train.run import check_cluster_gpus

    check_cluster_gpus(probe)

    from raylsm.train.tracking import (DRIVER_TAG, client as mlflow_client, driver_tag, experiment_id, redact_uri,
                                       secret_env, start_parent_run)

    client = mlflow_client(tracking_uri)
    exp_id = experiment_id(tracking_uri, probe.mlflow.experiment)
    settings = space.settings(searcher, trials, concurrency)
    if req.resume:
        parent_run_id = read_state(state_path)["parent_run_id"]
        fail_stale_search(tracking_uri, probe.mlflow.experiment, parent_run_id, name)
        client.update_run(parent_run_id, status="RUNNING")
        client.set_tag(parent_run_id, DRIVER_TAG, driver_tag())
        print(f"raylsm tune: resuming {name} (MLflow parent run {parent_run_id})", file=sys.stderr)
    else:
        parent_run_id = start_parent_run(tracking_uri, probe, manifest, name, settings, describe(space), space.path)
        client.set_tag(parent_run_id, DRIVER_TAG, driver_tag())
        make_private_dir(search_dir)
        state_path.write_text(json.dumps({"parent_run_id": parent_run_id, "space": str(space.path.resolve()),
                                          "settings": settings,
                                          "request": {**kept_options(req), "tracking_uri": redact_uri(tracking_uri)}}, indent=2))
    results, outcome = None, "FAILED"
    try:
        results = _fit(space, req, searcher, trials, concurrency, overrides, flags, parent_run_id, name, storage,
                       search_dir, probe.train.epochs, probe.data.task_cpus, secret_env(tracking_uri))
        statuses = tune_status(search_dir)
        complete = len(statuses) >= _expected(space, searcher, trials) and all(
            s in ("TERMINATED", "ERROR") for s in statuses.values())
        outcome = "FINISHED" if complete else "KILLED"  # Tune returns early on Ctrl-C, keeping its state
    except KeyboardInterrupt:
        outcome = "KILLED"
        raise
    finally:
        tags = reconcile_children(tracking_uri, exp_id, parent_run_id, tune_status(search_dir))
        if outcome != "FINISHED":
            client.set_terminated(parent_run_id, status=outcome)
            print(f"raylsm tune: search {name} {'interrupted' if outcome == 'KILLED' else 'failed'}; continue it with "
                  f"--resume --name {name} --storage {storage}", file=sys.stderr)
    if outcome != "FINISHED":
        raise KeyboardInterrupt
    try:
        summary = _summarise(client, exp_id, parent_run_id, space, results, tags)
        from raylsm.train.tracking import finish_parent_run

        finish_parent_run(tracking_uri, parent_run_id, summary,
                          trials_table(client, children(client, exp_id, parent_run_id), f.metric))
    finally:
        client.set_terminated(parent_run_id, status="FINISHED")
    summary.update(parent_run_id=parent_run_id, storage=str(search_dir), name=name, tracking_uri=_redact(tracking_uri))
    return summary


def _redact(uri: str) -> str:
    from raylsm.train.tracking import redact_uri

    return redact_uri(uri)


def _fit(space: Space, req: SearchRequest, searcher: str, trials: int, concurrency: int, overrides: list[str],
         flags: dict, parent_run_id: str, name: str, storage: Path, search_dir: Path, epochs: int, data_cpu: float,
         secret: dict[str, str]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    f = space.file
    trainable = tune.with_parameters(
        tune_trial, space=space, overrides=overrides, flags=flags,
        parent_run_id=parent_run_id, search_name=name, trials_storage=str(search_dir / "trials"), secret=secret,
    )
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_CPU})
    if req.resume:
        tuner = tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        with contextlib.redirect_stdout(sys.stderr):  # Tune's own report lines: stdout is for the JSON result
            return tuner.fit()
    if f.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(epochs, 1),
                                  grace_period=min(f.scheduler.grace_period, max(epochs, 1)),
                                  reduction_factor=f.scheduler.reduction_factor,
                                  stop_last_trials=False)  # a trial that reaches the last epoch ends itself (and its run)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if searcher == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        search_alg = ConcurrencyLimiter(
            OptunaSearch(sampler=optuna.samplers.TPESampler(seed=f.searcher.seed), seed=f.searcher.seed),
            max_concurrent=concurrency,
        )
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=f.searcher.seed, max_concurrent=concurrency)
    tuner = tune.Tuner(
        trainable,
        param_space=space.param_space(searcher),
        tune_config=tune.TuneConfig(metric=f.metric, mode=f.mode, num_samples=trials, scheduler=scheduler,
                                    search_alg=search_alg,
                                    max_concurrent_trials=None if searcher == "optuna" else concurrency),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  callbacks=[_progress_callback(f.metric, f.mode, _expected(space, searcher, trials))]),
    )
    with contextlib.redirect_stdout(sys.stderr):  # Tune's own report lines: stdout is for the JSON result
        return tuner.fit()


def _expected(space: Space, searcher: str, trials: int) -> int:
    return trials * space.grid_size() if searcher == "grid" else trials


def _summarise(client, exp_id: str, parent_run_id: str, space: Space, results, tags: dict[str, str]) -> dict:
    """Best trial (by the space's metric over every epoch), its config and headline metrics, and counts."""
    f = space.file
    runs = children(client, exp_id, parent_run_id)
    best_run, best_value = None, None
    for run in runs:
        values = [m.value for m in client.get_metric_history(run.info.run_id, f.metric) if m.value == m.value]
        if not values:
            continue
        value = max(values) if f.mode == "max" else min(values)
        if best_value is None or (value > best_value if f.mode == "max" else value < best_value):
            best_run, best_value = run, value
    counts = {"finished": 0, "stopped": 0, "failed": 0, "interrupted": 0}
    for tag in tags.values():
        key = {"completed": "finished", "stopped_by_scheduler": "stopped", "failed": "failed"}.get(tag, "interrupted")
        counts[key] += 1
    trial_ids = {r.data.tags.get("raylsm.trial_id") for r in runs}
    counts["trials"] = len(trial_ids)
    errors = sum(1 for r in results if r.error is not None)
    counts["errored_in_tune"] = errors
    if best_run is None:
        return {"best": None, "counts": counts, "metric": f.metric, "mode": f.mode}
    config = json.loads(best_run.data.tags.get("raylsm.trial_config", "{}"))
    best = {"config": config, f"best_{f.metric}": best_value, "trial_id": best_run.data.tags.get("raylsm.trial_id"),
            "mlflow_run_id": best_run.info.run_id, "status": tags.get(best_run.info.run_id, best_run.info.status)}
    for k in ("auc", "gauc", "logloss", "best_epoch"):
        best[k] = best_run.data.metrics.get(k)
    best["val_auc"] = best_run.data.metrics.get("best_val_auc")  # the kept checkpoint's validation AUC
    return {"best": best, "counts": counts, "metric": f.metric, "mode": f.mode}

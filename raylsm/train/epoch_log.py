"""Rank 0's side of the MLflow record: per-epoch metrics into the driver-created run, kept through store
outages (:class:`EpochLogger`), and the system-metrics monitor; see ``docs/design.md``, "MLflow record"."""

from __future__ import annotations

import json
import os
import sys
import time

from raylsm.train.checkpoint import META_FILE
from raylsm.train.tracking import client, log_epoch_metrics, redact_uri, start_system_metrics


class EpochLogger:
    """Per-epoch metrics into the driver-created MLflow run (docs/design.md, "MLflow record": rank 0 only), never stopping training.

    An epoch whose metrics the store does not take (unreachable, read-only, ...) is kept, with the time it
    was measured, and the outage is reported in one line on stderr; each later epoch first logs what is
    kept, so the record is whole again once the store is back. :meth:`finish` tries a few more times and
    names, in one line, the epochs that could not be logged (their metrics stay in the checkpoints' job.json).
    """

    def __init__(self, tracking_uri: str, run_id: str, finish_attempts: int = 3, finish_wait_s: float = 2.0):
        self.uri, self.run_id = tracking_uri, run_id
        self.shown_uri = redact_uri(tracking_uri)
        self.finish_attempts, self.finish_wait_s = finish_attempts, finish_wait_s
        self.pending: list[tuple[int, dict, int]] = []  # (epoch, metrics, measured at ms)
        self.failing: str | None = None  # the first line of the current outage's error
        # One try per epoch against an HTTP store, 30 s at most: MLflow's default retries would hold up training for
        # minutes; what the store does not take is kept and logged at a later epoch or at the end.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    def __call__(self, metrics: dict, epoch: int) -> None:
        self.pending.append((epoch, dict(metrics), int(time.time() * 1000)))
        self._flush()

    def _flush(self) -> bool:
        while self.pending:
            epoch, metrics, at_ms = self.pending[0]
            try:
                log_epoch_metrics(self.uri, self.run_id, metrics, epoch, timestamp_ms=at_ms)
            except Exception as e:  # any store failure: keep the metrics, keep training
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                if self.failing is None:
                    print(f"raylsm: MLflow store {self.shown_uri} unreachable ({reason}); metrics of epoch(s) "
                          f"{self.epochs()} kept to log when it is back", file=sys.stderr, flush=True)
                self.failing = reason
                return False
            self.pending.pop(0)
        if self.failing is not None:
            print(f"raylsm: MLflow store {self.shown_uri} reachable again; kept metrics logged", file=sys.stderr, flush=True)
            self.failing = None
        return True

    def log_if_missing(self, checkpoint_dir: str) -> bool:
        """Log a checkpoint's epoch metrics when this run wrote it but the store lacks that epoch; True if logged."""
        path = os.path.join(checkpoint_dir, META_FILE)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            meta = json.load(f)
        if meta.get("mlflow_run_id") != self.run_id or not meta.get("metrics"):
            return False
        try:
            logged = {m.step for m in client(self.uri).get_metric_history(self.run_id, "train_loss")}
        except Exception:  # store unreachable: the epoch goes to the pending list below and is retried
            logged = set()
        epoch = int(meta["epoch"])
        if epoch in logged:
            return False
        self(meta["metrics"], epoch)
        return True

    def epochs(self) -> list[int]:
        return [epoch for epoch, _, _ in self.pending]

    def finish(self) -> list[int]:
        """Last attempts at what is kept; returns (and names in one line) the epochs still not logged."""
        for attempt in range(self.finish_attempts):
            if self._flush():
                return []
            if attempt + 1 < self.finish_attempts:
                time.sleep(self.finish_wait_s)
        print(f"raylsm: metrics of epoch(s) {self.epochs()} could not be logged to MLflow run {self.run_id} at "
              f"{self.shown_uri} ({self.failing}); they are in the checkpoints' job.json", file=sys.stderr, flush=True)
        return self.epochs()


def rank_zero_logger(config: dict) -> EpochLogger | None:
    """Per-epoch metrics into the driver-created MLflow run (docs/design.md, "MLflow record": rank 0 only); None when not tracked."""
    run_id = config.get("mlflow_run_id")
    if not run_id:
        return None
    return EpochLogger(config["tracking_uri"], run_id)


def system_metrics(config: dict):
    """CPU/memory/GPU of rank 0's node into the run (MLflow's system metrics monitor)."""
    if not config.get("mlflow_run_id"):
        return None
    return start_system_metrics(config["tracking_uri"], config["mlflow_run_id"])

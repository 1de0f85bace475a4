"""What ``raylsm tune`` was asked for, and what a search keeps of it so that ``--resume`` continues it as it began."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raylsm.config import ConfigError
from raylsm.storage import absolute
from raylsm.train.config import job_flags
from raylsm.train.uri import redact_uri


@dataclass
class SearchRequest:
    """What ``raylsm tune`` was asked for (CLI flags; None = the space file's value)."""

    space: str
    data: str | None = None
    trials: int | None = None
    concurrency: int | None = None
    workers_per_trial: int | None = None
    gpu: bool = False
    searcher: str | None = None
    overrides: list[str] = field(default_factory=list)
    experiment: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    name: str | None = None
    resume: bool = False


def flags_of(req: SearchRequest) -> dict[str, Any]:
    return job_flags(data=req.data, workers=req.workers_per_trial, gpu=req.gpu, experiment=req.experiment,
                     tracking_uri=req.tracking_uri, storage=req.storage)


# What a search's trials are built from: kept in its record, so that --resume trains the trials it has left
# exactly as it started them (the flags and --set of the first command, not those of the resuming one). Ray Tune
# restores its own trial count and concurrency from the search directory; the search's record must agree.
KEPT = ("data", "trials", "concurrency", "workers_per_trial", "gpu", "searcher", "overrides", "experiment", "tracking_uri")


def kept_options(req: SearchRequest) -> dict[str, Any]:
    """The options of :data:`KEPT` as a search's record holds them (JSON; the data path absolute, the URI redacted)."""
    kept = {k: getattr(req, k) for k in KEPT}
    kept["data"] = absolute(req.data) if req.data else None
    kept["tracking_uri"] = redact_uri(req.tracking_uri) if req.tracking_uri else None
    kept["overrides"] = list(req.overrides)
    return kept


def resumed(req: SearchRequest, kept: dict[str, Any] | None) -> SearchRequest:
    """``req`` with the options the search started with; an option given again must be the same (one-line error)."""
    if kept is None:  # a search recorded before its options were: the resuming command's own
        return req
    given = kept_options(req)
    for key in KEPT:
        unset = given[key] in (None, False, [])
        if not unset and given[key] != kept.get(key):
            flag = "--set" if key == "overrides" else f"--{key.replace('_', '-')}"
            raise ConfigError(f"--resume: {flag} {given[key]!r} is not what the search started with ({kept.get(key)!r}); "
                              "a resumed search keeps its own options (leave it out, or start a new search)")
    uri = req.tracking_uri or kept.get("tracking_uri")  # the credentialed one when given again
    same = {k: kept.get(k) for k in KEPT if k not in ("tracking_uri", "overrides", "gpu")}
    return dataclasses.replace(req, **same, tracking_uri=uri, overrides=list(kept.get("overrides") or []),
                               gpu=bool(kept.get("gpu")))

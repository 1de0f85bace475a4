"""Search-space files (``tune_spaces/*.yaml``): what a search varies, how it searches, what it optimises.

A space file::

    base: lcn                      # a model preset, or a job YAML (path relative to the repo or the file)
    metric: val_auc                # a per-epoch metric of the training (validation, never test)
    mode: max
    trials: 16                     # samples (grid: repeats of the whole grid)
    concurrency: 2
    searcher: {kind: optuna, seed: 0}                             # optuna (TPE) | random | grid
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}  # asha | fifo; max_t = train.epochs
    fixed:                         # config keys every trial shares (as --set)
      train.epochs: 3
    params:                        # config keys the search varies, one distribution each
      model.crp.weight: {loguniform: [0.01, 5]}
      model.crp.tau: {uniform: [0.05, 0.5]}
      model.crp.m: {int: [64, 4096], log: true}
      model.lap.k1: {choice: [100, 200, 400]}
      model.lifelong: {grid: [sim_soft, lap]}
      context: {choice: [tcn, gru]}          # a bundle: each label sets several keys together
    bundles:
      context:
        tcn: {model.context.kind: tcn}
        gru: {model.context.kind: gru, model.msia.enabled: false, model.peg.enabled: false}

A param whose name is listed under ``bundles`` picks one of its labels, and the label's keys are
set together (for keys that only make sense together, such as a context kind and the MSIA/PEG
blocks that need a TCN).

:func:`load_space` checks the file before any Ray work: unknown keys, keys that are not
config keys, empty or inverted ranges, values the job config rejects (every choice, every
range end, and the all-low / all-high corners are resolved into a job config), and
distributions the chosen searcher cannot use. Each problem is one line naming the file and key.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raylsm.config import ConfigError, from_dict, load_yaml, to_dict
from raylsm.train.config import JobConfig, resolve_job

DIST_KINDS = ("uniform", "loguniform", "int", "choice", "grid")


@dataclass
class SearcherConfig:
    kind: Literal["optuna", "random", "grid"] = "optuna"
    seed: int = 0


@dataclass
class SchedulerConfig:
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2

    def validate(self) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"scheduler.grace_period: must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError(f"scheduler.reduction_factor: must be >= 2, got {self.reduction_factor}")


@dataclass
class Distribution:
    """One of the kinds with its values; ``log`` applies to ``int`` (log-uniform integers)."""

    kind: str
    raw: list
    log: bool = False

    @classmethod
    def parse(cls, spec: Any) -> "Distribution":
        if not isinstance(spec, dict):
            raise ConfigError(f"must be a mapping like {{uniform: [low, high]}}, got {spec!r}")
        unknown = sorted(set(spec) - set(DIST_KINDS) - {"log"})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown distribution (known: {', '.join(DIST_KINDS)}, log)")
        given = [k for k in DIST_KINDS if k in spec]
        if len(given) != 1:
            raise ConfigError(f"needs exactly one of {', '.join(DIST_KINDS)}, got {given or 'none'}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"log: must be true or false, got {log!r}")
        values = spec[given[0]]
        if not isinstance(values, list):
            raise ConfigError(f"{given[0]}: must be a list, got {values!r}")
        d = cls(given[0], values, log)
        d.validate()
        return d

    @property
    def values(self) -> list:
        return list(self.raw)

    def validate(self) -> None:
        kind, vals = self.kind, self.raw
        if kind in ("uniform", "loguniform", "int"):
            number = int if kind == "int" else (int, float)
            if len(vals) != 2 or not all(isinstance(v, number) and not isinstance(v, bool) for v in vals):
                raise ConfigError(f"{kind}: needs [low, high] ({'integers' if kind == 'int' else 'numbers'}), got {vals}")
            lo, hi = vals
            if not lo < hi:
                raise ConfigError(f"{kind}: low must be < high, got [{lo}, {hi}]")
            if (kind == "loguniform" or (kind == "int" and self.log)) and lo <= 0:
                raise ConfigError(f"{kind}: a log scale needs low > 0, got {lo}")
        elif not vals:
            raise ConfigError(f"{kind}: needs at least one value")
        if self.log and kind != "int":
            raise ConfigError(f"log: applies to int only (use loguniform for floats), got {kind}")

    def ends(self) -> list:
        """The values that bound this distribution (every value of a choice/grid)."""
        return self.values

    def to_tune(self, searcher: str):
        """The Ray Tune domain. Optuna and random sample a grid as a categorical choice."""
        from ray import tune

        kind, vals = self.kind, self.values
        if kind == "uniform":
            return tune.uniform(*vals)
        if kind == "loguniform":
            return tune.loguniform(*vals)
        if kind == "int":
            lo, hi = vals
            return tune.lograndint(lo, hi + 1) if self.log else tune.randint(lo, hi + 1)
        if searcher == "grid":
            return tune.grid_search(vals)
        return tune.choice(vals)


@dataclass
class SpaceFile:
    base: str = "lcn"
    metric: str = "val_auc"
    mode: Literal["max", "min"] = "max"
    trials: int = 8
    concurrency: int = 1
    searcher: SearcherConfig = field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    bundles: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials: must be >= 1, got {self.trials}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency: must be >= 1, got {self.concurrency}")


# Per-epoch metrics a training reports (raylsm.train.loop); the search optimises one of them.
EPOCH_METRICS = ("val_auc", "val_gauc", "val_logloss", "test_auc", "test_gauc", "test_logloss",
                 "train_loss", "crp_loss", "samples_per_s")


@dataclass
class Space:
    """A loaded, validated space file."""

    path: Path
    file: SpaceFile
    base_preset: str | None
    base_config: str | None
    dists: dict[str, Distribution]

    @property
    def text(self) -> str:
        return self.path.read_text()

    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.dists.values() if d.kind in ("grid", "choice")) or 1

    def param_space(self, searcher: str) -> dict:
        return {key: d.to_tune(searcher) for key, d in self.dists.items()}

    def settings(self, searcher: str, trials: int, concurrency: int) -> dict:
        f = self.file
        return {"space": str(self.path), "base": f.base, "metric": f.metric, "mode": f.mode, "searcher": searcher,
                "searcher_seed": f.searcher.seed, "scheduler": f.scheduler.kind,
                "grace_period": f.scheduler.grace_period, "reduction_factor": f.scheduler.reduction_factor,
                "trials": trials, "concurrency": concurrency}


def _resolve_base(base: str, path: Path) -> tuple[str | None, str | None]:
    from raylsm.models.config import PRESETS

    if base in PRESETS:
        return base, None
    for root in (path.parent, Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = (root / base).resolve()
        if candidate.is_file():
            return None, str(candidate)
    raise ConfigError(f"{path}: key 'base': {base!r} is neither a model preset ({', '.join(sorted(PRESETS))}) "
                      f"nor a job YAML found next to the file or in the working directory")


def expand(space: Space, params: dict[str, Any]) -> dict[str, Any]:
    """Sampled params as config keys: a bundle's label becomes the keys it sets."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k in space.file.bundles:
            out.update(space.file.bundles[k][v])
        else:
            out[k] = v
    return out


def trial_job(space: Space, params: dict[str, Any], overrides: list[str], flags: dict[str, Any] | None = None) -> JobConfig:
    """The job of one trial: base <- fixed <- --set overrides <- flags <- the trial's sampled params."""
    fixed = list(space.file.fixed.items())  # typed (key, value) pairs: no text round trip
    sampled = list(expand(space, params).items())
    return resolve_job(preset=space.base_preset, config_file=space.base_config,
                       overrides=[*fixed, *overrides, *sampled], flags=flags)


def load_space(path: str | Path, searcher: str | None = None, overrides: list[str] | None = None) -> Space:
    """Load and check a space file; every problem is a ConfigError naming the file and key."""
    p = Path(path)
    raw = load_yaml(p)
    try:
        f = from_dict(SpaceFile, raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: key {e}") from None
    preset, config = _resolve_base(f.base, p)
    kind = searcher or f.searcher.kind
    if f.metric not in EPOCH_METRICS:
        raise ConfigError(f"{p}: key 'metric': {f.metric!r} is not a per-epoch metric ({', '.join(EPOCH_METRICS)})")
    dists: dict[str, Distribution] = {}
    for key, spec in f.params.items():
        try:
            d = Distribution.parse(spec)
        except ConfigError as e:
            raise ConfigError(f"{p}: key 'params.{key}': {e}") from None
        if kind == "grid" and d.kind not in ("grid", "choice"):
            raise ConfigError(f"{p}: key 'params.{key}': a {d.kind} range cannot be enumerated by the grid searcher "
                              "(use grid/choice, or --searcher optuna|random)")
        dists[key] = d
    for bundle, labels in f.bundles.items():
        if bundle not in dists:
            raise ConfigError(f"{p}: key 'bundles.{bundle}': no param of that name picks one of its labels")
        if not isinstance(labels, dict) or not all(isinstance(v, dict) for v in labels.values()):
            raise ConfigError(f"{p}: key 'bundles.{bundle}': must map each label to a mapping of config keys")
        if dists[bundle].kind not in ("choice", "grid"):
            raise ConfigError(f"{p}: key 'params.{bundle}': a bundle is picked by choice or grid, not {dists[bundle].kind}")
        missing = [v for v in dists[bundle].values if v not in labels]
        if missing:
            raise ConfigError(f"{p}: key 'bundles.{bundle}': no label {missing[0]!r} (labels: {', '.join(map(str, labels))})")
    space = Space(p, f, preset, config, dists)
    base_flags = None
    # A bad --set is the user's flag, not a key of the space file. They are checked together (so
    # `--set model.lap.k1=8 --set model.lap.k2=4` is valid in either order); when they fail, the first
    # flag whose prefix of the list fails is named.
    overrides = list(overrides or [])
    try:
        resolve_job(preset=preset, config_file=config, overrides=overrides)
    except ConfigError:
        for i, override in enumerate(overrides):  # the whole list is its last prefix: one of them raises
            try:
                resolve_job(preset=preset, config_file=config, overrides=list(overrides[: i + 1]))
            except ConfigError as e:
                raise ConfigError(f"--set {override}: {e}") from None
    for key in f.fixed:
        _check_key(space, key, f.fixed[key], "fixed", overrides)
    for key, d in dists.items():
        if key in f.fixed:
            raise ConfigError(f"{p}: key 'params.{key}': also set under 'fixed'")
        for value in d.ends():
            _check_key(space, key, value, "params", overrides)
    # Cross-key constraints (e.g. model.lap.k2 <= k1): the all-low and all-high corners must resolve too.
    if dists:
        lows = {k: min(d.ends(), key=_order) for k, d in dists.items()}
        highs = {k: max(d.ends(), key=_order) for k, d in dists.items()}
        for corner, values in (("lowest", lows), ("highest", highs)):
            try:
                trial_job(space, values, overrides or [], base_flags)
            except ConfigError as e:
                raise ConfigError(f"{p}: the {corner} values of every param together are not a valid job: {e}") from None
    return space


def _order(v: Any):
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def _check_key(space: Space, key: str, value: Any, section: str, overrides: list[str] | None) -> None:
    try:
        trial_job(space, {key: value}, overrides or [])
    except ConfigError as e:
        raise ConfigError(f"{space.path}: key '{section}.{key}': {e}") from None


def grid_points(space: Space) -> list[dict]:
    """Every combination of the grid/choice params (for tests and for sizing a grid search)."""
    keys = [k for k, d in space.dists.items() if d.kind in ("grid", "choice")]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space.dists[k].values for k in keys))]


def describe(space: Space) -> dict:
    return {k: {d.kind: d.values, **({"log": True} if d.log else {})} for k, d in space.dists.items()}


__all__ = ["Space", "SpaceFile", "load_space", "trial_job", "grid_points", "describe", "to_dict"]

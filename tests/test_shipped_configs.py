"""Every shipped job YAML and tune space resolves to its preset's defaults except for data and budget keys.

A job file that sets a model reading, a learning rate or a CRP weight would train a different model than
``--model NAME``; a search space's ``fixed`` block would do the same to every trial. Both may set only
where the data is, how long and how wide to train, and where to track.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raylsm.config import flatten, to_dict
from raylsm.train.config import resolve_job

ROOT = Path(__file__).resolve().parents[1]
# Keys a shipped file may change: the data, the budget (epochs, batch, workers and their resources), tracking.
BUDGET_PREFIXES = ("data.", "mlflow.", "name", "storage", "resume_from")
BUDGET_KEYS = {
    "train.epochs", "train.batch_size", "train.eval_batch_size", "train.workers", "train.cpus_per_worker",
    "train.use_gpu", "train.gpus_per_worker", "train.max_steps_per_epoch", "train.keep_checkpoints",
    "train.max_failures", "train.seed",
}


def _budget(key: str) -> bool:
    return key in BUDGET_KEYS or key.startswith(BUDGET_PREFIXES)


def _differences(job, preset: str) -> dict:
    mine, default = flatten(to_dict(job)), flatten(to_dict(resolve_job(preset=preset)))
    return {k: (v, default.get(k)) for k, v in mine.items() if default.get(k) != v and not _budget(k)}


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_yaml_sets_data_and_budget_only(path):
    job = resolve_job(config_file=str(path))
    assert _differences(job, job.preset) == {}


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_tune_space_fixed_keys_are_data_and_budget_only(path):
    space = yaml.safe_load(path.read_text())
    assert [k for k in (space.get("fixed") or {}) if not _budget(k)] == []


def test_a_reading_in_a_job_file_is_caught(tmp_path):
    """The check itself: a job file that moves a reading differs from its preset."""
    bad = tmp_path / "lcn.yaml"
    bad.write_text("preset: lcn\nmodel:\n  crp: {tau: 0.1}\ntrain: {lr: 0.01, epochs: 3}\n")
    diff = _differences(resolve_job(config_file=str(bad)), "lcn")
    assert set(diff) == {"model.crp.tau", "train.lr"}

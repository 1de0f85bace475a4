"""Generic config checks (finite floats, non-negative counts, Literal values), tune's count flags, storage trust."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import types
import typing
from pathlib import Path

import pytest

from raylsm.cli import main
from raylsm.config import ConfigError, from_dict
from raylsm.models.config import ModelConfig
from raylsm.storage import check_trusted_dir, make_private_dir, untrusted_reason
from raylsm.train.config import JobConfig, resolve_job
from raylsm.tune.space import SpaceFile

SPACE = Path(__file__).resolve().parents[1] / "tune_spaces" / "lcn.yaml"


def _keys(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, typing.Any, dataclasses.Field]]:
    """Every leaf key of a config dataclass tree: (dotted key, type hint, field)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{key}.")
        else:
            yield key, hints[f.name], f


def _scalar(tp: typing.Any) -> typing.Any:
    """``int | None`` -> int; other hints unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


JOB_KEYS = list(_keys(JobConfig))
FLOAT_KEYS = [k for k, tp, _ in JOB_KEYS if _scalar(tp) is float]
COUNT_KEYS = [k for k, tp, f in JOB_KEYS if _scalar(tp) is int and not f.metadata.get("signed")]
SIGNED_KEYS = [k for k, tp, f in JOB_KEYS if _scalar(tp) is int and f.metadata.get("signed")]
INT_LIST_KEYS = [k for k, tp, _ in JOB_KEYS if typing.get_origin(tp) is list and typing.get_args(tp) == (int,)]
LITERAL_KEYS = [(k, typing.get_args(tp)) for k, tp, _ in JOB_KEYS if typing.get_origin(tp) is typing.Literal]


def _train(argv: list[str], tmp_path: Path, capsys) -> tuple[int, list[str]]:
    code = main(["train", "--model", "lcn", "--data", str(tmp_path / "data"), "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("override, message", [
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("model.crp.tau=.inf", "model.crp.tau: must be a finite number, got inf"),
    ("model.crp.weight=-.inf", "model.crp.weight: must be a finite number, got -inf"),
    ("train.cpus_per_worker=.nan", "train.cpus_per_worker: must be a finite number, got nan"),
    ("train.max_steps_per_epoch=-5", "train.max_steps_per_epoch: must be >= 0, got -5"),
    ("train.shuffle_buffer=-1", "train.shuffle_buffer: must be >= 0, got -1"),
    ("train.seed=-3", "train.seed: must be >= 0, got -3"),
    ("model.msia.later_cl=-2", "model.msia.later_cl: must be >= 0, got -2"),
    ("model.din.hidden=[80, -1]", "model.din.hidden[1]: must be >= 0, got -1"),
    ("model.lap.pooling=mean", "model.lap.pooling: must be one of ['softmax', 'sum', 'sum_scaled'], got 'mean'"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be in [0, 1/train.lr) (0 = none), got -0.1"),
    ("train.weight_decay=400", "train.weight_decay: must be in [0, 1/train.lr) (0 = none), got 400.0"),
    ("model.head_dropout=1.0", "model.head_dropout: must be in [0, 1) (0 = none), got 1.0"),
    ("model.match_counts_dropout=-0.5", "model.match_counts_dropout: must be in [0, 1) (0 = off), got -0.5"),
    ("model.features.item_dropout=1", "model.features.item_dropout: must be in [0, 1) (0 = off), got 1.0"),
])
def test_bad_values_are_one_line_errors(override: str, message: str, tmp_path: Path, capsys):
    code, lines = _train(["--set", override], tmp_path, capsys)
    assert code == 2 and lines == [f"raylsm: error: {message}"], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_bad_values_in_a_job_yaml_and_a_job_json(tmp_path: Path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("preset: din\ntrain: {lr: .nan}\n")
    code = main(["train", "--config", str(job), "--data", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.strip() == "raylsm: error: train.lr: must be a finite number, got nan"
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a finite number, got nan$"):
        from_dict(JobConfig, json.loads('{"train": {"lr": NaN}}'))  # a checkpoint's job.json
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a finite number"):
        from_dict(JobConfig, {"train": {"lr": 10**400}})  # beyond float range


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
def test_every_float_key_must_be_finite(key: str, value: str, shown: str):
    with pytest.raises(ConfigError) as e:
        resolve_job(preset="lcn", overrides=[f"{key}={value}"])
    assert str(e.value) == f"{key}: must be a finite number, got {shown}"


@pytest.mark.parametrize("key", COUNT_KEYS)
def test_every_count_key_must_be_non_negative(key: str):
    with pytest.raises(ConfigError) as e:
        resolve_job(preset="lcn", overrides=[f"{key}=-1"])
    assert str(e.value) == f"{key}: must be >= 0, got -1"


@pytest.mark.parametrize("key", INT_LIST_KEYS)
def test_every_int_list_item_must_be_non_negative(key: str):
    with pytest.raises(ConfigError) as e:
        resolve_job(preset="lcn", overrides=[f"{key}=[4, -1]"])
    assert str(e.value) == f"{key}[1]: must be >= 0, got -1"


@pytest.mark.parametrize("key, allowed", LITERAL_KEYS)
def test_every_literal_key_is_checked_where_configs_are_built(key: str, allowed: tuple):
    with pytest.raises(ConfigError) as e:
        resolve_job(preset="lcn", overrides=[f"{key}=bogus"])
    assert str(e.value) == f"{key}: must be one of {list(allowed)}, got 'bogus'"


def test_the_key_lists_cover_what_they_should():
    assert {"train.lr", "model.crp.tau", "train.cpus_per_worker", "data.val_fraction"} <= set(FLOAT_KEYS)
    assert {"train.max_steps_per_epoch", "train.shuffle_buffer", "train.seed", "model.msia.later_cl",
            "data.read_concurrency"} <= set(COUNT_KEYS)
    assert SIGNED_KEYS == ["train.max_failures"]  # -1 = retry forever
    assert {"model.lap.pooling", "model.context.init", "model.peg.filters", "model.features.emb_init"} <= {
        k for k, _ in LITERAL_KEYS}


def test_valid_values_still_pass():
    job = resolve_job(preset="cain", overrides=["train.max_failures=-1", "train.max_steps_per_epoch=0",
                                                "train.shuffle_buffer=0", "train.lr=0.01", "model.msia.later_cl=null",
                                                "model.crp.tau=0.001", "model.crp.weight=0"])
    assert job.train.max_failures == -1 and job.train.max_steps_per_epoch == 0 and job.train.shuffle_buffer == 0
    assert job.train.lr == 0.01 and job.model.msia.later_cl is None and job.model.crp.weight == 0.0
    with pytest.raises(ConfigError, match=r"train.max_failures: must be >= -1"):
        resolve_job(preset="din", overrides=["train.max_failures=-2"])
    assert from_dict(ModelConfig, {"lap": {"csa_temperature": 2}}, "model").lap.csa_temperature == 2.0


def test_space_file_numbers_get_the_same_checks():
    with pytest.raises(ConfigError, match=r"^searcher\.seed: must be >= 0, got -1$"):
        from_dict(SpaceFile, {"searcher": {"seed": -1}})
    with pytest.raises(ConfigError, match=r"^mode: must be one of \['max', 'min'\], got 'up'$"):
        from_dict(SpaceFile, {"mode": "up"})


# ----------------------------------------------------------------------------- tune's count flags


@pytest.mark.parametrize("flag, value", [("--trials", "0"), ("--concurrency", "0"), ("--trials", "-3"),
                                         ("--concurrency", "-1")])
def test_tune_counts_must_be_positive(flag: str, value: str, tmp_path: Path, capsys):
    code = main(["tune", "--space", str(SPACE), "--data", str(tmp_path), "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", flag, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"raylsm: error: {flag}: must be >= 1, got {value}"], lines
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- storage trust


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_storage_the_project_creates_is_owner_only(tmp_path: Path):
    from raylsm.train.run import check_storage

    made = check_storage(str(tmp_path / "a" / "b" / "runs"))
    assert made == (tmp_path / "a" / "b" / "runs").resolve()
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/runs")] == [0o700] * 3
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    make_private_dir(shared)  # an existing directory is left as it is
    assert _mode(shared) == 0o755
    make_private_dir(shared / "search")
    assert _mode(shared / "search") == 0o700


def test_untrusted_search_directories_are_refused(tmp_path: Path, monkeypatch):
    d = make_private_dir(tmp_path / "search")
    (d / "tuner.pkl").write_bytes(b"x")
    assert untrusted_reason(d) is None and check_trusted_dir(d, "--resume") == d
    os.chmod(d, 0o777)
    with pytest.raises(ConfigError, match=r"^--resume: refusing to load .*search is group- or world-writable \(mode 777\)"):
        check_trusted_dir(d, "--resume")
    os.chmod(d, 0o755)
    os.chmod(d / "tuner.pkl", 0o646)
    assert "tuner.pkl is writable by other users" in untrusted_reason(d)
    os.chmod(d, 0o700)  # no one else can reach the file
    assert untrusted_reason(d) is None
    monkeypatch.setattr("raylsm.storage.os.getuid", lambda: os.stat(d).st_uid + 1)
    assert "belongs to uid" in untrusted_reason(d) and "not to this user" in untrusted_reason(d)


def test_tune_resume_refuses_a_writable_search_directory(tmp_path: Path, capsys):
    storage = make_private_dir(tmp_path / "runs")
    search = make_private_dir(storage / "shared-search")
    from raylsm.tune.search import STATE_FILE

    (search / STATE_FILE).write_text("{}")
    os.chmod(search, 0o777)
    code = main(["tune", "--space", str(SPACE), "--data", str(tmp_path), "--resume", "--name", "shared-search",
                 "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"raylsm: error: --resume: refusing to load {search}: ") and "writable" in lines[0]
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("state", ["{}", "[1]", "{not json", '{"parent_run_id": "x; rm"}'])
def test_tune_resume_refuses_a_search_record_without_its_parent_run(tmp_path: Path, capsys, state):
    storage = make_private_dir(tmp_path / "runs")
    search = make_private_dir(storage / "s")
    from raylsm.tune.search import STATE_FILE

    (search / STATE_FILE).write_text(state)
    code = main(["tune", "--space", str(SPACE), "--data", str(tmp_path), "--resume", "--name", "s",
                 "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"raylsm: error: --resume: {search / STATE_FILE}: "), lines[0]
    assert not (tmp_path / "m.db").exists()


def test_eval_batch_size_must_be_positive(capsys):
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--checkpoint", "c", "--data", "d", "--batch-size", bad])
        assert e.value.code == 2
        assert "argument --batch-size: expected an integer >= 1" in capsys.readouterr().err

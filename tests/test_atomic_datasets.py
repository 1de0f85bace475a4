"""Datasets are written atomically: a failed, interrupted or refused write leaves ``--out`` exactly as it was.

Every test builds its own small dataset in ``tmp_path`` and harms only what it created. The
"previous dataset" is compared by a digest of every file under it (paths and bytes) and must
still pass ``raylsm data check``; no staging directory may be left beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylsm.cli import main
from raylsm.data import atomic, synth, taobao
from raylsm.data.check import iter_problems
from raylsm.data.contract import FORMAT, Manifest
from raylsm.data.synth import generate
from raylsm.data.taobao import TaobaoOptions, convert

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "taobao"
AD_DIR, UB_DIR = FIX / "ad_click", FIX / "user_behavior"
TINY = {"users": 20, "rows": 120, "ll_len": 8, "st_len": 3, "shards": 2, "progress": False}
TINY_ARGS = ["--users", "20", "--rows", "120", "--ll-len", "8", "--st-len", "3", "--shards", "2", "--quiet"]


def _digest(root: Path) -> str:
    """sha256 over every entry under ``root`` (relative path, kind, bytes or link target); links not followed."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                h.update(f"L {rel} -> {os.readlink(p)}\n".encode())
            elif p.is_file():
                h.update(f"F {rel}\n".encode() + p.read_bytes())
            else:
                h.update(f"D {rel}\n".encode())
    return h.hexdigest()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _assert_intact(out: Path, digest: str) -> None:
    assert _digest(out) == digest
    assert list(iter_problems(out)) == []
    assert _leftovers(out) == []


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if line]


@pytest.fixture
def old(tmp_path: Path) -> tuple[Path, str]:
    """A valid synthetic dataset in ``tmp_path/ds`` and its digest."""
    out = tmp_path / "ds"
    generate(out, seed=0, **TINY)
    return out, _digest(out)


def _bad_line_3(tmp_path: Path) -> Path:
    """The ad-click fixture with a non-integer time stamp on line 3 of raw_sample.csv."""
    raw = tmp_path / "raw"
    shutil.copytree(AD_DIR, raw)
    path = raw / "raw_sample.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "540240,notatime,311687,430548_1007,1,0\n"
    path.write_text("".join(lines))
    return raw


# ----------------------------------------------------------------------------- failed conversion


def test_failed_taobao_conversion_keeps_the_old_dataset(old, tmp_path, capsys):
    out, digest = old
    manifest = (out / "manifest.json").read_bytes()
    raw = _bad_line_3(tmp_path)
    assert main(["data", "taobao", "--raw", str(raw), "--out", str(out), "--variant", "ad-click", "--overwrite"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("raylsm: error:") and "raw_sample.csv" in err[0], err
    _assert_intact(out, digest)
    assert (out / "manifest.json").read_bytes() == manifest
    assert main(["data", "check", str(out)]) == 0


def test_existing_dataset_needs_overwrite(old, capsys):
    out, digest = old
    assert main(["data", "synth", "--out", str(out), "--seed", "3", *TINY_ARGS]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0], err
    assert main(["data", "taobao", "--raw", str(UB_DIR), "--out", str(out), "--variant", "user-behavior"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0], err
    _assert_intact(out, digest)


def test_overwrite_replaces_a_real_dataset(old, capsys):
    out, digest = old
    assert main(["data", "synth", "--out", str(out), "--seed", "3", "--overwrite", *TINY_ARGS[:-2], "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _digest(out) != digest and list(iter_problems(out)) == [] and _leftovers(out) == []
    assert json.loads((out / "manifest.json").read_text())["source"]["seed"] == 3
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == [
        "test/part-00000.parquet", "train/part-00000.parquet"]
    assert summary["files"] == [str(out / "train" / "part-00000.parquet"), str(out / "test" / "part-00000.parquet")]
    assert all(Path(f).is_file() for f in summary["files"]) and summary["out"] == str(out)
    # and a Taobao conversion over the synthetic dataset
    assert main(["data", "taobao", "--raw", str(UB_DIR), "--out", str(out), "--variant", "user-behavior",
                 "--ll-len", "4", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((out / "manifest.json").read_text())["source"]["generator"] == "raylsm.data.taobao"
    assert list(iter_problems(out)) == [] and _leftovers(out) == [] and not (out / "_staging").exists()
    assert all(Path(f).is_file() and Path(f).parent.parent == out for fs in summary["files"].values() for f in fs)


def test_empty_existing_directory_is_written(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    generate(out, **TINY)
    assert list(iter_problems(out)) == [] and _leftovers(out) == []


# ----------------------------------------------------------------------------- foreign folders and links


def _foreign(tmp_path: Path, manifest: str | None = None) -> tuple[Path, str]:
    out = tmp_path / "photos"
    (out / "train" / "images").mkdir(parents=True)
    (out / "test").mkdir()
    (out / "train" / "images" / "cat.jpg").write_bytes(b"\xff\xd8\xff\xe0 a cat")
    (out / "test" / "notes.txt").write_text("mine")
    if manifest is not None:
        (out / "manifest.json").write_text(manifest)
    return out, _digest(out)


@pytest.mark.parametrize("manifest, why", [
    (None, "no manifest.json"),
    ('{"source": {"generator": "raylsm.data.synth"}}', "format None"),  # the generator's name is no proof
    ('{"format": "raylsm-dataset/1"', "not valid JSON"),
    ('["raylsm-dataset/1"]', "format None"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folder_is_refused(tmp_path, capsys, manifest, why, overwrite):
    out, digest = _foreign(tmp_path, manifest)
    flag = ["--overwrite"] if overwrite else []
    commands = [["data", "synth", "--out", str(out), *TINY_ARGS, *flag],
                ["data", "taobao", "--raw", str(UB_DIR), "--out", str(out), "--variant", "user-behavior", *flag]]
    for argv in commands:
        assert main(argv) == 2
        err = _err_lines(capsys)
        assert len(err) == 1 and f"--out: {out} " in err[0] and "not a raylsm dataset" in err[0] and why in err[0], err
        assert _digest(out) == digest and _leftovers(out) == []
    assert (out / "train" / "images" / "cat.jpg").read_bytes() == b"\xff\xd8\xff\xe0 a cat"


def _outside(tmp_path: Path) -> tuple[Path, str]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.parquet").write_bytes(b"not yours")
    (outside / "part-00000.parquet").write_bytes(b"not yours either")
    return outside, _digest(outside)


def test_symlinked_train_is_never_followed(old, tmp_path, capsys):
    out, _ = old
    outside, outside_digest = _outside(tmp_path)
    shutil.rmtree(out / "train")
    (out / "train").symlink_to(outside, target_is_directory=True)
    before = _digest(out)
    assert main(["data", "synth", "--out", str(out), *TINY_ARGS]) == 2  # refused without --overwrite
    assert "--overwrite" in _err_lines(capsys)[0] and _digest(out) == before
    assert main(["data", "synth", "--out", str(out), "--overwrite", *TINY_ARGS]) == 0
    assert _digest(outside) == outside_digest  # nothing deleted, nothing written there
    assert not (out / "train").is_symlink() and list(iter_problems(out)) == [] and _leftovers(out) == []


def test_symlinked_train_without_manifest_is_refused(tmp_path, capsys):
    outside, outside_digest = _outside(tmp_path)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "train").symlink_to(outside, target_is_directory=True)
    for flag in ([], ["--overwrite"]):
        assert main(["data", "synth", "--out", str(out), *TINY_ARGS, *flag]) == 2
        assert "not a raylsm dataset" in _err_lines(capsys)[0]
    assert _digest(outside) == outside_digest and (out / "train").is_symlink()


def test_out_itself_a_symlink_is_refused(old, tmp_path, capsys):
    target, digest = old
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    for argv in (["data", "synth", "--out", str(link), "--overwrite", *TINY_ARGS],
                 ["data", "taobao", "--raw", str(UB_DIR), "--out", str(link), "--variant", "user-behavior", "--overwrite"]):
        assert main(argv) == 2
        err = _err_lines(capsys)
        assert len(err) == 1 and f"--out: {link} is a symbolic link" in err[0], err
    _assert_intact(target, digest)
    assert link.is_symlink()


def test_manifest_symlink_is_not_proof(old, tmp_path, capsys):
    real, _ = old
    out, digest = _foreign(tmp_path)
    (out / "manifest.json").symlink_to(real / "manifest.json")
    digest = _digest(out)
    assert main(["data", "synth", "--out", str(out), "--overwrite", *TINY_ARGS]) == 2
    assert "not a regular file" in _err_lines(capsys)[0] and _digest(out) == digest


# ----------------------------------------------------------------------------- interruptions in process


class Boom(KeyboardInterrupt):
    pass


def _raise_on_call(n: int, fn):
    """``fn`` that raises :class:`Boom` on its ``n``-th call (1-based), else runs."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"call {n}")
        return fn(*args, **kwargs)

    return wrapped, calls


@pytest.mark.parametrize("where, target, n", [
    ("before shards", (synth, "build_world"), 1),
    ("during the first shard", (synth, "chunk_table"), 1),
    ("between shards", (synth, "chunk_table"), 2),
    ("after the train shards", (synth, "chunk_table"), 3),
    ("after every shard, before the manifest", (Manifest, "write"), 1),
    ("after the manifest, during the check", (atomic, "iter_problems"), 1),
    ("during the swap", (atomic, "swap_in"), 1),
])
def test_interrupted_synth_keeps_the_old_dataset(old, monkeypatch, where, target, n):
    out, digest = old
    obj, name = target
    wrapped, calls = _raise_on_call(n, getattr(obj, name))
    monkeypatch.setattr(obj, name, wrapped)
    with pytest.raises(Boom):
        generate(out, seed=5, overwrite=True, **{**TINY, "rows": 300, "shards": 2, "ll_len": 8})
    assert calls["n"] == n, where
    _assert_intact(out, digest)


@pytest.mark.parametrize("where, target, n", [
    ("before any line is parsed", (taobao, "_stage_user_behavior"), 1),
    ("after the first shard rows", (taobao, "_write_split"), 2),
    ("after several batches", (taobao, "_write_split"), 5),
    ("after every shard, before the manifest", (Manifest, "write"), 1),
    ("during the check", (atomic, "check_staged"), 1),
])
def test_interrupted_taobao_keeps_the_old_dataset(old, monkeypatch, where, target, n):
    out, digest = old
    obj, name = target
    wrapped, calls = _raise_on_call(n, getattr(obj, name))
    monkeypatch.setattr(obj, name, wrapped)
    with pytest.raises(Boom):
        convert(UB_DIR, out, "user-behavior", ll_len=4, st_len=3,
                options=TaobaoOptions(batch_rows=60, shard_rows=20), overwrite=True)
    assert calls["n"] == n, where
    _assert_intact(out, digest)


def test_interrupt_via_the_cli_is_exit_130(old, monkeypatch, capsys):
    out, digest = old
    wrapped, _ = _raise_on_call(2, synth.chunk_table)
    monkeypatch.setattr(synth, "chunk_table", wrapped)
    assert main(["data", "synth", "--out", str(out), "--overwrite", *TINY_ARGS]) == 130
    assert "interrupted" in capsys.readouterr().err
    _assert_intact(out, digest)


def test_failed_swap_restores_the_old_dataset(old, monkeypatch):
    """Without an atomic exchange the old dataset is renamed aside; a failing rename-in puts it back."""
    out, digest = old
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(f".{out.name}.staging-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        generate(out, seed=5, overwrite=True, **TINY)
    _assert_intact(out, digest)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    generate(out, seed=5, overwrite=True, **TINY)  # the fallback swap itself works
    assert _digest(out) != digest and list(iter_problems(out)) == [] and _leftovers(out) == []


def test_a_staged_dataset_that_fails_its_check_is_not_swapped_in(old, monkeypatch, capsys):
    out, digest = old
    real = synth._write_shards

    def broken(root, *args):
        summary = real(root, *args)
        (root / "test" / "part-00000.parquet").write_bytes(b"garbage")
        return summary

    monkeypatch.setattr(synth, "_write_shards", broken)
    assert main(["data", "synth", "--out", str(out), "--overwrite", *TINY_ARGS]) == 2
    err = _err_lines(capsys)
    assert err and all(str(out) in line and "nothing replaced" in line for line in err), err
    assert "staging" not in err[0]
    _assert_intact(out, digest)


# ----------------------------------------------------------------------------- real signals


def _synth_process(out: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "raylsm", "data", "synth", "--out", str(out), "--overwrite", "--quiet",
            "--rows", "400000", "--users", "500", "--ll-len", "300", "--st-len", "20", "--shards", "8"]
    # SIGINT at its default in the child, as in a terminal: a background job of a non-interactive shell (a CI
    # runner's) is started with SIGINT ignored, and the child would inherit the ignore.
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_shard(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> Path:
    staging = out.parent / f".{out.name}.staging-{proc.pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (staging / "train" / "part-00000.parquet").exists():
            return staging
        if proc.poll() is not None:
            raise AssertionError(f"synth ended early: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("synth did not start writing shards in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_during_shards_keeps_the_old_dataset(old, sig):
    out, digest = old
    proc = _synth_process(out)
    try:
        staging = _wait_for_shard(proc, out)
        time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "raylsm: interrupted" in err, (proc.returncode, err)
    assert not staging.exists()
    _assert_intact(out, digest)


def test_sigkill_leaves_the_old_dataset_and_the_next_run_sweeps_its_staging(old):
    out, digest = old
    proc = _synth_process(out)
    try:
        staging = _wait_for_shard(proc, out)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert staging.is_dir()  # nothing can clean up after SIGKILL ...
    assert _digest(out) == digest and list(iter_problems(out)) == []  # ... but the dataset is untouched
    generate(out, overwrite=True, **TINY)  # the next run removes the dead writer's staging
    assert not staging.exists() and _leftovers(out) == [] and list(iter_problems(out)) == []


def test_a_dead_swap_is_rolled_back_by_the_next_run(old, tmp_path):
    """SIGKILL between the two renames of the fallback swap: the next run puts the old dataset back first."""
    out, digest = old
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = out.parent / f".{out.name}.old-{int(dead.stdout)}"
    out.rename(aside)
    atomic._sweep_leftovers(out)
    _assert_intact(out, digest)

"""Write a dataset directory atomically: stage it beside ``--out``, check it, swap it in.

A writer (``raylsm data synth``, ``raylsm data taobao``) calls :func:`write_dataset` with a
function that fills a fresh staging directory ``<parent>/.<name>.staging-<pid>`` (shards first,
``manifest.json`` last). The staged dataset is then validated with the contract's own checker and
swapped in for ``--out``: an atomic exchange where the kernel has one (``renameat2``), else the
old dataset is renamed aside, the staged one renamed in and the old one deleted. Any failure or
interruption (an exception, Ctrl-C, SIGTERM, SIGHUP) before the swap leaves ``--out`` exactly as
it was and removes the staging; the swap itself runs with those signals held back.

An existing non-empty ``--out`` is replaced only with ``overwrite=True`` (``--overwrite``) and only
when its ``manifest.json`` declares the dataset format; ``--out`` itself must not be a symbolic
link, and nothing inside it is followed: deletion is ``shutil.rmtree`` of the directory, which
unlinks symbolic links instead of descending into them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from raylsm.data.check import iter_problems
from raylsm.data.contract import FORMAT, MANIFEST_MAX_BYTES, ContractError

T = TypeVar("T")
_HELD_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def dataset_format_problem(out: Path) -> str | None:
    """Why ``out`` is not a dataset this project wrote (None when its manifest declares the format)."""
    manifest = out / "manifest.json"
    try:
        st = os.lstat(manifest)
    except FileNotFoundError:
        return "it has no manifest.json"
    if not stat.S_ISREG(st.st_mode):
        return "its manifest.json is not a regular file"
    if st.st_size > MANIFEST_MAX_BYTES:
        return f"its manifest.json is {st.st_size} bytes, over the {MANIFEST_MAX_BYTES} byte limit"
    try:
        with open(manifest, "rb") as f:
            obj = json.loads(f.read(MANIFEST_MAX_BYTES + 1))
    except (ValueError, RecursionError, OSError):
        return "its manifest.json is not valid JSON"
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else None
        return f"its manifest.json has format {got!r}, not {FORMAT!r}"
    return None


def check_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an ``--out`` that may not be (re)written; return it as a path. One-line ``ValueError``."""
    out = Path(out)
    if _is_symlink(out):
        raise ValueError(f"--out: {out} is a symbolic link; give the directory it points to or a new one")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a directory")
    if not any(out.iterdir()):
        return out
    problem = dataset_format_problem(out)
    if problem:
        raise ValueError(f"--out: {out} is not empty and not a raylsm dataset ({problem}); refusing to replace it, "
                         "choose a new directory")
    if not overwrite:
        raise ValueError(f"--out: {out} already holds a dataset; pass --overwrite to replace it")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    """Delete ``path`` without following symbolic links (a link itself is unlinked)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep_leftovers(out: Path) -> None:
    """Remove the staging of writers that died (SIGKILL); put back an old dataset a dead swap left aside."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(staging|old)-(\d+)")
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            os.rename(entry, out)
        else:
            _remove_tree(entry)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(staging: Path, out: Path, overwrite: bool) -> None:
    """Make ``staging`` the dataset at ``out``; on failure ``out`` is as before (``staging`` is left to the caller)."""
    check_out(out, overwrite)  # again: --out may have changed while the dataset was written
    if not os.path.lexists(out) or not any(out.iterdir()):
        os.replace(staging, out)  # a missing or empty directory is replaced atomically
        return
    if _exchange(staging, out):
        _remove_tree(staging)  # now the old dataset
        return
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    _remove_tree(aside)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` like Ctrl-C while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    for sig in _HELD_SIGNALS[1:]:
        previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP until the block is done (they are delivered right after)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def check_staged(staging: Path, out: Path) -> None:
    """Validate the staged dataset; raise :class:`ContractError` naming ``out`` for each problem."""
    problems = [p.replace(str(staging), str(out)) for p in iter_problems(staging)]
    if problems:
        raise ContractError([f"{out}: the written dataset fails its check, nothing replaced: {p}" for p in problems])


def write_dataset(out: str | os.PathLike, write: Callable[[Path], T], overwrite: bool = False) -> T:
    """Run ``write(staging)`` in a fresh staging directory beside ``out``, check it, swap it in; return its result.

    ``write`` must write ``manifest.json`` last. A failure or interruption anywhere leaves ``out`` as it
    was and removes the staging.
    """
    if not Path(os.path.abspath(out)).name:
        raise ValueError(f"--out: {out} is not a directory a dataset can be written to")
    out = check_out(Path(os.path.abspath(out)), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    _remove_tree(staging)
    try:
        with _signals_interrupt():
            staging.mkdir()
            result = write(staging)
            check_staged(staging, out)
            with _signals_held():
                swap_in(staging, out, overwrite)
    finally:
        with _signals_held():
            _remove_tree(staging)  # only present when the swap did not happen
    return result


def rebase(path: str | os.PathLike, staging: Path, out: Path) -> str:
    """``path`` under ``staging`` as the same path under ``out`` (for summaries written after the swap)."""
    return str(out / Path(path).relative_to(staging))

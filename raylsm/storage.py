"""Owner-only storage directories and the ownership check before trusting one (docs/security.md).

Ray Tune unpickles a search directory on ``tune --resume`` and at a search's end, so whoever can
write there can run code as the user. Directories the project creates are made ``0o700``
(:func:`make_private_dir`); a directory about to be unpickled must belong to the current user
and be writable by no one else (:func:`check_trusted_dir`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from raylsm.config import ConfigError

PRIVATE_MODE = 0o700


def absolute(path: str) -> str:
    """A local path made absolute (against this process's working directory); a remote URI (``s3://``) as it is."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def make_private_dir(path: str | Path) -> Path:
    """Create ``path`` and any missing parents with mode 0o700; existing directories are left as they are."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_MODE)
        except FileExistsError:  # created concurrently: not ours to tighten
            continue
        os.chmod(d, PRIVATE_MODE)  # mkdir's mode is filtered by the umask
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)  # raises the usual OSError (e.g. a file in the way)
    return path


def untrusted_reason(path: str | Path) -> str | None:
    """Why directory ``path`` and the files directly in it may not be trusted; None if they may.

    The directory must belong to this user and be writable by no one else; each file in it must
    belong to this user and be writable by no one else who can reach it through the directory.
    ``stat`` follows symlinks, so a link to someone else's directory is judged by its target.
    """
    path = Path(path)
    uid = os.getuid()
    try:
        st = path.stat()
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        if st.st_uid != uid:
            return f"{path} belongs to uid {st.st_uid}, not to this user (uid {uid})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})"
        reach = (stat.S_IWGRP if st.st_mode & stat.S_IXGRP else 0) | (stat.S_IWOTH if st.st_mode & stat.S_IXOTH else 0)
        for f in sorted(path.iterdir()):
            fst = f.stat()
            if not stat.S_ISREG(fst.st_mode):
                continue
            if fst.st_uid != uid:
                return f"{f} belongs to uid {fst.st_uid}, not to this user (uid {uid})"
            if fst.st_mode & reach:
                return f"{f} is writable by other users (mode {stat.S_IMODE(fst.st_mode):o})"
    except OSError as e:
        return f"{e.filename or path}: {e.strerror or e}"
    return None


def check_trusted_dir(path: str | Path, what: str) -> Path:
    """Raise a one-line ConfigError (prefixed by ``what``, e.g. ``--resume``) unless ``path`` may be trusted."""
    reason = untrusted_reason(path)
    if reason:
        raise ConfigError(f"{what}: refusing to load {path}: {reason} (Ray Tune unpickles it; see docs/security.md)")
    return Path(path)

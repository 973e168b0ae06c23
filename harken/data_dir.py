"""The data folder holds the signing key, the SQLite database (transcripts, webhook URLs with
their secrets) and caches: only the user running the server may read it.

``make_private`` creates it 0700, and takes group and other permissions off it and off what it
directly holds (``harken.db`` and SQLite's ``-wal``/``-shm``, which SQLite creates with the
database file's own mode, so later ones stay 0600). Entries owned by another user are left
alone (a shared mount, a container volume): changing them would fail or surprise.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("harken.data_dir")

_OPEN_TO_OTHERS = stat.S_IRWXG | stat.S_IRWXO


def make_private(path: Path) -> None:
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _restrict(path, 0o700)
    for entry in path.iterdir():
        if entry.is_symlink():
            continue
        _restrict(entry, 0o700 if entry.is_dir() else None)


def _restrict(path: Path, mode: int | None) -> None:
    """Drop group and other permissions (``mode``: set exactly this instead)."""
    try:
        info = path.stat()
        if info.st_uid != os.getuid() or not info.st_mode & _OPEN_TO_OTHERS:
            return
        os.chmod(path, mode if mode is not None else stat.S_IMODE(info.st_mode) & ~_OPEN_TO_OTHERS)
    except OSError as exc:
        log.warning("could not make %s private: %s", path, exc)

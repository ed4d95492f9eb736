"""Atomic writes: a file is replaced whole or not at all, even under kill -9 or a full disk.

A file is written to a temporary name next to it (``.<name>.<8 chars>.tmp``), flushed
and fsynced, then renamed over the target; the directory is fsynced too. A write that
fails removes its temporary file and raises a one-line error naming the path. Temporary
files of writes a kill interrupted are recognised by their name and removed at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagetrain.errors import RunDirError

TEMP_NAME = re.compile(r"^\.[A-Za-z0-9_.-]+\.[a-z0-9_]{8}\.tmp$")
"""Temp names of :func:`atomic_write` (``.<name>.<8 random chars>.tmp``) and only those."""


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file through ``write(fileobj)`` to a temp name, fsync, then rename over ``path``.

    The rename is atomic on POSIX, so readers see either the old or the new file.

    Raises:
        RunDirError: when the operating system refuses (disk full, permission denied,
            read-only file system...), naming ``path``; the temp file is removed and
            ``path`` keeps its old content.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        make_shareable(Path(tmp))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            unlink_quietly(Path(tmp))


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` for text (UTF-8)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def remove_orphan_temps(run_dir: str | Path) -> list[Path]:
    """Delete the temp files that killed writes left in ``run_dir`` and its ``checkpoints/``.

    Only regular files named like :func:`atomic_write`'s temp files are removed (never a
    directory, a symbolic link or any other name). Call it at the start of a run, while
    holding the run directory's lock: a concurrent writer's temp file would match too.

    Returns:
        The removed paths.
    """
    removed = []
    for directory in (Path(run_dir), Path(run_dir) / "checkpoints"):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = directory / name
            if not TEMP_NAME.match(name) or not is_regular(path):
                continue
            try:
                path.unlink()
            except OSError:
                continue  # a read-only directory: nothing to clean, nothing lost
            removed.append(path)
    return removed


def make_shareable(path: Path) -> None:
    """Give a file made by ``mkstemp`` (private, 0600) the mode a plain ``open`` would (0666
    less the umask): run files and token files are read by other users on shared storage."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: the caller reports the real failure
        path.unlink(missing_ok=True)


def is_regular(path: Path) -> bool:
    """A regular file, not through a symbolic link."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (where directories can be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

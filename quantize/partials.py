"""Temporary outputs: `.NAME.PID.partial` beside the target, written under an exclusive lock and renamed
into place on success. A process killed with SIGKILL (or a power cut) cannot remove its own, and one
of them can be the size of the whole model; the next quantize into that folder removes those of
processes that no longer run.

A partial file is stale when both hold: the PID in its name does not run (so a live writer's file is
never touched, even where locks do not work), and nobody holds its lock (so a PID reused by an
unrelated process, or a writer on another machine sharing the folder, keeps it too)."""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _pattern(suffix: str) -> re.Pattern:
    return re.compile(r"^\.(?P<name>.+" + re.escape(suffix) + r")\.(?P<pid>[1-9][0-9]{0,9})\.partial$")


PARTIAL = _pattern(".gguf")


def partial_path(out: Path, pid: int | None = None) -> Path:
    return out.with_name(f".{out.name}.{pid or os.getpid()}.partial")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Create `path` and hold an exclusive lock on it while the block runs (released at process death)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks: the PID alone protects the file
            pass
        yield
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    except OverflowError:  # not a PID this system can have
        return False
    return True


def _unlocked(path: Path) -> bool:
    """Nobody holds the file's lock (a file system without locks counts as unlocked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        return e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Removed:
    path: Path
    pid: int
    size: int


def stale_partials(folder: Path, suffix: str = ".gguf") -> list[tuple[Path, int]]:
    """Partial outputs (of files named *suffix) in `folder` whose writer no longer runs, with its PID."""
    pattern = PARTIAL if suffix == ".gguf" else _pattern(suffix)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    out = []
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not _running(pid) and _unlocked(Path(entry.path)):
            out.append((Path(entry.path), pid))
    return sorted(out)


def remove_stale_partials(folder: Path, suffix: str = ".gguf") -> list[Removed]:
    """Remove what `stale_partials` finds; what cannot be removed (another user's, read-only) stays."""
    removed = []
    for path, pid in stale_partials(folder, suffix):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(Removed(path, pid, size))
    return removed

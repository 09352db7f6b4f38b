"""Temporary outputs of quantize: a partial file is removed only when the process named in it no longer
runs and nobody holds its lock; anything else in the folder is left alone. (The end-to-end case, a real
quantize killed with SIGKILL, is in test_commands_quantize.py.)"""

from __future__ import annotations

import subprocess
import sys

from quantize.partials import Removed, locked, partial_path, remove_stale_partials, stale_partials


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_partials_of_dead_writers_are_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".m.gguf.{dead}.partial"
    stale.write_bytes(b"x" * 1000)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        kept = {
            tmp_path / f".n.gguf.{sleeper.pid}.partial": b"a running writer",
            partial_path(tmp_path / "o.gguf"): b"this process's own",
            tmp_path / f".notes.txt.{dead}.partial": b"not a GGUF of ours",
            tmp_path / f"m.gguf.{dead}.partial": b"not hidden: not ours",
            tmp_path / f".m.gguf.{dead}.partial.txt": b"another name",
            tmp_path / "m.gguf": b"a model",
        }
        for path, data in kept.items():
            path.write_bytes(data)
        link = tmp_path / f".l.gguf.{dead}.partial"
        link.symlink_to(tmp_path / "m.gguf")  # a link is never followed, nor removed
        assert remove_stale_partials(tmp_path) == [Removed(stale, dead, 1000)]
        assert not stale.exists()
        assert all(path.read_bytes() == data for path, data in kept.items())
        assert link.is_symlink()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_locked_partial_is_kept_though_its_pid_is_gone(tmp_path):
    """A PID that another process reuses, or a writer on another machine sharing the folder: the lock
    held on the file says it is still being written."""
    dead = _dead_pid()
    path = tmp_path / f".m.gguf.{dead}.partial"
    with locked(path):
        assert stale_partials(tmp_path) == []
    assert stale_partials(tmp_path) == [(path, dead)]


def test_a_missing_folder_has_no_partials(tmp_path):
    assert remove_stale_partials(tmp_path / "nope") == []

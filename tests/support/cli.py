"""Running localmix as a user does: `python -m localmix ...` in a child process."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "localmix", *args], capture_output=True, text=True, env=full_env, timeout=600, **kw
    )


def one_line_error(r: subprocess.CompletedProcess, expect: str, code: int = 1) -> bool:
    """The command failed as an expected failure should: `code`, one line on stderr saying `expect`."""
    err = r.stderr.strip()
    return r.returncode == code and "Traceback" not in err and len(err.splitlines()) == 1 and expect in err

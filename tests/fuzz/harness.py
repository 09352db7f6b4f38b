"""Run many `localmix ...` command lines quickly, each as a user would, and classify how each ended.

A fork server (`python -m tests.fuzz.server`) imports localmix and llama.cpp once; every case runs in a
child forked from it, in its own working directory, with stdin closed, stdout and stderr to files and a
wall-clock limit. So a hang, a signal inside llama.cpp or a traceback is seen per case, costs
milliseconds of start-up instead of a second, and never takes the test run down.

    with Harness(env={"LOCALMIX_HOME": str(home)}) as h:
        outcomes = h.run([Case(argv=["info", "bad.gguf"], cwd=dir), ...])
    assert not [o for o in outcomes if not o.ok]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Case:
    argv: list[str]
    cwd: str  # the case's own folder: files the case leaves behind are looked for here
    timeout: float = 30.0
    label: str = ""  # what was mutated, for the failure report


@dataclass
class Outcome:
    case: Case
    code: int | None  # exit status, None when killed by a signal or a hang
    signal: int | None  # the signal that ended it (not our own kill after a hang)
    hung: bool
    stdout: str
    stderr: str
    seconds: float
    new_files: list[str] = field(default_factory=list)  # paths (relative to cwd) that appeared

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def one_line_error(self) -> bool:
        """Exit 1 (an expected failure) or 2 (a usage error), and one line on stderr."""
        err = self.stderr.strip()
        return self.code in (1, 2) and not self.traceback and len(err.splitlines()) == 1

    @property
    def ok(self) -> bool:
        """Success, or the expected failure: exit 1 with one line on stderr. Never a traceback, hang or signal."""
        if self.hung or self.signal is not None or self.traceback:
            return False
        return self.code == 0 or self.one_line_error

    @property
    def kind(self) -> str:
        """How it ended, for a sweep's totals: hang, signal, traceback, ok or "not one line"."""
        if self.hung or self.signal or self.traceback:
            return "hang" if self.hung else "signal" if self.signal else "traceback"
        return "ok" if self.ok else "not one line"

    def describe(self) -> str:
        how = "hung" if self.hung else f"signal {self.signal}" if self.signal else f"exit {self.code}"
        err = self.stderr.strip().splitlines()
        tail = " | ".join(err[-3:])[:400]
        return f"[{self.case.label}] localmix {' '.join(self.case.argv)[:200]}: {how} in {self.seconds:.1f}s: {tail}"


class Harness:
    """A running fork server; use as a context manager. `workers` cases run at once."""

    def __init__(self, env: dict[str, str] | None = None, workers: int | None = None):
        self.env = {**os.environ, **(env or {})}
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))

    def __enter__(self) -> Harness:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.server", str(self.workers)],
            cwd=ROOT, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def run(self, cases: list[Case]) -> list[Outcome]:
        msg = [{"argv": c.argv, "cwd": c.cwd, "timeout": c.timeout} for c in cases]
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fuzz server died")
        return [Outcome(case=c, **r) for c, r in zip(cases, json.loads(line), strict=True)]


def isolated_env(home: Path) -> dict[str, str]:
    """The environment of a sweep's cases: its own store and Hugging Face cache, offline."""
    return {"LOCALMIX_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf")}


def failures(outcomes: list[Outcome]) -> str:
    """A report of every outcome that is not ok, for an assertion message."""
    bad = [o.describe() for o in outcomes if not o.ok]
    return f"{len(bad)} of {len(outcomes)} cases failed:\n" + "\n".join(bad[:40])


def leftovers(outcomes: list[Outcome], allowed=lambda path: False) -> list[str]:
    """Files cases left behind that `allowed` does not expect (partial outputs, temporary files)."""
    return [f"[{o.case.label}] {p}" for o in outcomes for p in o.new_files if not allowed(p)]


def kill_signal_name(sig: int) -> str:
    return signal.Signals(sig).name

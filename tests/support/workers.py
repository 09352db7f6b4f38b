"""Real `localmix worker` processes on free 127.0.0.1 ports, for tests: started, waited for (a probe
answers; bounded), killed at exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READY_SECONDS = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningWorker:
    """One `python -m localmix worker --port P --threads N` child. Its stdout and stderr go to a log
    file (`log`), so that a test can read what it printed without the pipe filling up."""

    def __init__(self, port: int, threads: int = 1, cache: Path | None = None, log_dir: Path | None = None):
        self.port, self.threads, self.cache = port, threads, cache
        self.endpoint = f"127.0.0.1:{port}"
        fd, name = tempfile.mkstemp(prefix=f"worker-{port}-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.log = Path(name)
        self._since = 0  # where the current process's output starts in the log
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = [sys.executable, "-m", "localmix", "worker", "--port", str(self.port), "--threads", str(self.threads)]
        if self.cache is not None:
            args += ["--cache", str(self.cache)]
        self._since = self.log.stat().st_size
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until the worker printed that it listens (it probed itself), bounded; its log in the failure."""
        deadline = time.monotonic() + READY_SECONDS
        while "worker listening on" not in self.output()[self._since:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker on port {self.port} did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        """Everything its processes printed (all starts), stdout and stderr together."""
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """Gone at once, as a machine that lost power (SIGKILL), and reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        """Killed (if running) and started again on the same port."""
        self.kill()
        self.start()


@contextmanager
def workers(n: int, threads: int = 1, cache: Path | None = None) -> Iterator[list[RunningWorker]]:
    started: list[RunningWorker] = []
    try:
        for _ in range(n):
            started.append(RunningWorker(free_port(), threads, cache))
        yield started
    finally:
        for w in started:
            w.kill()
            w.log.unlink(missing_ok=True)


Worker = RunningWorker  # the design's name

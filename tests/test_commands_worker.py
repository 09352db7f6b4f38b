"""`localmix worker`: a real worker process on 127.0.0.1 prints its endpoint, memory and cores, reports
clients, stops on Ctrl-C with status 0; a port in use, a bad host or thread count is one line, status 1;
listening off loopback warns that the protocol has no authentication."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from localmix import rpc
from localmix.commands.worker import bind_address, exposure_warning, is_loopback
from tests.support.cli import one_line_error, run_cli
from tests.support.workers import free_port


def _lines(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    threading.Thread(target=read, daemon=True).start()
    return q


def _until(q: queue.Queue, text: str, seen: list[str], seconds: float = 60) -> None:
    """Read lines into `seen` until one contains `text` (bounded)."""
    deadline = time.monotonic() + seconds
    while not seen or text not in seen[-1]:
        line = q.get(timeout=max(0.01, deadline - time.monotonic()))
        assert line is not None, f"the worker ended before saying {text!r}: {seen}"
        seen.append(line)


def test_worker_prints_itself_reports_clients_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "worker", "--port", str(port), "--threads", "1",
                             "--cache", str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env={**os.environ, "LOCALMIX_HOME": str(tmp_path / "home")})
    try:
        out = _lines(proc.stdout)
        seen: list[str] = []
        _until(out, "Ctrl-C stops it", seen)
        assert seen[0] == f"worker listening on 127.0.0.1:{port} (llama.cpp RPC protocol 7.0.0)"
        assert seen[1].startswith(f"  RPC0[127.0.0.1:{port}]: CPU, ") and " free of " in seen[1]
        assert seen[2].startswith("  cores: ") and seen[2].endswith("using 1 thread")
        assert seen[3] == f"  cache: {cache}" and cache.is_dir()
        assert not any("Starting RPC server" in x or "Accepted client" in x for x in seen)  # llama.cpp's banner caught

        rpc.probe(f"127.0.0.1:{port}")  # a client comes and goes
        _until(out, "client left", seen, 10)
        assert seen[-2].endswith("client connected")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        _until(out, "worker stopped", seen, 10)
        assert proc.stderr.read() == ""  # loopback: no warning, nothing else
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = run_cli("worker", "--port", str(port), "--threads", "1")
    assert one_line_error(r, f"cannot listen on 127.0.0.1:{port}")
    assert "another worker there?" in r.stderr and r.stdout == ""


@pytest.mark.parametrize(("args", "says"), [
    (["--host", "::1"], "IPv4 only"),
    (["--host", "no-such-host.invalid"], "not an IPv4 address"),
    (["--threads", "0"], "--threads 0: give 1 or more"),
    (["--port", "70000"], "--port 70000: a port is a number from 1 to 65535"),
])
def test_bad_arguments_are_one_line(args, says):
    r = run_cli("worker", *args)
    assert one_line_error(r, says), r.stderr


def test_off_loopback_warns_first():
    """An address off loopback that is not this machine's (TEST-NET-1): the warning, then why it cannot
    listen there; nothing was ever exposed."""
    r = run_cli("worker", "--host", "192.0.2.1", "--port", str(free_port()))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 2 and "Traceback" not in r.stderr
    assert lines[0].startswith("warning: listening on 192.0.2.1:") and "no authentication" in lines[0]
    assert "trusted network" in lines[0]
    assert lines[1].startswith("localmix worker: error: cannot listen on 192.0.2.1:")


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("LocalHost", True),
    ("0.0.0.0", False), ("192.168.1.20", False), ("10.0.0.2", False), ("gpu-box.lan", False),
])
def test_which_hosts_warn(host, loopback):
    assert is_loopback(host) is loopback
    assert (exposure_warning(host) is None) is loopback


def test_names_are_resolved_to_the_ipv4_address_llama_cpp_binds():
    assert bind_address("localhost") == "127.0.0.1"
    assert bind_address("127.0.0.1") == "127.0.0.1"

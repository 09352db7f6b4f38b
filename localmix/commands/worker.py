"""`localmix worker`: serve this machine's GPUs and CPU to other localmix instances (`--rpc HOST:PORT`)
through llama.cpp's RPC server, in this process (no separate binary). Ctrl-C stops it, status 0."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)
READY_SECONDS = 60  # the server starts its backends, then listens; a probe answers within this


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..rpc import DEFAULT_PORT

    p.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address to listen on (default 127.0.0.1: this machine only); the protocol has no "
                        "authentication: listen on another address only on a network you trust")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the work it is given (default: physical cores)")
    p.add_argument("--cache", default=None,
                   help="folder where it keeps tensors it was sent, so that later loads of the same model send "
                        "only their hashes (default: localmix's cache folder)")


def is_loopback(host: str) -> bool:
    """Only this machine can connect (127.0.0.0/8, ::1, localhost): no warning needed."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    if is_loopback(host):
        return None
    return (f"warning: listening on {host}: llama.cpp's RPC protocol has no authentication or encryption; "
            "anyone who can reach this port can run work and read memory here. Use it on a trusted network only.")


def bind_address(host: str) -> str:
    """The IPv4 address llama.cpp will bind (it takes a dotted address only; a name is resolved here)."""
    from ..errors import WorkerError
    from ..text import shown

    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError, IndexError):
        raise WorkerError(f"--host {shown(host)}: not an IPv4 address or a name of one "
                          "(llama.cpp's RPC server listens on IPv4 only)") from None


def check_port(address: str, port: int) -> None:
    """Bind the port once here: llama.cpp would only print that it cannot, and return."""
    from ..errors import WorkerError

    if not 1 <= port <= 65535:
        raise WorkerError(f"--port {port}: a port is a number from 1 to 65535")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp does
        s.bind((address, port))
    except OSError as e:
        raise WorkerError(f"cannot listen on {address}:{port}: {e.strerror or e} (another worker there? choose "
                          "another with --port)") from None
    finally:
        s.close()


class _CStdout:
    """llama.cpp's printf's (its banner, a line per client) caught on a pipe put under fd 1; what Python
    prints goes to the real stdout, line-buffered. Only the client lines are passed on, re-worded; the
    first client, localmix's own readiness probe, is not."""

    SAID = {"Accepted client connection": "client connected", "Client connection closed": "client left"}

    def __init__(self):
        read, write = os.pipe()
        real = os.dup(1)
        os.dup2(write, 1)
        os.close(write)
        sys.stdout = open(real, "w", buffering=1, closefd=True)  # stdout for the rest of the process
        self.banner: list[str] = []
        self._skip = 2  # the readiness probe's connect and close
        threading.Thread(target=self._read, args=(read,), daemon=True).start()

    def _read(self, fd: int) -> None:
        with open(fd, errors="replace") as f:
            for line in f:
                said = self.SAID.get(line.strip())
                if said is None:
                    self.banner.append(line.rstrip("\n"))
                elif self._skip:
                    self._skip -= 1
                else:
                    print(f"{time.strftime('%H:%M:%S')} {said}", flush=True)


def run(args: argparse.Namespace) -> int:
    from .. import llamacpp, paths
    from ..errors import WorkerError

    llamacpp.require_rpc()
    if args.threads is not None and args.threads < 1:
        raise WorkerError(f"--threads {args.threads}: give 1 or more")
    address = bind_address(args.host)
    if warning := exposure_warning(address):  # before anything can fail: what was asked for is the risk
        print(warning, file=sys.stderr, flush=True)
    check_port(address, args.port)
    threads = args.threads or _physical_cores()
    cache = paths.ensure_dir(paths.rpc_cache_dir() if args.cache is None else Path(args.cache).expanduser(),
                             "the worker's cache folder")

    endpoint = f"{address}:{args.port}"
    anywhere = address == "0.0.0.0"  # every interface: probed here on loopback, named to others by host name
    reach = f"{socket.gethostname()}:{args.port}" if anywhere else endpoint
    out = _CStdout()
    server = threading.Thread(target=llamacpp.serve_rpc, args=(endpoint, str(cache), threads), daemon=True)
    try:  # from here on a Ctrl-C is the way to stop, whenever it comes
        server.start()
        worker = _wait_ready(f"127.0.0.1:{args.port}" if anywhere else endpoint, server)
        _print_worker(endpoint, reach, worker, threads, cache)
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        print("worker stopped", flush=True)
        return 0
    raise WorkerError(f"llama.cpp's RPC server on {endpoint} stopped: {' / '.join(out.banner[-2:]) or 'no reason given'}")


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _print_worker(endpoint: str, reach: str, worker, threads: int, cache: Path) -> None:
    import psutil

    from ..text import shown
    from ..units import fmt_bytes

    print(f"worker listening on {endpoint} (llama.cpp RPC protocol {'.'.join(map(str, worker.version))})")
    for d in worker.devices:
        print(f"  RPC{d.index}[{endpoint}]: {d.kind.upper()}, {fmt_bytes(d.free)} free of {fmt_bytes(d.total)}")
    cores = psutil.cpu_count(logical=False) or "?"
    print(f"  cores: {cores} ({os.cpu_count()} threads), using {threads} thread{'s' * (threads != 1)}")
    print(f"  cache: {shown(cache)}")
    print(f"use it with: localmix run MODEL --rpc {shown(reach)}; Ctrl-C stops it", flush=True)


def _wait_ready(endpoint: str, server: threading.Thread):
    """The server answers a probe (it started its backends and listens), or one line why not."""
    from .. import rpc
    from ..errors import WorkerError

    deadline = time.monotonic() + READY_SECONDS
    while True:
        if not server.is_alive():
            raise WorkerError(f"llama.cpp's RPC server could not start on {endpoint} (see its message above)")
        try:
            return rpc.probe(endpoint, timeout=5.0)
        except WorkerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

"""Workers (`localmix worker`, llama.cpp's RPC servers) as localmix sees them, before llama.cpp connects:
endpoints parsed, each worker probed over a plain socket with timeouts (the handshake, its devices and
their memory), its link measured. llama.cpp's RPC client aborts the process on any failure (a worker not
running, another protocol version, a connection lost), so every such failure is found here first and
becomes one WorkerError line.

The wire format is that of ggml-rpc.cpp: a request is 1 byte command, uint64 LE size, the bytes; a
response is uint64 LE size, the bytes. HELLO must be a connection's first command.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LocalmixError, WorkerError
from .text import shown

DEFAULT_PORT = 50052

# ggml-rpc.cpp's enum rpc_cmd (the values are the protocol; HELLO is 14 in every version)
CMD_GET_DEVICE_MEMORY, CMD_HELLO, CMD_DEVICE_COUNT = 11, 14, 15
CONN_CAPS_SIZE = 24  # transport.h RPC_CONN_CAPS_SIZE: zero caps ask for plain TCP (no RDMA upgrade)
MAX_DEVICES = 64  # more than any worker has: a larger count is not a worker

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?")


def parse_endpoint(text: str) -> str:
    """ "host:port" or "host" (port 50052) as llama.cpp's RPC client will read it: an IPv4 address or a
    host name (its client speaks IPv4 only, and splits at the first colon)."""
    raw = text.strip()
    if raw.startswith("[") or raw.count(":") > 1:
        raise WorkerError(f"worker {shown(text)}: llama.cpp's RPC backend speaks IPv4 only; give an IPv4 address or a host name")
    host, colon, port = raw.partition(":")
    if not _HOST.fullmatch(host):
        raise WorkerError(f"worker {shown(text)}: expected HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
    if not colon:
        return f"{host}:{DEFAULT_PORT}"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise WorkerError(f"worker {shown(text)}: the port must be a number from 1 to 65535")
    return f"{host}:{int(port)}"


def parse_endpoints(text: str) -> tuple[str, ...]:
    """ "a:1,b:2" -> ("a:1", "b:2"); the same worker twice is refused (llama.cpp would load it twice)."""
    endpoints = tuple(parse_endpoint(x) for x in text.split(","))
    for i, e in enumerate(endpoints):
        if e in endpoints[:i]:
            raise WorkerError(f"worker {e} is named twice in --rpc")
    return endpoints


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


@dataclass(frozen=True)
class WorkerDevice:
    index: int  # the device's index on the worker (RPC<index>[endpoint])
    kind: str  # "gpu" | "cpu": a localmix worker serves its GPUs first and its CPU last
    free: int
    total: int


@dataclass(frozen=True)
class Worker:
    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[WorkerDevice, ...]
    rtt: float  # seconds: one command's round trip (the least seen while probing)


def compatible(theirs: tuple[int, int, int], ours: tuple[int, int, int]) -> bool:
    """llama.cpp's own rule (negotiate_hello): the same major, and a minor no greater than the client's."""
    return theirs[0] == ours[0] and theirs[1] <= ours[1]


def _version(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


class _Conn:
    """One connection to a worker, every receive bounded by the timeout; failures as WorkerError."""

    def __init__(self, endpoint: str, timeout: float):
        self.endpoint, self.timeout = endpoint, timeout
        host, port = split_endpoint(endpoint)
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            raise WorkerError(f"worker {endpoint} is not running (connection refused); start it there with: "
                              f"localmix worker --host {host} --port {port}") from None
        except socket.gaierror as e:
            raise WorkerError(f"worker {endpoint}: cannot resolve {shown(host)} ({e.strerror or e})") from None
        except TimeoutError:
            raise WorkerError(f"worker {endpoint} cannot be reached (no answer in {timeout:g} s); "
                              "is the address right and the port open?") from None
        except OSError as e:
            raise WorkerError(f"worker {endpoint} cannot be reached ({e.strerror or e})") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def _recv(self, n: int, stage: str) -> bytes:
        out = b""
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except TimeoutError:
                if stage == "hello":
                    raise WorkerError(f"worker {self.endpoint} accepted the connection but answers no handshake "
                                      f"in {self.timeout:g} s: it serves one client at a time; is another localmix "
                                      "using it?") from None
                raise WorkerError(f"worker {self.endpoint} stopped answering ({stage}, {self.timeout:g} s)") from None
            except ConnectionResetError:  # closed with our request unread: as good as closed
                raise EOFError(stage) from None
            except OSError as e:
                raise WorkerError(f"worker {self.endpoint}: the connection failed ({stage}: {e.strerror or e})") from None
            if not chunk:
                raise EOFError(stage)
            out += chunk
        return out

    def call(self, cmd: int, payload: bytes, stage: str) -> bytes:
        try:
            self.sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
        except OSError as e:
            raise WorkerError(f"worker {self.endpoint}: the connection failed ({stage}: {e.strerror or e})") from None
        (size,) = struct.unpack("<Q", self._recv(8, stage))
        if size > 1 << 16:
            raise _not_a_worker(self.endpoint, f"a {stage} answer of {size} bytes")
        return self._recv(size, stage)


def _not_a_worker(endpoint: str, what: str) -> WorkerError:
    return WorkerError(f"worker {endpoint} is not a llama.cpp RPC worker ({what})")


def _hello(conn: _Conn, ours: tuple[int, int, int] | None) -> tuple[int, int, int]:
    try:
        answer = conn.call(CMD_HELLO, bytes(CONN_CAPS_SIZE), "hello")
    except EOFError:
        return _legacy_hello(conn.endpoint, conn.timeout, ours)
    if len(answer) not in (3, 4 + CONN_CAPS_SIZE):  # protocol 3..6: major, minor, patch; 7: + pad and caps
        raise _not_a_worker(conn.endpoint, f"a handshake of {len(answer)} bytes")
    return tuple(answer[:3])


def _legacy_hello(endpoint: str, timeout: float, ours) -> tuple[int, int, int]:
    """A worker of protocol 3..6 closes a connection whose HELLO carries caps (it expects none): ask it
    again the old way, to name its version."""
    conn = _Conn(endpoint, timeout)
    try:
        answer = conn.call(CMD_HELLO, b"", "hello")
    except EOFError:
        raise _not_a_worker(endpoint, "it closed the connection at the handshake") from None
    finally:
        conn.close()
    if len(answer) != 3:
        raise _not_a_worker(endpoint, f"a handshake of {len(answer)} bytes")
    return tuple(answer)


def probe(endpoint: str, timeout: float = 5.0) -> Worker:
    """Ask a worker who it is: its RPC protocol version, its devices and their memory. The connection is
    closed afterwards (a worker serves one client at a time). WorkerError, one line, on any failure."""
    from .llamacpp import rpc_protocol

    endpoint = parse_endpoint(endpoint)
    ours = rpc_protocol()
    conn = _Conn(endpoint, timeout)
    try:
        start = time.perf_counter()
        version = _hello(conn, ours)
        rtt = time.perf_counter() - start
        if ours is not None and not compatible(version, ours):
            raise WorkerError(f"worker {endpoint} speaks RPC protocol {_version(version)}, this localmix's llama.cpp "
                              f"{_version(ours)}; install the same llama-cpp-python on both")
        start = time.perf_counter()
        (count,) = struct.unpack("<I", _exact(conn.call(CMD_DEVICE_COUNT, b"", "device count"), 4, endpoint))
        rtt = min(rtt, time.perf_counter() - start)
        if not 1 <= count <= MAX_DEVICES:
            raise _not_a_worker(endpoint, f"{count} devices")
        devices = []
        for i in range(count):
            answer = conn.call(CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), "device memory")
            free, total = struct.unpack("<QQ", _exact(answer, 16, endpoint))
            devices.append(WorkerDevice(i, "cpu" if i == count - 1 else "gpu", free, total))
    except EOFError as e:
        raise WorkerError(f"worker {endpoint} closed the connection ({e})") from None
    finally:
        conn.close()
    return Worker(endpoint, version, tuple(devices), rtt)


def _exact(answer: bytes, n: int, endpoint: str) -> bytes:
    if len(answer) != n:
        raise _not_a_worker(endpoint, f"an answer of {len(answer)} bytes where {n} were due")
    return answer


# -- the link ---------------------------------------------------------------------------------------------

LINK_BYTES = 256 << 20  # weights read there per measurement: more than a worker's caches hold
LINK_TIMEOUT = 120.0
LINK_CACHE = "rpc-links.json"
_FATAL = "localmix-rpc-fatal: "

# The child: llama.cpp's RPC client aborts the process on any failure, so the measurement runs here, its
# abort message marked on stderr for the parent.
_CHILD = (
    "import json, sys\n"
    "from localmix import llamacpp\n"
    f"llamacpp.on_fatal(lambda m: print({_FATAL!r} + ' '.join(m.split()), file=sys.stderr, flush=True))\n"
    "hop, bw = llamacpp.link_probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))\n"
    "print(json.dumps({'hop_seconds': hop, 'bandwidth': bw}))\n"
)


@dataclass(frozen=True)
class Link:
    hop_seconds: float  # one layer hop there and back: activations in, the graph run, the result out
    bandwidth: float  # bytes/s the worker's device reads weights at (Q4_K, its threads)


def measure_link(endpoint: str, device: int = 0, *, again: bool = False) -> Link:
    """The link to a worker's device, measured once through llama.cpp's RPC client (in a child: see
    llamacpp.link_probe) and kept per (endpoint, device, its total memory) in localmix's cache;
    `again` measures anew. WorkerError on any failure."""
    endpoint = parse_endpoint(endpoint)
    worker = probe(endpoint)
    if not 0 <= device < len(worker.devices):
        raise WorkerError(f"worker {endpoint} has {len(worker.devices)} device(s); there is no device {device}")
    key = f"{endpoint} {device} {worker.devices[device].total}"
    cached = _read_links()
    if not again and key in cached:
        try:
            return Link(float(cached[key]["hop_seconds"]), float(cached[key]["bandwidth"]))
        except (TypeError, KeyError, ValueError):
            pass  # a damaged entry: measured again
    nbytes = max(1 << 20, min(LINK_BYTES, worker.devices[device].free // 4))
    link = _measure_in_child(endpoint, device, nbytes)
    cached[key] = {"hop_seconds": link.hop_seconds, "bandwidth": link.bandwidth, "at": time.time()}
    _write_links(cached)
    return link


def _measure_in_child(endpoint: str, device: int, nbytes: int) -> Link:
    import json
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, endpoint, str(device), str(nbytes)], capture_output=True,
                           text=True, timeout=LINK_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"worker {endpoint}: measuring the link took over {LINK_TIMEOUT:g} s; give "
                          "--rpc-network and --rpc-bandwidth instead") from None
    fatal = [x[len(_FATAL):] for x in r.stderr.splitlines() if x.startswith(_FATAL)]
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
        link = Link(float(out["hop_seconds"]), float(out["bandwidth"]))
    except (TypeError, KeyError, ValueError, IndexError):
        why = fatal[-1] if fatal else (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise WorkerError(f"worker {endpoint}: the link measurement failed (llama.cpp: {shown(why, 300)})") from None
    if not (link.hop_seconds > 0 and link.bandwidth > 0):
        raise WorkerError(f"worker {endpoint}: the link measurement gave no usable numbers ({link})")
    return link


def _links_path():
    from .paths import cache_dir

    return cache_dir() / LINK_CACHE


def _read_links() -> dict:
    import json

    try:
        data = json.loads(_links_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_links(data: dict) -> None:
    """Beside the target, then renamed: a reader never sees half a file. A cache that cannot be written
    is only a measurement repeated next time."""
    import json
    import os
    import tempfile

    from .paths import ensure_dir

    path = _links_path()
    tmp = None
    try:
        ensure_dir(path.parent, "localmix's cache folder")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".rpc-links-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except (OSError, LocalmixError):
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)

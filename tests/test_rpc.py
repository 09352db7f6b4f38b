"""localmix.rpc and the RPC side of localmix.llamacpp against real `localmix worker` processes on
127.0.0.1: endpoints, probes (running, not running, busy, other protocol versions, not a worker), a model
with experts on two workers answering as the local load does, the link measured and cached."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from importlib.metadata import version

import pytest

from localmix import llamacpp, rpc
from localmix.errors import WorkerError
from tests.support.workers import free_port, workers


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    with workers(2, threads=1, cache=tmp_path_factory.mktemp("rpc-cache")) as ws:
        yield ws


def one_line(e: pytest.ExceptionInfo, *parts: str) -> bool:
    text = str(e.value)
    return "\n" not in text and all(p in text for p in parts)


# -- endpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "endpoint"), [
    ("127.0.0.1:50111", "127.0.0.1:50111"), ("box", "box:50052"), (" 10.0.0.2:7 ", "10.0.0.2:7"),
    ("gpu-box.lan:00080", "gpu-box.lan:80"),
])
def test_endpoints(text, endpoint):
    assert rpc.parse_endpoint(text) == endpoint


@pytest.mark.parametrize(("text", "says"), [
    ("[::1]:50052", "IPv4 only"), ("::1", "IPv4 only"), ("box:0", "1 to 65535"), ("box:70000", "1 to 65535"),
    ("box:x", "1 to 65535"), ("box:", "1 to 65535"), ("", "HOST:PORT"), (":5", "HOST:PORT"), ("a b:5", "HOST:PORT"),
    ("-box:5", "HOST:PORT"), ("box\x1b[31m:5", "\\x1b"),
])
def test_bad_endpoints_are_one_line(text, says):
    with pytest.raises(WorkerError) as e:
        rpc.parse_endpoint(text)
    assert one_line(e, says)


def test_endpoint_lists():
    assert rpc.parse_endpoints("a:1,b") == ("a:1", "b:50052")
    with pytest.raises(WorkerError) as e:
        rpc.parse_endpoints("a,b:2,a:50052")
    assert one_line(e, "a:50052 is named twice")


# -- probes -----------------------------------------------------------------------------------------------


def test_probe_reads_version_and_memory_of_a_live_worker(two):
    import psutil

    w = rpc.probe(two[0].endpoint)
    assert w.endpoint == two[0].endpoint
    assert w.version == llamacpp.rpc_protocol() == llamacpp.RPC_PROTOCOLS[version("llama_cpp_python")]
    assert [(d.index, d.kind) for d in w.devices] == [(0, "cpu")]  # no GPU here: the CPU, last
    (cpu,) = w.devices
    assert 0 < cpu.free <= cpu.total and abs(cpu.total - psutil.virtual_memory().total) < 0.1 * cpu.total
    assert 0 < w.rtt < 1.0


def test_a_worker_not_running_is_one_line_naming_it():
    port = free_port()
    with pytest.raises(WorkerError) as e:
        rpc.probe(f"127.0.0.1:{port}", timeout=2)
    assert one_line(e, f"worker 127.0.0.1:{port} is not running", f"localmix worker --host 127.0.0.1 --port {port}")


def test_a_busy_worker_says_so_and_serves_again_when_free(two):
    host, port = rpc.split_endpoint(two[1].endpoint)
    held = socket.create_connection((host, port), timeout=5)  # another client, handshake done, staying
    held.sendall(struct.pack("<BQ", rpc.CMD_HELLO, rpc.CONN_CAPS_SIZE) + bytes(rpc.CONN_CAPS_SIZE))
    assert len(_exactly(held, 8 + 28)) == 8 + 28
    try:
        start = time.monotonic()
        with pytest.raises(WorkerError) as e:
            rpc.probe(two[1].endpoint, timeout=0.5)
        assert one_line(e, two[1].endpoint, "answers no handshake", "one client at a time")
        assert time.monotonic() - start < 5
    finally:
        held.close()
    assert rpc.probe(two[1].endpoint).version == llamacpp.rpc_protocol()


def _peer(answer) -> str:
    """Something else listening on 127.0.0.1: `answer(conn, attempt)` per connection (two at most; the
    thread ends by itself within seconds)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    server.settimeout(10)

    def serve():
        with server:
            for attempt in range(2):
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    return
                with conn:
                    conn.settimeout(5)
                    answer(conn, attempt)
                server.settimeout(2)  # a second connection comes at once, or not at all

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


def _exactly(conn, n: int) -> bytes:
    out = b""
    while len(out) < n and (chunk := conn.recv(n - len(out))):
        out += chunk
    return out


def _read_hello(conn) -> int:
    cmd, size = struct.unpack("<BQ", _exactly(conn, 9))
    assert cmd == rpc.CMD_HELLO
    _exactly(conn, size)
    return size


def _version_7_format(major, minor, patch):
    def answer(conn, attempt):
        _read_hello(conn)
        conn.sendall(struct.pack("<Q", 28) + bytes([major, minor, patch, 0]) + bytes(24))
    return answer


def _legacy(major, minor, patch):
    """A worker of protocol 3..6: a HELLO with caps is refused (connection closed), one without answered."""
    def answer(conn, attempt):
        if _read_hello(conn) == 0:
            conn.sendall(struct.pack("<Q", 3) + bytes([major, minor, patch]))
    return answer


@pytest.mark.parametrize(("answer", "says"), [
    (_version_7_format(6, 0, 0), "speaks RPC protocol 6.0.0, this localmix's llama.cpp 7.0.0"),
    (_version_7_format(7, 1, 0), "speaks RPC protocol 7.1.0, this localmix's llama.cpp 7.0.0"),
    (_legacy(3, 0, 0), "speaks RPC protocol 3.0.0, this localmix's llama.cpp 7.0.0"),
    (lambda conn, attempt: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), "is not a llama.cpp RPC worker"),
    (lambda conn, attempt: None, "closed the connection at the handshake"),
])
def test_other_peers_are_one_line(answer, says):
    assert llamacpp.rpc_protocol() == (7, 0, 0)  # the messages below name it
    endpoint = _peer(answer)
    with pytest.raises(WorkerError) as e:
        rpc.probe(endpoint, timeout=5)
    assert one_line(e, f"worker {endpoint}", says)


def test_an_older_minor_of_the_same_major_is_accepted():
    assert rpc.compatible((7, 0, 3), (7, 1, 0)) and not rpc.compatible((7, 2, 0), (7, 1, 0))
    assert not rpc.compatible((6, 0, 0), (7, 0, 0))


# -- loads ------------------------------------------------------------------------------------------------


def _greedy(engine, n: int = 24) -> list[int]:
    tokens = [engine.bos, *engine.tokenize("The capital of France is", special=False)]
    out = []
    for t in engine.sample(tokens, temperature=0.0, top_p=1.0, seed=1):
        out.append(t)
        if len(out) == n:
            break
    return out


def _load(path, **kw):
    # No repacking: a worker keeps its weights as stored, so the local CPU must too for the same sums.
    return llamacpp.Engine.load(path, n_gpu_layers=0, cpu_patterns=[], ctx=256, threads=1, flash_attn=False, repack=False, **kw)


def test_experts_on_two_workers_give_the_local_tokens(smol, two):
    """The workers run the same CPU kernels on the same bytes: the greedy tokens are the same ones, not
    merely close (no near-tie to fall either way)."""
    local = _load(smol)
    try:
        expected = _greedy(local)
    finally:
        local.close()
    for w in two:
        rpc.probe(w.endpoint)
    patterns = {(two[0].endpoint, 0): [r"^blk\.(1|3|5|7)\.ffn_(up|gate|down)_exps\.weight$"],
                (two[1].endpoint, 0): [r"^blk\.(2|4|6|8)\.ffn_(up|gate|down)_exps\.weight$"]}
    engine = _load(smol, rpc_patterns=patterns)
    try:
        placed = [x for x in engine.log if "buffer type overridden to RPC" in x]
        assert len(placed) == 8 * 3  # 8 layers' gate, up and down experts
        assert sum(f"RPC0[{two[0].endpoint}]" in x for x in placed) == 12
        assert sum(f"RPC0[{two[1].endpoint}]" in x for x in placed) == 12
        assert _greedy(engine) == expected
    finally:
        engine.close()
    assert rpc.probe(two[0].endpoint)  # the model's connections are closed: the worker serves again


def test_a_device_a_worker_does_not_have_is_one_line(smol, two):
    with pytest.raises(WorkerError) as e:
        _load(smol, rpc_patterns={(two[0].endpoint, 3): [r"^blk\.1\.ffn_up_exps\.weight$"]})
    assert one_line(e, f"worker {two[0].endpoint} has 1 device(s); there is no device 3")


def test_on_fatal_hears_why_llama_cpp_aborts():
    """llama.cpp's RPC client aborts the process on a worker it cannot reach: the callback hears the
    reason first (without ggml's source file), then the process dies."""
    port = free_port()
    code = ("import sys\nfrom localmix import llamacpp\n"
            "llamacpp.on_fatal(lambda m: print('FATAL ' + m, file=sys.stderr, flush=True))\n"
            f"llamacpp.rpc_device('127.0.0.1:{port}', 0)\nprint('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not reached" not in r.stdout
    assert f"FATAL Failed to connect to 127.0.0.1:{port}" in r.stderr.splitlines()


# -- the link ---------------------------------------------------------------------------------------------


def test_measure_link_is_sane_and_cached(two):
    start = time.monotonic()
    link = rpc.measure_link(two[0].endpoint)
    first = time.monotonic() - start
    assert 1e-6 < link.hop_seconds < 0.05  # loopback: a fraction of a millisecond on an idle machine
    assert 1e8 < link.bandwidth < 1e12  # a CPU thread reading Q4_K weights: gigabytes per second
    start = time.monotonic()
    assert rpc.measure_link(two[0].endpoint) == link  # from the cache, without a child
    assert time.monotonic() - start < first
    assert rpc._links_path().is_file()
    again = rpc.measure_link(two[0].endpoint, again=True)
    assert again.hop_seconds > 0 and again.bandwidth > 0


def test_measure_link_of_a_worker_not_running_is_one_line():
    port = free_port()
    with pytest.raises(WorkerError) as e:
        rpc.measure_link(f"127.0.0.1:{port}")
    assert one_line(e, f"worker 127.0.0.1:{port} is not running")

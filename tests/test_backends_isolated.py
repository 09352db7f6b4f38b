"""The llama.cpp backend in a child process (backends/isolated.py), on the smol fixture with real llama.cpp.
A worker's failure is an abort of the child; here a SIGKILL of the child stands in for it where no worker
is needed, and real `localmix worker` processes on 127.0.0.1 are killed where one is."""

import dataclasses
import os
import re
import signal
import threading
import time

import pytest

from localmix import prompt
from localmix.backends import Done, Sampling, Text
from localmix.backends import isolated as isolated_module
from localmix.backends.isolated import IsolatedBackend, abort_reason, rebuilt, stopped_error
from localmix.backends.llama import LlamaBackend
from localmix.errors import ContextFull, LocalmixError, NotInStore, WorkerError
from localmix.model_info import read_model_info
from localmix.planner import Budget, Remote, plan
from localmix.units import GiB
from tests.support.workers import workers

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon."}]
GREEDY = Sampling(max_tokens=24, temperature=0)


def local_plan(path, ctx=1024):
    info = read_model_info(path)
    return info, plan(info, Budget(vram=0, ram=16 * GiB), ctx)


def events(b, msgs, sampling=GREEDY):
    out = list(b.generate(prompt.encode(b.info.prompt, b.tokenizer, msgs), sampling))
    assert isinstance(out[-1], Done) and all(isinstance(e, Text) for e in out[:-1])
    return "".join(e.text for e in out[:-1]), out[-1].stats


def gone(pid: int) -> bool:
    """Ended and reaped: no zombie left behind."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture(scope="module")
def local_reply(smol):
    """The greedy reply of an in-process LlamaBackend, and its stats."""
    info, p = local_plan(smol)
    b = LlamaBackend(info, p, ctx=1024, threads=1, repack=False)
    b.load()
    try:
        return events(b, FRANCE)
    finally:
        b.close()


@pytest.fixture(scope="module")
def isolated(smol):
    info, p = local_plan(smol)
    b = IsolatedBackend(info, p, ctx=1024, threads=1, repack=False)
    progress = []
    b.load(progress.append)
    assert progress and progress[-1] == 1.0 and b.load_log and b.pid
    yield b
    pid = b.pid
    b.close()
    assert b.pid is None and gone(pid)


def test_the_reply_is_the_in_process_one(isolated, local_reply):
    text, stats = events(isolated, FRANCE)
    assert (text, stats.gen_tokens, stats.prompt_tokens, stats.stop) == (local_reply[0], *[getattr(local_reply[1], k) for k in
                                                                                          ("gen_tokens", "prompt_tokens", "stop")])
    assert text and stats.ctx_total == 1024 and stats.ttft > 0
    again, second = events(isolated, FRANCE)  # the child keeps its KV cache between requests
    assert again == text and second.cached_tokens == stats.prompt_tokens - 1


def test_errors_cross_as_their_own_class(isolated):
    with pytest.raises(ContextFull):
        list(isolated.generate(list(range(1024)), GREEDY))
    tokens = prompt.encode(isolated.info.prompt, isolated.tokenizer, FRANCE)
    with pytest.raises(LocalmixError, match="cannot parse the grammar"):
        list(isolated.generate(tokens, GREEDY, grammar="root ::= ("))
    assert events(isolated, FRANCE)[0]  # still in step
    e = rebuilt(("error", "NotInStore", "x:Q4 is not in the store"))
    assert type(e) is NotInStore and str(e) == "x:Q4 is not in the store"
    assert type(rebuilt(("error", "NoSuchError", "m"))) is LocalmixError
    assert isinstance(rebuilt(("crash", "KeyError", "Traceback ...")), RuntimeError)


def test_cancel_stops_a_reply_and_the_next_one_runs(isolated):
    story = prompt.encode(isolated.info.prompt, isolated.tokenizer, STORY)
    got = []
    for event in isolated.generate(story, Sampling(max_tokens=400, temperature=0.8, seed=3)):
        got.append(event)
        if len(got) == 5:
            threading.Thread(target=isolated.cancel).start()
    assert got[-1].stats.stop == "cancelled" and got[-1].stats.gen_tokens <= 12
    isolated.cancel()  # nothing runs: a no-op
    assert events(isolated, FRANCE)[1].stop != "cancelled"


def test_cancel_stops_the_prompt_being_evaluated(isolated):
    long = prompt.encode(isolated.info.prompt, isolated.tokenizer,
                         [{"role": "user", "content": "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 80}])
    assert 700 < len(long) < 1000
    threading.Timer(0.05, isolated.cancel).start()  # likely before the child has begun: it is repeated there
    *texts, done = isolated.generate(long, Sampling(max_tokens=8, temperature=0))
    assert done.stats.stop == "cancelled" and not texts
    assert done.stats.prompt_tokens < len(long) - 256


def test_an_abandoned_reply_leaves_the_pipe_in_step(isolated, local_reply):
    # Plain text with no chat template: it shares no prefix with the question's prompt, so the question is
    # evaluated whole, as the reference's was (a prompt partly from the cache may break a near-tie apart).
    story = isolated.tokenizer.tokenize("Once upon a time, in a land far away, there lived", special=False)
    for n, _ in enumerate(isolated.generate(story, Sampling(max_tokens=400, temperature=0.8, seed=1))):
        if n == 3:
            break
    assert events(isolated, FRANCE)[0] == local_reply[0]
    speed = isolated.measure(story, 4)
    assert speed.prefill_tps > 0 and speed.decode_tps > 0


def test_a_dead_child_is_one_line_and_the_next_request_starts_another(isolated, local_reply):
    """SIGKILL of the child in the middle of a reply stands in for llama.cpp's abort."""
    story = prompt.encode(isolated.info.prompt, isolated.tokenizer, STORY)
    pid = isolated.pid
    with pytest.raises(LocalmixError) as e:
        for n, _ in enumerate(isolated.generate(story, Sampling(max_tokens=400, temperature=0.8, seed=2))):
            if n == 2:
                os.kill(pid, 9)
    assert str(e.value) == "llama.cpp stopped during the reply (killed by SIGKILL)"
    assert isolated.pid is None and gone(pid)
    assert events(isolated, FRANCE)[0] == local_reply[0]  # a new child, loaded on demand
    assert isolated.pid not in (None, pid)


def test_close_is_safe_in_every_state(smol):
    info, p = local_plan(smol)
    fds = len(os.listdir("/proc/self/fd"))
    IsolatedBackend(info, p, ctx=1024).close()  # never loaded
    b = IsolatedBackend(info, p, ctx=1024, threads=1)
    b.cancel()  # before load: nothing to stop
    b.load()
    pid = b.pid
    tokens = prompt.encode(info.prompt, b.tokenizer, STORY)
    got = []
    t0 = time.monotonic()
    for event in b.generate(tokens, Sampling(max_tokens=400, temperature=0.8, seed=4)):
        got.append(event)
        if len(got) == 2:
            threading.Thread(target=b.close).start()  # from another thread, mid-reply
    assert got[-1].stats.stop == "cancelled" and time.monotonic() - t0 < 10
    b.close()
    b.cancel()
    assert gone(pid) and b.pid is None
    with pytest.raises(LocalmixError, match="closed"):
        list(b.generate(tokens, GREEDY))
    assert len(os.listdir("/proc/self/fd")) <= fds  # no pipe left open


def test_messages():
    assert abort_reason("/src/ggml-rpc.cpp:640: Remote RPC server crashed or returned malformed response", -6) == \
        "Remote RPC server crashed or returned malformed response"
    assert abort_reason(None, -9) == "killed by SIGKILL" and abort_reason(None, 3) == "exit status 3"
    w = ("127.0.0.1:5001", "127.0.0.1:5002")
    assert str(stopped_error("during the reply", "x", w, ["127.0.0.1:5002"])) == \
        "worker 127.0.0.1:5002 stopped answering during the reply (llama.cpp: x)"
    assert isinstance(stopped_error("during the reply", "x", w, []), WorkerError)
    assert str(stopped_error("during the reply", "x", (), [])) == "llama.cpp stopped during the reply (x)"


# -- with real workers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    with workers(2, threads=1) as ws:
        yield ws


def remote_plan(path, endpoints):
    """The local plan with the experts of layers 1, 4, 7... on the first worker's CPU and of layers 2, 5,
    8... on the second's (a localmix worker without a GPU serves its CPU as device 0)."""
    info, p = local_plan(path)
    remotes = tuple(Remote(e, 0, "cpu", 4 * GiB) for e in endpoints)
    experts = [t.name for t in info.tensors if t.role == "expert"]
    remote = {r.name: tuple(n for n in experts if int(n.split(".")[1]) % 3 == i + 1) for i, r in enumerate(remotes)}
    return info, dataclasses.replace(p, remote=remote, remotes=remotes)


@pytest.fixture(scope="module")
def remote_backend(smol, pair):
    info, p = remote_plan(smol, [w.endpoint for w in pair])
    b = IsolatedBackend(info, p, ctx=1024, threads=1, repack=False)
    b.load()
    yield b
    b.close()


def test_experts_on_two_workers_give_the_local_reply(remote_backend, local_reply):
    """Token for token, by construction: neither side repacks (a worker runs its weights as stored; the
    local CPU's repacked kernels would sum in another order), so the same kernels run on the same bytes."""
    placed = {}
    for line in remote_backend.load_log:
        if m := re.search(r"tensor (\S+) .*buffer type overridden to (RPC\S+)", line):
            placed.setdefault(m[2], set()).add(m[1])
    assert placed == {name: set(names) for name, names in remote_backend.plan.remote.items()} and len(placed) == 2
    text, stats = events(remote_backend, FRANCE)
    assert (text, stats.gen_tokens) == (local_reply[0], local_reply[1].gen_tokens)  # token for token


def test_a_worker_killed_mid_reply_then_down_then_back(remote_backend, pair, local_reply):
    story = prompt.encode(remote_backend.info.prompt, remote_backend.tokenizer, STORY)
    pid = remote_backend.pid
    with pytest.raises(WorkerError) as e:
        for n, _ in enumerate(remote_backend.generate(story, Sampling(max_tokens=200, temperature=0.8, seed=5))):
            if n == 2:
                pair[1].kill()
    assert str(e.value).startswith(f"worker {pair[1].endpoint} stopped answering during the reply (llama.cpp: ")
    assert "\n" not in str(e.value) and gone(pid)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=f"worker {re.escape(pair[1].endpoint)} is not running"):
        events(remote_backend, FRANCE)
    assert time.monotonic() - t0 < 5 and remote_backend.pid is None  # no child started for it
    pair[1].restart()
    assert events(remote_backend, FRANCE)[0] == local_reply[0]


def test_a_worker_not_running_at_load_is_one_line_before_any_child(smol):
    info, p = remote_plan(smol, ["127.0.0.1:9", "127.0.0.1:11"])
    b = IsolatedBackend(info, p, ctx=1024)
    try:
        with pytest.raises(WorkerError, match="worker 127.0.0.1:9 is not running"):
            b.load()
        assert b.pid is None
    finally:
        b.close()


def test_a_cancel_of_a_reply_stuck_on_a_silent_worker_ends_it(remote_backend, pair, local_reply, monkeypatch):
    """A worker stopped (SIGSTOP: its connection stays open, nothing answers) leaves llama.cpp waiting
    forever; a cancel ends the reply anyway, after a grace period, and the worker serves again once it runs."""
    monkeypatch.setattr(isolated_module, "CANCEL_GRACE", 1.0)
    story = prompt.encode(remote_backend.info.prompt, remote_backend.tokenizer, STORY)
    got = []
    try:
        for event in remote_backend.generate(story, Sampling(max_tokens=200, temperature=0.8, seed=6)):
            got.append(event)
            if len(got) == 2:
                os.kill(pair[0].proc.pid, signal.SIGSTOP)
                threading.Timer(0.5, remote_backend.cancel).start()
        assert got[-1].stats.stop == "cancelled" and remote_backend.pid is None
    finally:
        os.kill(pair[0].proc.pid, signal.SIGCONT)
    assert events(remote_backend, FRANCE)[0] == local_reply[0]

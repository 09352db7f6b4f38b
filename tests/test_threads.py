"""Threads under load: the rule (pure, table-tested), other programs' load read from the real system
(psutil) with a real process spinning on one core, and a real llama.cpp context taking the choice at
each reply (read back with llama_n_threads), --threads winning. The machine is shared: assertions are
about the spinner's core, never that the rest of the machine is idle."""

import re
import subprocess
import sys
import time

import pytest

from localmix import hardware
from localmix.backends import Sampling
from localmix.backends.llama import LlamaBackend
from localmix.hardware import BUSY_CORE, Threads, auto_threads, choose_threads, other_load, physical_cores
from localmix.model_info import read_model_info
from localmix.planner import Budget, plan
from localmix.units import GiB


@pytest.mark.parametrize("physical, busy, threads", [
    (2, 0.0, 2),
    (2, 0.3, 2),  # a core 30% busy is not a busy core
    (2, BUSY_CORE, 2),
    (2, 0.8, 1),  # one at 80% is
    (2, 1.0, 1),
    (2, 1.4, 1),
    (2, 2.0, 1),  # never fewer than one
    (2, 7.5, 1),
    (8, 0.0, 8),
    (8, 1.0, 7),
    (8, 2.6, 5),
    (8, 3.2, 5),
    (1, 1.0, 1),
    (4, -0.1, 4),  # a negative delta (clock skew between reads) is no load
])
def test_the_rule(physical, busy, threads):
    t = choose_threads(physical, busy)
    assert (t.decode, t.batch, t.physical, t.given) == (threads, threads, physical, False)
    assert 1 <= t.decode <= physical


def test_describe():
    assert Threads(2, 2, 2, 0.1).describe() == "2 threads (2 cores, 0.1 busy)"
    assert Threads(1, 1, 2, 1.0).describe() == "1 thread (2 cores, 1.0 busy with other programs)"
    assert Threads(3, 3, 2, 0.0, given=True).describe() == "3 threads (--threads)"
    assert Threads(1, 2, 2, 1.0).describe() == "1 thread (2 for prompts) (2 cores, 1.0 busy with other programs)"


@pytest.fixture
def spinning():
    """A process keeping one core busy, as another program would."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    yield proc
    proc.kill()
    proc.wait()


def measured_load(seconds: float = 1.0) -> float:
    other_load()  # starts the window
    time.sleep(seconds)
    return other_load()


def test_other_load_sees_a_busy_core(spinning):
    # The spinner gets about one core, less when the shared machine's other work competes for it.
    assert 0.6 <= measured_load() <= physical_cores() + 1


def test_other_load_leaves_out_this_process():
    """This process's own busy thread (as llama.cpp's spinning threads) is not another program's load:
    the system saw it, other_load() does not count it."""
    import threading

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    other_load()
    before = hardware._last["sample"]
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(1.0)
        load = other_load()
    finally:
        stop.set()
        t.join()
    after = hardware._last["sample"]
    wall = after.at - before.at
    own = (after.own - before.own) / wall
    assert own >= 0.1  # the thread spun (on a busy shared machine, whatever share of a core it got)
    # Never below zero: the system's and the process's CPU times tick separately, so with nothing else running
    # their difference can come out a little negative.
    assert load == pytest.approx(max(0.0, (after.system_busy - before.system_busy) / wall - own))


def test_other_load_does_not_wait_on_the_reply_path():
    other_load()
    time.sleep(hardware.MIN_WINDOW)
    t = time.perf_counter()
    for _ in range(5):
        other_load()
    assert time.perf_counter() - t < 0.1


def test_auto_threads_leaves_the_busy_core(spinning):
    measured_load()
    t = auto_threads()
    assert t.decode == t.batch == max(1, physical_cores() - 1) if physical_cores() <= 2 else t.decode < physical_cores()
    assert t.busy >= 0.6 and not t.given
    assert auto_threads(3) == Threads(3, 3, physical_cores(), 0.0, given=True)


def backend(path, threads):
    info = read_model_info(path)
    b = LlamaBackend(info, plan(info, Budget(vram=0, ram=16 * GiB), 256), ctx=256, threads=threads)
    b.load()
    return b


def reply(b, n=4):
    list(b.generate(b.tokenizer.tokenize("The capital of France is", special=False), Sampling(max_tokens=n, temperature=0)))


def test_automatic_threads_are_set_at_each_reply(tiny_gguf, spinning):
    b = backend(tiny_gguf("Q8_0"), None)
    try:
        b.engine.set_threads(5, 5)  # what llama.cpp ran with before this reply, whatever it was
        measured_load()
        reply(b)
        now = b.threads_now
        assert b.engine.threads == (now.decode, now.batch) != (5, 5)
        if physical_cores() == 2:
            assert now.decode == 1  # the spinner has the other core
        b.measure(b.tokenizer.tokenize("one two three", special=False), 2)
        assert b.engine.threads == (b.threads_now.decode, b.threads_now.batch)
    finally:
        b.close()


def test_given_threads_win(tiny_gguf, spinning):
    b = backend(tiny_gguf("Q8_0"), 2)
    try:
        assert b.engine.threads == (2, 2) and b.threads_now.given
        measured_load()
        reply(b)
        assert b.engine.threads == (2, 2) and b.threads_now.describe() == "2 threads (--threads)"
    finally:
        b.close()


def test_run_verbose_shows_the_choice(tiny_gguf):
    from tests.support.cli import run_cli

    r = run_cli("run", str(tiny_gguf("Q8_0")), "hi", "--max-tokens", "2", "--ctx", "256", "--verbose")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^threads: +[12] threads? \(\d+ cores, \d+\.\d busy", r.stderr, re.M), r.stderr
    r = run_cli("run", str(tiny_gguf("Q8_0")), "hi", "--max-tokens", "2", "--ctx", "256", "--verbose", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^threads: +2 threads \(--threads\)$", r.stderr, re.M), r.stderr

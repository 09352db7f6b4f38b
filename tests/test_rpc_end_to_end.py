"""Experts on workers (issue 14), end to end: the chat app and the server when a worker stops during a
reply, first with the scripted backend at the edge (it raises the WorkerError that backends/isolated.py
raises when its child dies; the app, engine and HTTP layer run for real), then with real `localmix worker`
processes on 127.0.0.1 and the `smol` model: the same greedy reply as a local run, the plan's worker
columns, a worker that is not running, and one killed during a request of `serve` and of the chat app."""

from __future__ import annotations

import json
import shlex
import time

import openai
import pytest

from localmix.errors import WorkerError
from localmix.server.app import Model
from tests.support.cli import one_line_error, run_cli
from tests.support.fake_backend import FakeBackend
from tests.support.server import serving
from tests.support.workers import free_port, workers
from tests.test_app_chat import errors, make_app, send, wait_idle
from tests.test_server_http import QUESTION, client, is_error, post, raw

STOPPED = "worker 127.0.0.1:1 stopped answering during the reply (llama.cpp: Remote RPC server crashed or returned malformed response)"


class StoppingBackend(FakeBackend):
    """The scripted backend whose worker stops after `after` words of the next `times` replies."""

    def __init__(self, after: int, times: int = 1):
        super().__init__()
        self.after, self.times = after, times

    def generate(self, tokens, sampling, grammar=None):
        failing = self.times > 0
        self.times -= failing
        for i, event in enumerate(super().generate(tokens, sampling, grammar)):
            if failing and i == self.after:
                raise WorkerError(STOPPED)
            yield event


# -- at the edge: the scripted backend raises what the isolated backend raises -----------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("after", [0, 3])
async def test_chat_shows_a_stopped_worker_and_answers_the_next_message(tmp_path, after):
    app, backend, store = make_app(tmp_path, StoppingBackend(after))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await send(pilot, "hello there friend")
        assert app.is_running and errors(app) == [f"Error: {STOPPED}"]
        kept = [(m.content, m.complete) for m in store.messages(app.chat.id)]
        if after:  # the words before it are kept, marked cut off
            assert kept == [("hello there friend", True), ("reply 1 to", False)]
        else:  # nothing written: the message goes back to the prompt, to send again
            assert kept == [] and app.query_one("#prompt").text == "hello there friend"
            app.query_one("#prompt").text = ""
        await send(pilot, "again")
        assert store.messages(app.chat.id)[-1].content == "reply 2 to again"
        assert len(errors(app)) == 1


def test_server_answers_a_stopped_worker_with_502_and_serves_the_next_request():
    backend = StoppingBackend(3, times=2)
    model = Model("fake", aliases={"fake"}, state="ready", backend=backend)
    with serving(model) as url:
        got = []
        with pytest.raises(openai.APIError) as e:  # streaming had started: an error event ends the stream
            for ch in client(url).chat.completions.create(model="fake", messages=QUESTION, stream=True):
                got.append(ch.choices[0].delta.content or "")
        assert "".join(got) == "reply 1 to" and e.value.message == STOPPED
        assert e.value.body["code"] == "worker_error"
        status, _, body = post(url, {"model": "fake", "messages": QUESTION})
        assert status == 502 and is_error(body, "worker_error") and body["error"]["message"] == STOPPED
        assert raw(url, "GET", "/health")[0] == 200
        status, _, body = post(url, {"model": "fake", "messages": QUESTION})
        assert status == 200 and body["choices"][0]["message"]["content"].startswith("reply 3 to"), json.dumps(body)


# -- real workers: two `localmix worker --threads 1` on 127.0.0.1, the smol model --------------------------

QUESTION_RUN = "What is the capital of France?"
GREEDY = ("--temperature", "0", "--seed", "1", "--max-tokens", "24", "--ctx", "1024", "--vram", "0")
REMOTE_LAYERS = 20  # of smol's 30: their experts go to the workers


@pytest.fixture(scope="module")
def pair():
    """Two workers for the module. A worker serves one client at a time: the tests that run `localmix`
    come first; `live` (a model loaded on them for the rest of the module) after."""
    with workers(2, threads=1) as ws:
        yield ws


@pytest.fixture(scope="module")
def budget(smol) -> tuple[int, int]:
    """(RAM, each worker's RAM): the RAM holds smol without REMOTE_LAYERS layers' experts (and half a layer
    to spare); each worker holds 2/3 of those layers' experts, so both get some."""
    from localmix.loader import prepare

    p = prepare(smol, vram=0, ctx=1024)
    layer = max(sum(t.nbytes for t in p.info.tensors if t.role == "expert" and t.layer == i) for i in range(p.info.n_layer))
    return sum(p.plan.ram.values()) - REMOTE_LAYERS * layer + layer // 2, 2 * REMOTE_LAYERS * layer // 3


def rpc_args(pair, budget: tuple[int, int], endpoints: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """--rpc and a budget for each worker: planned as loopback workers without measuring the link."""
    ram, each = budget
    return ("--rpc", ",".join(endpoints or [w.endpoint for w in pair]), "--ram", f"{ram}b", "--rpc-ram", f"{each}b",
            "--rpc-network", "loopback")


def test_plan_shows_a_column_per_worker_and_their_flags(smol, pair, budget):
    endpoints = ",".join(w.endpoint for w in pair)
    r = run_cli("plan", str(smol), "--vram", "0", "--ctx", "1024", "--rpc", endpoints, "--ram", f"{budget[0]}b")  # probed, measured
    assert r.returncode == 0 and all(f"Worker RPC0[{w.endpoint}]" in r.stdout for w in pair), r.stdout + r.stderr
    r = run_cli("plan", str(smol), "--vram", "0", "--ctx", "1024", *rpc_args(pair, budget))
    assert r.returncode == 0 and all(f"RPC0[{w.endpoint}]" in r.stdout for w in pair), r.stdout + r.stderr  # a column each
    args = run_cli("plan", str(smol), "--vram", "0", "--ctx", "1024", "--llama-args", *rpc_args(pair, budget)).stdout
    args = shlex.split(args)
    assert args[args.index("--rpc") + 1] == ",".join(w.endpoint for w in pair)
    targets = [a.rpartition("=")[2] for i, a in enumerate(args) if i and args[i - 1] == "-ot" and "RPC" in a]
    assert set(targets) == {f"RPC0[{w.endpoint}]" for w in pair}  # some layers' experts on each


def test_run_with_experts_on_two_workers_prints_the_local_reply(smol, pair, budget):
    # --no-repack on both: a worker keeps its weights as stored, so the same kernels run on the same bytes.
    local = run_cli("run", str(smol), QUESTION_RUN, *GREEDY, "--no-repack")
    remote = run_cli("run", str(smol), QUESTION_RUN, *GREEDY, "--no-repack", *rpc_args(pair, budget))
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and local.stdout.strip()


def test_a_worker_that_is_not_running_is_one_line(smol, pair, budget):
    gone = f"127.0.0.1:{free_port()}"
    r = run_cli("run", str(smol), QUESTION_RUN, *GREEDY, *rpc_args(pair, budget, (pair[0].endpoint, gone)))
    assert one_line_error(r, f"worker {gone} is not running"), r.stderr


@pytest.fixture(scope="module")
def live(smol, pair, budget):
    """smol loaded with REMOTE_LAYERS layers' experts on the pair (an IsolatedBackend), as a server.app.Model."""
    from localmix.backends.isolated import IsolatedBackend
    from localmix.loader import prepare
    from localmix.server.app import load_model, model_for

    p = prepare(smol, vram=0, ram=budget[0], ctx=1024, rpc=tuple(w.endpoint for w in pair), rpc_ram=(budget[1],),
                rpc_network="loopback")
    assert {r.endpoint for r in p.plan.remotes} == {w.endpoint for w in pair}
    model = model_for(p)
    load_model(model, p, threads=1)
    assert isinstance(model.backend, IsolatedBackend)
    yield model
    model.backend.close()


LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message in a bottle."}]


def test_server_answers_a_worker_killed_mid_reply_with_an_error_then_serves_again(live, pair):
    victim = pair[0]
    with serving(live) as url:
        got = []
        with pytest.raises(openai.APIError) as e:
            for ch in client(url).chat.completions.create(model=live.name, messages=LONG, stream=True, max_tokens=400):
                got.append(ch.choices[0].delta.content or "")
                if len(got) == 2:
                    victim.kill()
        assert got and victim.endpoint in e.value.message and e.value.body["code"] == "worker_error"
        status, _, body = post(url, {"model": live.name, "messages": QUESTION, "max_tokens": 8})  # still down: at once
        assert status == 502 and is_error(body, "worker_error") and f"worker {victim.endpoint} is not running" in body["error"]["message"]
        victim.restart()
        reply = client(url).chat.completions.create(model=live.name, messages=QUESTION, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content.strip()
        assert raw(url, "GET", "/health")[0] == 200


@pytest.mark.anyio
async def test_chat_shows_a_worker_killed_mid_reply_and_stays_usable(tmp_path, live, pair):
    victim = pair[1]
    app, backend, store = make_app(tmp_path, live.backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        store.update_settings(app.chat.id, max_tokens=400)
        app.chat = store.chat(app.chat.id)
        prompt = app.query_one("#prompt")
        prompt.text = LONG[0]["content"]
        await pilot.press("enter")
        deadline = time.monotonic() + 60
        while not app._reply_text and app.generating and time.monotonic() < deadline:
            await pilot.pause(0.05)
        assert app.generating, "the reply ended before the worker could be killed"
        victim.kill()
        await wait_idle(pilot, timeout=60)
        assert app.is_running and len(errors(app)) == 1 and victim.endpoint in errors(app)[0]
        assert store.messages(app.chat.id)[-1].complete is False  # the text so far, kept as cut off
        victim.restart()
        await send_and_wait(pilot, "What is the capital of France?")
        last = store.messages(app.chat.id)[-1]
        assert last.role == "assistant" and last.complete and last.content.strip() and len(errors(app)) == 1


async def send_and_wait(pilot, text: str, timeout: float = 120) -> None:
    """send() with a wait long enough for a model loaded again on a restarted worker."""
    prompt = pilot.app.query_one("#prompt")
    prompt.text = text
    await pilot.press("enter")
    await wait_idle(pilot, timeout=timeout)

"""Experts on workers (issue 14), end to end: the chat app and the server when a worker stops during a
reply, first with the scripted backend at the edge (it raises the WorkerError that backends/isolated.py
raises when its child dies; the app, engine and HTTP layer run for real), then with real `localmix worker`
processes on 127.0.0.1 and the `smol` model: the same greedy reply as a local run, the plan's worker
columns, a worker that is not running, and one killed during a request of `serve` and of the chat app."""

from __future__ import annotations

import json

import openai
import pytest

from localmix.errors import WorkerError
from localmix.server.app import Model
from tests.support.fake_backend import FakeBackend
from tests.support.server import serving
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

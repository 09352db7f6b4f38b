"""The OpenAI-over-HTTP backend (`chat --server`) against a real localmix server on 127.0.0.1 (the smol
model, JSON tool protocol), with the official `openai` client as the second opinion; and its pure parts
(URLs, messages, server-sent events, tool-call deltas) on the shapes other servers send."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from localmix.backends import ChatBackend, Done, Sampling, Text, ToolCalls, ToolResult
from localmix.backends.openai import Calls, OpenAIBackend, openai_message, request_body, split_url, sse_data
from localmix.errors import LocalmixError, ToolCallError
from localmix.reply import reply
from localmix.tools import ToolSet, from_function, tool
from tests.support.server import serving

GREEDY = Sampling(max_tokens=24, temperature=0.0, seed=7)
ASK = [{"role": "user", "content": "What is the capital of France?"}]

# -- pure parts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "parts"), [
    ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080, "/v1")),
    ("http://127.0.0.1:8080/v1/", ("http", "127.0.0.1", 8080, "/v1")),
    ("localhost:11434", ("http", "localhost", 11434, "/v1")),
    ("https://example.org/api", ("https", "example.org", 443, "/api/v1")),
    ("http://[::1]:9000/v1", ("http", "::1", 9000, "/v1")),
])
def test_server_urls_with_or_without_v1(url, parts):
    assert split_url(url) == parts


@pytest.mark.parametrize("url", ["ftp://host/", "http://", "http://host:99999"])
def test_malformed_server_urls_are_one_line(url):
    with pytest.raises(LocalmixError, match="--server"):
        split_url(url)


def test_messages_and_tools_in_openai_shapes():
    call = {"id": "c1", "name": "add", "arguments": {"a": 1, "b": "é"}}
    msgs = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "3"}]
    assert [openai_message(m) for m in msgs] == [
        {"role": "system", "content": "s"},
        {"role": "assistant",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": "é"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    spec = {"name": "add", "description": "Add.", "parameters": {"type": "object"}}
    body = request_body("m", msgs, [spec], "add", Sampling(max_tokens=5, temperature=0.0, top_p=1.0, seed=3))
    assert body["tools"] == [{"type": "function", "function": spec}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert (body["stream"], body["stream_options"], body["max_tokens"], body["seed"]) == (True, {"include_usage": True}, 5, 3)
    assert request_body("m", msgs, [spec], "required", Sampling())["tool_choice"] == "required"
    plain = request_body("m", msgs, None, "auto", Sampling())
    assert "tools" not in plain and "tool_choice" not in plain and "seed" not in plain


def test_server_sent_events_as_they_come():
    lines = [b": keep-alive\n", b"data: {\"a\": 1}\n", b"\n", b"event: x\r\n", b"data: {\"b\":\r\n", b"data: 2}\r\n", b"\r\n",
             b"data: [DONE]\n", b"\n", b"data: {\"after\": 1}\n", b"\n"]
    assert list(sse_data(lines)) == ['{"a": 1}', '{"b":\n2}']


def test_tool_call_deltas_put_together():
    calls = Calls()  # OpenAI and Ollama: the id and name once, the arguments in pieces, by index
    calls.add([{"index": 0, "id": "call_a", "type": "function", "function": {"name": "add", "arguments": ""}}])
    calls.add([{"index": 0, "function": {"arguments": '{"a": '}}])
    calls.add([{"index": 1, "id": "call_b", "function": {"name": "now", "arguments": ""}}, {"index": 0, "function": {"arguments": "1}"}}])
    assert calls.calls() == [{"id": "call_a", "name": "add", "arguments": {"a": 1}}, {"id": "call_b", "name": "now", "arguments": {}}]
    broken = Calls()
    broken.add([{"index": 0, "id": "x", "function": {"name": "add", "arguments": '{"a": '}}])
    with pytest.raises(ToolCallError, match="add"):
        broken.calls()
    odd = Calls()  # shapes no server should send: no crash, one line
    odd.add(["junk", {"index": "x", "function": "nope", "id": 5}])
    with pytest.raises(ToolCallError, match="without a function name"):
        odd.calls()


# -- against a real server ----------------------------------------------------------------------------

CTX = 1024


@pytest.fixture(scope="module")
def model(smol_model):
    return smol_model  # conftest: smol loaded with a 1024-token context, for this module


@pytest.fixture(scope="module")
def server(smol_url):
    return smol_url


def connected(url, **kw) -> OpenAIBackend:
    backend = OpenAIBackend(url, **kw)
    backend.load()
    return backend


def test_load_lists_the_model_and_its_plan(server):
    backend = connected(server)
    assert isinstance(backend, ChatBackend)
    assert backend.model == backend.models[0]
    assert backend.ctx > 0 and backend.details["ctx"] == backend.ctx
    assert backend.details["plan"] and backend.details["split"]
    assert connected(server.rstrip("/") + "/v1", model=backend.model).model == backend.model


def test_a_model_the_server_does_not_have(server):
    with pytest.raises(LocalmixError) as e:
        connected(server, model="no-such-model")
    message = str(e.value)
    assert "no model no-such-model" in message and connected(server).model in message and "\n" not in message


def test_a_server_still_loading_is_waited_for(model):
    from localmix.server.app import Model

    loading = Model(model.name, aliases=set(model.aliases), details=dict(model.details), progress=0.25)
    with serving(loading) as url:
        def ready():
            loading.backend, loading.progress, loading.state = model.backend, 1.0, "ready"

        timer = threading.Timer(1.0, ready)
        timer.start()
        seen = []
        backend = OpenAIBackend(url)
        backend.load(seen.append)
        timer.join()
        assert seen[0] == 0.25 and seen[-1] == 1.0 and backend.ctx == CTX
        assert "".join(e.text for e in backend.chat(ASK, None, "auto", GREEDY) if isinstance(e, Text))
        loading.backend = None  # the module's model: not closed with this server


def test_a_server_whose_model_failed_to_load(model):
    from localmix.server.app import Model

    failed = Model(model.name, details=dict(model.details), state="failed", error="not enough memory for the KV cache")
    with serving(failed) as url:
        with pytest.raises(LocalmixError, match="could not load its model: not enough memory for the KV cache$"):
            connected(url)


def test_a_store_model_the_server_has_not_loaded(server, smol):
    from localmix.paths import models_dir

    (models_dir() / "other-model.gguf").symlink_to(smol)  # the server lists its store's models too
    with pytest.raises(LocalmixError, match="serves smollm2.*; other-model is in its store but not loaded"):
        connected(server, model="other-model")


def test_unreachable_server_is_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LocalmixError, match=rf"cannot reach the server at http://127.0.0.1:{port}: Connection refused$"):
        connected(f"http://127.0.0.1:{port}")


def test_api_key(model):
    with serving(model, api_key="sesame") as url:
        with pytest.raises(LocalmixError, match="needs an API key"):
            connected(url)
        with pytest.raises(LocalmixError, match="refused the API key"):
            connected(url, api_key="wrong")
        backend = connected(url, api_key="sesame")
        assert "".join(e.text for e in backend.chat(ASK, None, "auto", GREEDY) if isinstance(e, Text))


def test_streamed_reply_is_the_servers_reply(server):
    from openai import OpenAI

    backend = connected(server)
    list(backend.chat(ASK, None, "auto", GREEDY))  # the prompt is cached from here on: both below start from one state
    events = list(backend.chat(ASK, None, "auto", GREEDY))  # (a prompt evaluated whole or from the cache may break a near-tie apart)
    assert isinstance(events[-1], Done) and all(isinstance(e, Text) for e in events[:-1])
    client = OpenAI(base_url=f"{server}/v1", api_key="none")
    answer = client.chat.completions.create(model=backend.model, messages=ASK, max_tokens=24, temperature=0.0, seed=7)
    text = "".join(e.text for e in events[:-1])
    assert text and text == answer.choices[0].message.content
    stats = events[-1].stats
    assert stats.gen_tokens == answer.usage.completion_tokens
    assert stats.prompt_tokens + stats.cached_tokens == answer.usage.prompt_tokens
    assert stats.ctx_used == answer.usage.total_tokens and stats.ctx_total == backend.ctx
    assert stats.stop == {"stop": "eos", "length": "length"}[answer.choices[0].finish_reason]
    assert 0 < stats.ttft and stats.gen_seconds >= 0


def test_server_errors_are_its_message(server):
    backend = connected(server)
    backend.model = "not-served"  # the server refuses the request itself: its own words come back
    with pytest.raises(LocalmixError, match="says") as e:
        list(backend.chat(ASK, None, "auto", GREEDY))
    assert "not-served" in str(e.value) and "\n" not in str(e.value)


def test_tools_run_on_the_client(server):
    asked = []

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        asked.append(city)
        return f"sunny, 21 C in {city}"

    backend = connected(server)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    sampling = Sampling(max_tokens=64, temperature=0.0, seed=7)  # room for the whole call
    events = list(reply(backend, question, sampling, toolset=ToolSet([from_function(get_weather)]), choice="get_weather"))
    [calls] = [e for e in events if isinstance(e, ToolCalls)]
    [result] = [e for e in events if isinstance(e, ToolResult)]
    assert [c["name"] for c in calls.calls] == ["get_weather"] and calls.calls[0]["id"]
    assert len(asked) == 1 and calls.calls[0]["arguments"] == {"city": asked[0]}  # it ran here, with the server's arguments
    assert result.result == f"sunny, 21 C in {asked[0]}"
    assert isinstance(events[-1], Done) and events[-1].stats.stop in ("eos", "length")


def test_cancel_ends_the_stream_and_the_server_takes_the_next_request(server):
    backend = connected(server)
    long_prompt = [{"role": "user", "content": "Tell a long story about this river: " + "the river runs to the sea " * 40}]
    threading.Timer(0.2, backend.cancel).start()  # likely while the server still reads the prompt
    t0 = time.monotonic()
    events = list(backend.chat(long_prompt, None, "auto", Sampling(max_tokens=2000, seed=1)))
    assert isinstance(events[-1], Done) and events[-1].stats.stop == "cancelled"
    assert time.monotonic() - t0 < 1.2
    events, first = [], threading.Event()

    def stream():
        for e in backend.chat([{"role": "user", "content": "Write a long story about a dragon."}], None, "auto",
                              Sampling(max_tokens=2000, temperature=0.7, seed=1)):
            events.append(e)
            first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    t0 = time.monotonic()
    backend.cancel()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0
    assert isinstance(events[-1], Done) and events[-1].stats.stop == "cancelled"
    t0 = time.monotonic()
    events = list(backend.chat(ASK, None, "auto", Sampling(max_tokens=4, temperature=0.0)))
    assert isinstance(events[-1], Done) and events[-1].stats.stop in ("eos", "length")
    assert time.monotonic() - t0 < 10

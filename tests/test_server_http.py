"""`localmix serve`'s HTTP side (localmix/server/app.py) through the official `openai` client and raw HTTP,
against the real app under uvicorn on 127.0.0.1 with real models: the demo-like `smol` (JSON tool
protocol, answers in words) and the tiny v3 Mixtral (Mistral's native tool tokens; its words are noise,
so it is the long generation the cancellation tests interrupt)."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from urllib.parse import urlsplit

import jsonschema
import openai
import pytest

from localmix.paths import models_dir
from localmix.server.app import LOOPBACK_HOSTS, Model
from tests.support.fake_backend import FakeBackend
from tests.support.server import loaded, serving

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# The random model's strings never end on their own: its call names a city from a list
CITY = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "London"]}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf):
    model = loaded(tiny_gguf("Q4_K_M"), ctx=4096)
    yield model
    model.backend.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    """(base URL, its app's Service); max_queue=1 for the queue test."""
    with serving(tiny_model, max_queue=1) as url:
        yield url, serving.app.state.service


@pytest.fixture
def tiny_url(tiny_server):
    return tiny_server[0]


def client(url: str, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body: JSON, else text) of one plain HTTP request."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        try:
            body = json.loads(data) if data else None
        except ValueError:  # a CORS preflight's "OK"
            body = data.decode()
        return r.status, r.headers, body  # headers: case-insensitive
    finally:
        conn.close()


def post(url: str, body: object, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw(url, "POST", "/v1/chat/completions", data, {"Content-Type": "application/json", **(headers or {})})


def is_error(body: dict, code: str | None = None) -> bool:
    """OpenAI's error object: message, type, param, code."""
    err = body.get("error", {})
    return set(err) == {"message", "type", "param", "code"} and bool(err["message"]) and (code is None or err["code"] == code)


# -- no model needed --------------------------------------------------------------------------------------


def test_health_and_requests_while_loading():
    model = Model("loading-model", aliases={"loading-model"}, progress=0.25)
    with serving(model) as url:
        status, headers, body = raw(url, "GET", "/health")
        assert (status, body) == (503, {"status": "loading", "progress": 0.25})
        status, headers, body = post(url, {"model": "loading-model", "messages": QUESTION})
        assert status == 503 and is_error(body, "model_loading") and int(headers["Retry-After"]) > 0
        assert [m.id for m in client(url).models.list()] == ["loading-model"]
        model.state, model.error = "failed", "no memory"
        assert raw(url, "GET", "/health")[::2] == (503, {"status": "failed", "error": "no memory"})


def test_unknown_routes_and_methods_are_json_errors():
    with serving(Model("m", aliases={"m"})) as url:
        status, _, body = raw(url, "GET", "/v1/nothing")
        assert status == 404 and is_error(body)
        status, headers, body = raw(url, "GET", "/v1/chat/completions")
        assert status == 405 and is_error(body) and "POST" in headers["Allow"]


def test_api_key_is_required_on_every_route_but_health():
    with serving(Model("m", aliases={"m"}, state="ready"), api_key="s3cret") as url:
        for key in ("none", "s3cret-but-longer", "S3CRET"):
            with pytest.raises(openai.AuthenticationError) as e:
                client(url, key).models.list()
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, headers, body = raw(url, "GET", "/v1/models")
        assert status == 401 and is_error(body, "invalid_api_key") and headers["WWW-Authenticate"] == "Bearer"
        assert post(url, b"{", {"Authorization": "Bearer wrong"})[0] == 401  # the key before the body
        assert raw(url, "GET", "/health")[0] == 200
        assert [m.id for m in client(url, "s3cret").models.list()] == ["m"]


def test_host_header_must_name_loopback():
    """DNS rebinding: a page at evil.example resolved to 127.0.0.1 sends its own name as the Host."""
    with serving(Model("m", aliases={"m"}, state="ready"), allowed_hosts=LOOPBACK_HOSTS) as url:
        port = urlsplit(url).port
        status, _, body = raw(url, "GET", "/v1/models", headers={"Host": f"evil.example:{port}"})
        assert status == 403 and is_error(body, "host_not_allowed")
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            assert raw(url, "GET", "/v1/models", headers={"Host": host})[0] == 200


def test_cors_only_when_asked():
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with serving(Model("m", aliases={"m"}, state="ready")) as url:
        _, headers, _ = raw(url, "GET", "/v1/models", headers={"Origin": "http://app.example"})
        assert "access-control-allow-origin" not in headers
    with serving(Model("m", aliases={"m"}, state="ready"), cors=("http://app.example",), api_key="k") as url:
        status, headers, _ = raw(url, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        status, headers, _ = raw(url, "GET", "/v1/models", headers={"Origin": "http://app.example", "Authorization": "Bearer k"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"


def test_body_size_is_bounded():
    with serving(Model("m", aliases={"m"}, state="ready"), max_body=1000) as url:
        big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        status, _, body = post(url, big)
        assert status == 413 and is_error(body)
        # no Content-Length: counted as it comes
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=iter([big[:600], big[600:]]), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        assert r.status == 413 and is_error(json.loads(r.read()))
        conn.close()


def test_a_failure_is_500_json_or_an_error_event_once_streaming():
    """llama.cpp failing mid-reply (the scripted backend stands in for it; engine and app run for real)."""
    model = Model("fake", aliases={"fake"}, state="ready", backend=FakeBackend(fail_after=3))
    with serving(model) as url:
        got = []
        with pytest.raises(openai.APIError) as e:
            for ch in client(url).chat.completions.create(model="fake", messages=QUESTION, stream=True):
                got.append(ch.choices[0].delta.content or "")
        assert "".join(got) == "reply 1 to" and "internal error" in e.value.message  # the words before it, then the error
        status, _, body = post(url, {"model": "fake", "messages": QUESTION})
        assert status == 500 and is_error(body) and "llama_decode" not in json.dumps(body)  # nothing of the server's insides
        assert raw(url, "GET", "/health")[0] == 200


# -- smol: words, the JSON tool protocol -------------------------------------------------------------------


def test_models_lists_the_loaded_model_first_then_the_store(smol_url, smol_model, tiny_gguf):
    os.symlink(tiny_gguf("Q4_K_M"), models_dir() / "other-model.gguf")  # this test's store (LOCALMIX_HOME)
    models = client(smol_url).models.list().data
    assert [m.id for m in models] == [smol_model.name, "other-model"]
    extra = models[0].model_extra["localmix"]
    assert extra["ctx"] == smol_model.details["ctx"] and "predicted" in extra["plan"] and extra["split"] == "100% CPU"
    assert client(smol_url).models.retrieve(smol_model.name).id == smol_model.name
    with pytest.raises(openai.NotFoundError) as e:
        client(smol_url).chat.completions.create(model="other-model", messages=QUESTION, max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and smol_model.name in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client(smol_url).chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


def test_stream_and_whole_reply_are_the_same_text(smol_url, smol_model):
    c = client(smol_url)
    ask = dict(model=smol_model.name, messages=QUESTION, temperature=0, seed=7, max_tokens=24)
    c.chat.completions.create(**ask)  # the prompt is cached from here on: both below start from the same state
    chunks = list(c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    whole = c.chat.completions.create(**ask)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and text.strip()
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason] and reasons[0] in ("stop", "length")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > 10 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.prompt_tokens_details.cached_tokens > 0  # the conversation's prefix was reused
    assert whole.model == smol_model.name and whole.id.startswith("chatcmpl-")


def test_stream_without_usage_has_no_usage_chunk(smol_url, smol_model):
    chunks = list(client(smol_url).chat.completions.create(model=smol_model.name, messages=QUESTION, max_tokens=4, stream=True))
    assert all(ch.choices for ch in chunks) and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_tool_call_round_trip_json_protocol(smol_url, smol_model):
    c = client(smol_url)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model=smol_model.name, messages=messages, tools=[WEATHER], tool_choice="required",
                                  temperature=0, max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    # "none": words now (whether a small model would call again is its near-tie, not the server's)
    answer = c.chat.completions.create(model=smol_model.name, messages=messages, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=60)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content.strip()
    # the same call streamed: the tool_calls arrive as a delta, with their index
    chunks = list(c.chat.completions.create(model=smol_model.name, messages=messages[:1], tools=[WEATHER],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0, max_tokens=100, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"] and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_output_validates(smol_url, smol_model):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}, "population_millions": {"type": "integer"}},
              "required": ["capital", "population_millions"], "additionalProperties": False}
    r = client(smol_url).chat.completions.create(
        model=smol_model.name, messages=[{"role": "user", "content": "The capital of France and its population, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}, temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    chunks = client(smol_url).chat.completions.create(
        model=smol_model.name, messages=[{"role": "user", "content": "The capital of Italy and its population, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}, temperature=0, max_tokens=200,
        stream=True)
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks)), schema)


def test_malformed_requests_are_4xx_json(smol_url, smol_model):
    name = smol_model.name
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": name, "messages": "hello"}, 400, "messages"),
        ({"model": name, "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
        ({"model": name, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": name, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
        ({"messages": QUESTION}, 400, "model"),
        ({"model": "no-such-model", "messages": QUESTION}, 404, "model"),
    ]
    for body, status, param in cases:
        got, _, err = post(smol_url, body)
        assert (got, is_error(err)) == (status, True), (body, got, err)
        assert param is None or err["error"]["param"] == param, (body, err)


def test_prompt_longer_than_the_context_is_400(smol_url, smol_model):
    long = "word " * (smol_model.details["ctx"] + 100)
    with pytest.raises(openai.BadRequestError) as e:
        client(smol_url).chat.completions.create(model=smol_model.name, messages=[{"role": "user", "content": long}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # streamed: the same JSON error, before any event
        client(smol_url).chat.completions.create(model=smol_model.name, messages=[{"role": "user", "content": long}], stream=True)


def test_a_client_gone_during_the_prefill_cancels_it(smol_url, smol_model):
    """A long prompt: the client leaves while it is being evaluated; the next request need not wait for it."""
    def long(word: str) -> list[dict]:
        return [{"role": "user", "content": f"{word} " + "lorem ipsum dolor " * 120}]  # about 850 tokens: seconds of prefill here

    t0 = time.perf_counter()
    client(smol_url).chat.completions.create(model=smol_model.name, messages=long("first"), max_tokens=1)
    prefill = time.perf_counter() - t0
    u = urlsplit(smol_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": smol_model.name, "messages": long("second"), "max_tokens": 1}),
                 headers={"Content-Type": "application/json"})
    time.sleep(min(0.3, prefill / 5))
    conn.close()
    t0 = time.perf_counter()
    client(smol_url).chat.completions.create(model=smol_model.name, messages=QUESTION, max_tokens=1)
    took = time.perf_counter() - t0
    print(f"prefill {prefill:.2f} s, the next request after a cancelled one: {took:.2f} s")
    assert took < prefill / 2, (took, prefill)


# -- tiny v3: Mistral's native tool tokens; long generations to cut short ---------------------------------


def test_tool_call_round_trip_native_format(tiny_url, tiny_model):
    c = client(tiny_url)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model=tiny_model.name, messages=messages, tools=[CITY],
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
                                  max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and len(call.id) == 9  # Mistral's call ids
    jsonschema.validate(json.loads(call.function.arguments), CITY["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = c.chat.completions.create(model=tiny_model.name, messages=messages, tools=[CITY], tool_choice="none",
                                       temperature=0, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length") and not answer.choices[0].message.tool_calls


def _long_stream(url: str, model: str):
    """A stream that would run for thousands of tokens (the random model seldom ends), its first chunks read."""
    stream = client(url).chat.completions.create(model=model, messages=QUESTION, max_tokens=3500, temperature=1.0,
                                                 seed=1, stream=True)
    t0 = time.perf_counter()
    pieces = [next(stream) for _ in range(12)]
    return stream, len(pieces) / (time.perf_counter() - t0)


def test_a_closed_stream_cancels_its_generation(tiny_url, tiny_model):
    stream, rate = _long_stream(tiny_url, tiny_model.name)
    stream.close()
    full = 3500 / rate  # about what the rest of the first would have taken
    t0 = time.perf_counter()
    r = client(tiny_url).chat.completions.create(model=tiny_model.name, messages=QUESTION, max_tokens=4)
    took = time.perf_counter() - t0
    print(f"rate {rate:.0f} chunks/s, the rest of the first: about {full:.1f} s, the next took {took:.2f} s")
    assert r.choices[0].finish_reason in ("stop", "length")
    assert took < max(full / 4, 2.0) and took < full / 2, (took, full)


def test_a_client_gone_before_the_reply_cancels_it(tiny_url, tiny_model):
    """Not streamed: the client gives up while the server generates (no byte was sent yet)."""
    stream, rate = _long_stream(tiny_url, tiny_model.name)  # how fast this machine generates
    stream.close()
    u = urlsplit(tiny_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"model": tiny_model.name, "messages": QUESTION, "max_tokens": 3500, "temperature": 1.0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    time.sleep(0.3)
    conn.close()
    t0 = time.perf_counter()
    client(tiny_url).chat.completions.create(model=tiny_model.name, messages=QUESTION, max_tokens=4)
    took, full = time.perf_counter() - t0, 3500 / rate
    assert took < max(full / 4, 2.0) and took < full / 2, (took, full)


def test_queue_full_is_503_with_retry_after(tiny_server, tiny_model):
    """max_queue=1: one generating, one waiting, the next refused; a waiting client that leaves frees its
    place; the one waiting is served after."""
    tiny_url, service = tiny_server
    short = {"model": tiny_model.name, "messages": QUESTION, "max_tokens": 4}

    def until_waiting(n: int) -> None:
        deadline = time.monotonic() + 30
        while service.waiting != n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.waiting == n

    stream, _ = _long_stream(tiny_url, tiny_model.name)
    u = urlsplit(tiny_url)
    leaving = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    leaving.request("POST", "/v1/chat/completions", body=json.dumps(short), headers={"Content-Type": "application/json"})
    until_waiting(1)
    status, headers, body = post(tiny_url, short)
    assert status == 503 and is_error(body, "queue_full") and int(headers["Retry-After"]) >= 1
    leaving.close()
    until_waiting(0)
    waiting: dict = {}
    t = threading.Thread(target=lambda: waiting.update(r=post(tiny_url, short)))
    t.start()
    until_waiting(1)
    stream.close()
    t.join(60)
    assert waiting["r"][0] == 200 and waiting["r"][2]["choices"][0]["finish_reason"] in ("stop", "length")

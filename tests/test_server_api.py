"""OpenAI's chat-completions JSON read into a ChatRequest and the response objects built (pure: no model,
no HTTP). Every refusal is a 400 ApiError naming the field at fault; the objects built are checked
against the official `openai` client's own types as well as key by key."""

import json

import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from localmix.backends import Sampling
from localmix.server import api
from localmix.server.api import NO_LIMIT, ApiError, completion, parse_chat_request
from localmix.server.engine import Finish
from localmix.tools.grammar import ANY_JSON_OBJECT

USER = {"role": "user", "content": "What is the weather in Paris?"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def body(**fields) -> dict:
    return {"model": "m", "messages": [USER], **fields}


def test_a_full_request():
    req = parse_chat_request(body(
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
                  {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_abc123", "content": "18 C"}],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, top_p=0.5, frequency_penalty=1, presence_penalty=-1.5, seed=7, max_tokens=100, max_completion_tokens=50,
        stop="\n\n", stream=True, stream_options={"include_usage": True}, n=1, logprobs=False, user="u",
        some_future_field={"whatever": [1, 2]}, parallel_tool_calls=False))
    assert req.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc123", "name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_abc123", "name": "get_weather"},
    ]
    assert req.tools == [{"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER["function"]["parameters"]}]
    assert req.tool_choice == "get_weather" and req.stop == ("\n\n",) and req.stream and req.include_usage
    assert req.max_tokens == 50  # max_completion_tokens wins, as OpenAI's newer name
    assert req.sampling == Sampling(max_tokens=50, temperature=0, top_p=0.5, seed=7, frequency_penalty=1, presence_penalty=-1.5)
    assert req.schema is None and req.model == "m"


def test_defaults():
    req = parse_chat_request(body())
    assert req.max_tokens is None and req.sampling == Sampling(max_tokens=NO_LIMIT)  # to the end of the context
    assert req.tools is None and req.tool_choice == "none" and req.stop == () and not req.stream and not req.include_usage
    assert parse_chat_request(body(tools=[WEATHER])).tool_choice == "auto"
    assert parse_chat_request(body(tools=[], tool_choice="auto")).tools is None  # an empty list is no tools
    nulls = parse_chat_request(body(temperature=None, stop=None, tools=None, max_tokens=None, response_format=None))
    assert nulls.sampling == Sampling(max_tokens=NO_LIMIT)


@pytest.mark.parametrize("fmt, schema", [
    ({"type": "text"}, None),
    ({"type": "json_object"}, ANY_JSON_OBJECT),
    ({"type": "json_object", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
     {"type": "object", "properties": {"a": {"type": "integer"}}}),  # llama-server's form
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "array", "items": {"type": "string"}}}},
     {"type": "array", "items": {"type": "string"}}),
])
def test_response_format(fmt, schema):
    assert parse_chat_request(body(response_format=fmt)).schema == schema


def test_numbers_and_text_from_hostile_bodies():
    req = parse_chat_request(body(max_tokens=10**30, seed=2**64 - 1, messages=[{"role": "user", "content": "a\ud800b"}]))
    assert req.max_tokens == 10**30 and req.sampling.max_tokens == NO_LIMIT and req.sampling.seed == 2**32 - 1
    assert req.messages[0]["content"] == "a\ufffdb" and req.messages[0]["content"].encode()  # a lone surrogate cannot reach UTF-8
    req = parse_chat_request(body(messages=[USER, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "\\udc00"}'}}]}]))
    assert req.messages[1]["tool_calls"][0]["arguments"] == {"city": "\ufffd"}
    no_args = {**CALL, "function": {"name": "f", "arguments": ""}}
    empty = parse_chat_request(body(messages=[USER, {"role": "assistant", "tool_calls": [no_args]}]))
    assert empty.messages[1]["tool_calls"][0]["arguments"] == {}


DEEP = "[" * 100_000 + "]" * 100_000
NESTED: dict = {}
_node = NESTED
for _ in range(10_000):
    _node["x"] = {}
    _node = _node["x"]

# (fields changed in a good body, the param the error names)
REFUSED = [
    ({"model": None}, "model"),
    ({"model": 5}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),  # a boolean is not a number
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": "1"}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"n": 2}, "n"),
    ({"seed": 2**70}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": "x" * 1001}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"user": 5}, "user"),
    ({"messages": [5]}, "messages[0]"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
    ({"messages": [USER, {"role": "tool", "tool_call_id": "nope", "content": "5"}]}, "messages[1].tool_call_id"),
    ({"messages": [USER, {"role": "tool", "content": "5"}]}, "messages[1].tool_call_id"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": {"id": "x"}}]}, "messages[1].tool_calls"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}]}, "messages[1].tool_calls[0].type"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "id": 5}]}]}, "messages[1].tool_calls[0].id"),
    *[({"messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": args}}]}]},
       "messages[1].tool_calls[0].function.arguments") for args in ("{not json", "[1, 2]", "5", DEEP, 5)],
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls[0].function.name"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [5]}, "tools[0]"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]}, "tools[0].function.description"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": 5}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ({"tool_choice": {"type": "function", "function": {"name": "other"}}, "tools": [WEATHER]}, "tool_choice.function.name"),
    ({"tool_choice": {"type": "tool"}, "tools": [WEATHER]}, "tool_choice.type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://example.com/s"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"some_future_field": NESTED}, None),  # nested past any schema's depth: refused wherever it is
    ({"some_future_field": [float("nan")]}, "some_future_field"),
]


@pytest.mark.parametrize("fields, param", REFUSED, ids=[f"{p}-{i}" for i, (_, p) in enumerate(REFUSED)])
def test_refused_with_the_param_named(fields, param):
    with pytest.raises(ApiError) as e:
        parse_chat_request(body(**fields) | {k: v for k, v in fields.items() if v is None})
    err = e.value
    assert err.status == 400 and err.param == param
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": param, "code": err.code}}
    assert "\n" not in err.message and len(err.message) < 300  # one line, whatever the body held
    json.dumps(err.body())


@pytest.mark.parametrize("raw", [None, [], "text", 5, True])
def test_a_body_that_is_not_an_object(raw):
    with pytest.raises(ApiError, match="must be a JSON object") as e:
        parse_chat_request(raw)
    assert e.value.status == 400 and e.value.param is None


# -- responses -------------------------------------------------------------------------------------------

CALLS = [{"id": "abcDEF123", "name": "get_weather", "arguments": {"city": "Paris"}},
         {"id": "xyz987654", "name": "get_weather", "arguments": {"city": "Zürich"}}]
WORDS = Finish("stop", "It is 18 C.", [], prompt_tokens=40, cached_tokens=30, completion_tokens=6)
TOOL_CALLS = Finish("tool_calls", "", CALLS, prompt_tokens=40, cached_tokens=0, completion_tokens=20)


def test_a_completion_in_openai_shape():
    out = completion("chatcmpl-1", 1700000000, "smol", WORDS)
    assert out == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "smol", "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is 18 C.", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 6, "total_tokens": 46, "prompt_tokens_details": {"cached_tokens": 30}},
    }
    parsed = ChatCompletion.model_validate(out)
    assert parsed.choices[0].message.content == "It is 18 C." and parsed.usage.prompt_tokens_details.cached_tokens == 30


def test_tool_calls_in_openai_shape():
    out = completion(api.new_id(), 1, "tiny", TOOL_CALLS)
    assert out["id"].startswith("chatcmpl-") and len(out["id"]) > 20
    message = out["choices"][0]["message"]
    assert message["content"] is None and out["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"] == api.openai_tool_calls(CALLS) == [
        {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "xyz987654", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
    ]
    parsed = ChatCompletion.model_validate(out).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments) for c in parsed] == [c["arguments"] for c in CALLS]


def test_stream_chunks_in_openai_shape():
    first = api.chunk("chatcmpl-1", 1, "smol", {"role": "assistant", "content": ""})
    assert first == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "smol", "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
    ChatCompletionChunk.model_validate(first)
    assert api.chunk("c", 1, "m", {}, "cancelled")["choices"][0]["finish_reason"] == "stop"  # only OpenAI's reasons go out
    last = api.closing_chunks("c", 1, "m", WORDS)
    assert [c["choices"][0]["finish_reason"] for c in last] == ["stop"]
    calls, end = api.closing_chunks("c", 1, "m", TOOL_CALLS)
    assert [c["index"] for c in calls["choices"][0]["delta"]["tool_calls"]] == [0, 1] and end["choices"][0]["finish_reason"] == "tool_calls"
    for c in (calls, end):
        ChatCompletionChunk.model_validate(c)
    u = api.usage_chunk("c", 1, "m", WORDS)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 46 and u["object"] == "chat.completion.chunk"
    assert ChatCompletionChunk.model_validate(u).usage.completion_tokens == 6


def test_a_model_object():
    out = api.model_object("smol", 5, {"localmix": {"ctx": 4096}})
    assert out == {"id": "smol", "object": "model", "created": 5, "owned_by": "localmix", "localmix": {"ctx": 4096}}
    assert Model.model_validate(out).id == "smol"

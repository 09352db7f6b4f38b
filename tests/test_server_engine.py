"""One chat-completions request answered by real llama.cpp on the test models (no HTTP): `smol` (the
upcycled SmolLM2: words, the JSON tool protocol) and the tiny v3 Mixtral (Mistral's native tool tokens;
its words are noise, its grammar-forced calls valid). Texts are compared with the same model's greedy
output in the same process, never with words a tiny model might break a near-tie on."""

import json
import threading
from typing import Literal

import jsonschema
import pytest

from localmix import prompt
from localmix.backends.llama import LlamaBackend
from localmix.model_info import read_model_info
from localmix.planner import Budget, plan
from localmix.prompt.mistral import wire_id
from localmix.server.api import ApiError, parse_chat_request
from localmix.server.engine import REFUSED, Delta, Finish, StopFilter, _run, answer, may_be_call
from localmix.tools import ToolSet, from_function
from localmix.units import GiB
from tests.support.ggufs import KV, STR, base_model, serialise

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    # an enum: the random tiny model, forced by the grammar, would otherwise fill a string for hundreds of tokens
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin"]}}, "required": ["city"]}}}
GREEDY = {"temperature": 0, "seed": 1}


def loaded(path, ctx: int) -> LlamaBackend:
    info = read_model_info(path)
    b = LlamaBackend(info, plan(info, Budget(vram=0, ram=16 * GiB), ctx), ctx=ctx, threads=2)
    b.load()
    return b


@pytest.fixture(scope="module")
def smol_backend(smol):
    b = loaded(smol, 1024)
    yield b
    b.close()


@pytest.fixture(scope="module")
def native_backend(tiny_gguf):
    b = loaded(tiny_gguf("Q4_K_M"), 512)
    assert prompt.native(b.info.prompt, b.tokenizer)
    yield b
    b.close()


def ask(backend, fresh: bool = True, **fields) -> tuple[list[Delta], Finish]:
    """The events of one request; `fresh`: from an empty KV cache, so that greedy runs compare exactly."""
    if fresh:
        backend.engine.forget()
    events = list(answer(backend, parse_chat_request({"model": "m", "messages": FRANCE, **GREEDY, **fields})))
    assert all(isinstance(e, Delta) for e in events[:-1]) and isinstance(events[-1], Finish)
    return events[:-1], events[-1]


def test_a_plain_answer_streams_its_content(smol_backend):
    deltas, fin = ask(smol_backend, max_tokens=12)
    assert len(deltas) > 3 and "".join(d.text for d in deltas) == fin.content and fin.content.strip()
    assert fin.reason in ("stop", "length") and fin.tool_calls == []
    assert fin.prompt_tokens > 10 and fin.cached_tokens == 0 and 0 < fin.completion_tokens <= 12


def test_max_tokens_ends_with_length(smol_backend):
    deltas, fin = ask(smol_backend, max_tokens=3)
    assert fin.reason == "length" and fin.completion_tokens == 3 and "".join(d.text for d in deltas) == fin.content


def test_stop_strings_cut_the_answer(smol_backend):
    _, whole = ask(smol_backend, max_tokens=24)
    text = whole.content
    assert len(text) > 30
    stop = text[len(text) // 2:len(text) // 2 + 4]  # four characters: most likely across a token boundary
    deltas, cut = ask(smol_backend, max_tokens=24, stop=["never in this text: \u2603", stop])
    assert cut.reason == "stop" and cut.content == text[:text.index(stop)]
    assert "".join(d.text for d in deltas) == cut.content
    assert cut.completion_tokens < whole.completion_tokens or whole.reason == "stop"  # the generation was stopped there
    _, first = ask(smol_backend, max_tokens=24, stop=text[:3])  # at the very start: an empty answer
    assert first.reason == "stop" and first.content == ""


def test_stop_filter_holds_what_could_begin_a_stop_string():
    f = StopFilter(("END", "xyz"))
    assert [f.feed(p) for p in ("ab", "cE", "N", "x", "D!")] == ["ab", "c", "", "EN", "xD!"]  # "ENx" cannot begin "END"
    assert not f.hit
    assert [f.feed(p) for p in ("E", "Nx", "y", "zEND")] == ["", "EN", "", ""] and f.hit
    assert StopFilter(("END", "xyz")).feed("a xyzEND") == "a "  # the earliest stop string wins
    assert f.hit and f.feed("more") == "" and f.flush() == ""
    g = StopFilter(("END",))
    assert g.feed("aEN") == "a" and g.flush() == "EN" and not g.hit
    assert StopFilter(()).feed("anything") == "anything"


@pytest.mark.parametrize("text, native, held", [
    ("", True, True), ("[TOOL", True, True), ("[TOOL_CALLS][{", True, True), (" [TOOL_CALLS]", True, True),
    ("[TOOLS", True, False), ("Hello", True, False),
    ("", False, True), ("  ", False, True), ("{", False, True), ('{"tool_calls"', False, True), ("Hi {", False, False),
])
def test_what_may_still_be_a_call_is_held(text, native, held):
    assert may_be_call(text, native) is held


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_in_the_native_format(native_backend, choice):
    deltas, fin = ask(native_backend, max_tokens=80, tools=[WEATHER], tool_choice=choice,
                      messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert deltas == [] and fin.reason == "tool_calls" and fin.content == ""  # nothing of a call is content
    [call] = fin.tool_calls
    assert call["name"] == "get_weather" and call["arguments"]["city"] in ("Paris", "Berlin")
    assert isinstance(call["id"], str) and call["id"]
    assert fin.completion_tokens > 5


def test_auto_in_the_native_format_is_a_call_or_words(native_backend):
    """Whichever the model writes, nothing of a call is sent as content, and words are sent whole."""
    deltas, fin = ask(native_backend, max_tokens=8, tools=[WEATHER], temperature=1.0,
                      messages=[{"role": "user", "content": "Weather in Paris?"}])
    if fin.tool_calls:
        assert fin.reason == "tool_calls" and deltas == [] and fin.content == ""
    else:
        assert fin.reason in ("stop", "length") and "".join(d.text for d in deltas) == fin.content


def test_a_forced_call_in_the_json_protocol(smol_backend):
    deltas, fin = ask(smol_backend, max_tokens=40, tools=[WEATHER], tool_choice="required",
                      messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert not prompt.native(smol_backend.info.prompt, smol_backend.tokenizer)
    assert deltas == [] and fin.reason == "tool_calls"
    assert [c["name"] for c in fin.tool_calls] == ["get_weather"] and fin.tool_calls[0]["arguments"]["city"] in ("Paris", "Berlin")


def openai_history(call_id: str) -> list[dict]:
    """A conversation as another server's client sends it back: OpenAI-style call ids, arguments as text."""
    return [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temperature_c": 18, "sky": "clear"}'}]


def test_a_tool_round_trip_ends_in_words(smol_backend):
    """The client ran the call and sends the result back: the answer comes in words."""
    deltas, fin = ask(smol_backend, max_tokens=6, tools=[WEATHER], tool_choice="none", messages=openai_history("call_1"))
    assert fin.reason in ("stop", "length") and fin.tool_calls == [] and fin.content.strip()
    assert not fin.content.lstrip().startswith("{") and "".join(d.text for d in deltas) == fin.content


def test_another_servers_call_ids_in_the_native_format(native_backend):
    """Mistral's models were trained on 9-character ids: an OpenAI-style id is mapped to one, the same for
    the call and its result, and the conversation is answered."""
    history = openai_history("call_Xy12_from-another-server")
    req = parse_chat_request({"model": "m", "messages": history, "tools": [WEATHER]})
    text = prompt.text_of(native_backend.tokenizer, prompt.encode(native_backend.info.prompt, native_backend.tokenizer,
                                                                  req.messages, req.tools))
    mapped = wire_id("call_Xy12_from-another-server")
    assert len(mapped) == 9 and mapped.isalnum() and mapped == wire_id("call_Xy12_from-another-server")
    assert text.count(mapped) == 2 and "call_Xy12" not in text
    deltas, fin = ask(native_backend, max_tokens=6, tools=[WEATHER], tool_choice="none", messages=history)
    assert fin.reason in ("stop", "length") and fin.tool_calls == [] and "".join(d.text for d in deltas) == fin.content


def test_a_json_schema_answer_validates(smol_backend):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 24}}, "required": ["capital"],
              "additionalProperties": False}
    deltas, fin = ask(smol_backend, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert fin.reason == "stop" and "".join(d.text for d in deltas) == fin.content
    jsonschema.validate(json.loads(fin.content), schema)


def test_a_json_answer_with_tools_on_offer(smol_backend):
    """Words from a round with tools are not the answer: it comes under the response format's grammar."""
    deltas, fin = ask(smol_backend, max_tokens=16, tools=[WEATHER], response_format={"type": "json_object"})
    if fin.reason == "stop":
        assert isinstance(json.loads(fin.content), dict) and "".join(d.text for d in deltas) == fin.content
    else:  # the model called the tool: a call is a call, whatever the format of an answer
        assert fin.reason == "tool_calls" and deltas == []


def test_a_prompt_longer_than_the_context(smol_backend):
    events = answer(smol_backend, parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "word " * 1500}]}))
    with pytest.raises(ApiError) as e:
        next(events)  # before anything is sent
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert "1024" in e.value.message and any(w.isdigit() and int(w) > 1024 for w in e.value.message.split())


def test_a_template_that_rejects_the_conversation(tmp_path):
    m = base_model()
    template = next(k for k in m.kv if k.key == "tokenizer.chat_template")
    m.kv[m.kv.index(template)] = KV("tokenizer.chat_template", STR,
                                    "{% for m in messages %}{% if m['content'] == 'forbidden' %}{{ raise_exception('not that word') }}"
                                    "{% endif %}{{ m['content'] }}{% endfor %}")
    path = tmp_path / "strict.gguf"
    path.write_bytes(serialise(m))
    b = loaded(path, 256)
    try:
        with pytest.raises(ApiError) as e:
            next(answer(b, parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "forbidden"}]})))
        assert e.value.status == 400 and e.value.code == "template_error" and "not that word" in e.value.message
        events = list(answer(b, parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "fine"}], "max_tokens": 2})))
        assert events[-1].reason in ("stop", "length")
    finally:
        b.close()


def test_cancelling_from_another_thread(smol_backend):
    smol_backend.engine.forget()
    events = answer(smol_backend, parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "Tell me a long story."}],
                                                      "max_tokens": 200, **GREEDY}))
    after, canceller = [], None
    for e in events:
        if isinstance(e, Delta) and canceller is None:
            canceller = threading.Thread(target=smol_backend.cancel)
            canceller.start()
            canceller.join()
        elif isinstance(e, Delta):
            after.append(e)
        else:
            fin = e
    assert fin.reason == "cancelled" and len(after) <= 2 and fin.completion_tokens <= 4


def test_a_continued_conversation_reuses_the_cache(smol_backend):
    _, first = ask(smol_backend, max_tokens=8)
    follow = [*FRANCE, {"role": "assistant", "content": first.content}, {"role": "user", "content": "And of Germany?"}]
    _, second = ask(smol_backend, fresh=False, max_tokens=4, messages=follow)
    assert second.cached_tokens >= first.prompt_tokens - 1 and second.prompt_tokens > second.cached_tokens


def test_the_servers_own_tools_are_run_not_returned(smol_backend):
    """A call of a server tool is run and the loop goes on; the client, which has no tools, gets words
    (whether the model calls the tool is its own business)."""
    ran = []

    def city_weather(city: Literal["Paris", "Berlin"]) -> str:
        """The weather in a city."""
        ran.append(city)
        return '{"temperature_c": 18}'

    events = list(answer(smol_backend, parse_chat_request({"model": "m", "max_tokens": 16, **GREEDY, "messages": [
        {"role": "user", "content": "What is the weather in Paris? Use the city_weather tool."}]}),
        server_tools=ToolSet([from_function(city_weather)])))
    fin = events[-1]
    assert fin.reason in ("stop", "length") and fin.tool_calls == [] and "".join(e.text for e in events[:-1]) == fin.content
    assert set(ran) <= {"Paris", "Berlin"}


def test_a_server_tool_with_side_effects_is_not_run():
    ran = []

    def save(text: str) -> str:
        """Save a note."""
        ran.append(text)
        return "saved"

    tools = ToolSet([from_function(save, side_effects=True)])
    call = {"id": "abcdefghi", "name": "save", "arguments": {"text": "x"}}
    assigned, result = _run(tools, [call])
    assert assigned == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert result["content"] == REFUSED and result["tool_call_id"] == "abcdefghi" and ran == []

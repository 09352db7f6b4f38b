"""OpenAI's chat-completions JSON to localmix values and back: a request body read into a ChatRequest
(every known field checked for type and range, unknown fields ignored as llama-server does), and the
response objects built in OpenAI's exact shapes. Pure: no HTTP here (app.py), no generation (engine.py).

Everything in a body is data from the network: numbers are checked for type (a boolean is not a number)
and range, NaN and Infinity are refused, nesting is bounded (every walk below is iterative or bounded),
and lone UTF-16 surrogates, which JSON can spell but UTF-8 cannot, become U+FFFD before a tokenizer sees
them."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends import Sampling
from ..backends.openai import openai_tool_calls  # OpenAI's shape of a call, as the client sends it too
from ..errors import LocalmixError
from ..tools.grammar import ANY_JSON_OBJECT, MAX_DEPTH, check_schema

MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_STOP_LENGTH = 1000  # characters of one: the answer's tail is compared with each one's beginnings at every token
MAX_BODY_DEPTH = MAX_DEPTH + 8  # a tool's schema may nest MAX_DEPTH deep, a few levels down in the body
NO_LIMIT = 2**31 - 1  # max_tokens when none is asked: the engine stops at the end of the context
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class ApiError(LocalmixError):
    """A request the API refuses, as OpenAI's error object with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]  # localmix message dicts (localmix/prompt/__init__.py)
    sampling: Sampling  # max_tokens: as asked, else NO_LIMIT (the engine stops at the end of the context)
    max_tokens: int | None  # as asked (max_completion_tokens, else max_tokens); None: to the end of the context
    tools: list[dict] | None  # specs {"name", "description", "parameters"}, schemas checked
    tool_choice: str  # "auto" | "none" | "required" | a tool name
    schema: dict | None  # the JSON schema the answer must follow (response_format)
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage


# -- field checks: a table of field -> (JSON types, check), not a chain of ifs ----------------------------

KINDS: dict[str, Callable[[Any], bool]] = {
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
ARTICLE = {"integer": "an integer", "array": "an array", "object": "an object"}


def json_type(value) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    return next((k for k in ("boolean", "integer", "number", "string", "array", "object") if KINDS[k](value)), type(value).__name__)


def _kind_words(kinds: tuple[str, ...]) -> str:
    return " or ".join(ARTICLE.get(k, f"a {k}") for k in kinds)


def between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def at_least(lo: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be at least {lo}"


def only(allowed, why: str) -> Callable[[Any], str | None]:
    return lambda v: None if v == allowed else why


def _stop_check(v) -> str | None:
    items = [v] if isinstance(v, str) else v
    if not all(isinstance(s, str) for s in items):
        return "must be a string or an array of strings"
    if len(items) > MAX_STOP:
        return f"may hold at most {MAX_STOP} strings"
    return None if all(len(s) <= MAX_STOP_LENGTH for s in items) else f"strings may be at most {MAX_STOP_LENGTH} characters long"


@dataclass(frozen=True)
class Field:
    kinds: tuple[str, ...]
    check: Callable[[Any], str | None] = lambda v: None  # why the value is refused, or None
    required: bool = False  # else null is the same as absent


FIELDS: dict[str, Field] = {
    "model": Field(("string",), required=True),
    "messages": Field(("array",), lambda v: None if v else "must not be empty", required=True),
    "temperature": Field(("number",), between(0, 2)),
    "top_p": Field(("number",), between(0, 1)),
    "frequency_penalty": Field(("number",), between(-2, 2)),
    "presence_penalty": Field(("number",), between(-2, 2)),
    "max_tokens": Field(("integer",), at_least(1)),
    "max_completion_tokens": Field(("integer",), at_least(1)),
    "n": Field(("integer",), only(1, "must be 1 (one choice per request)")),
    "seed": Field(("integer",), between(-(2**63), 2**64 - 1)),
    "stop": Field(("string", "array"), _stop_check),
    "stream": Field(("boolean",)),
    "stream_options": Field(("object",)),
    "tools": Field(("array",)),
    "tool_choice": Field(("string", "object")),
    "parallel_tool_calls": Field(("boolean",)),
    "response_format": Field(("object",)),
    "logprobs": Field(("boolean",), only(False, "is not supported (log-probabilities are not returned)")),
    "top_logprobs": Field(("integer",), between(0, 20)),
    "logit_bias": Field(("object",), lambda v: "is not supported" if v else None),
    "user": Field(("string",)),
}


def _field(body: dict, name: str):
    """The value of a known field, checked (None when absent or null and not required)."""
    spec, value = FIELDS[name], body.get(name)
    if value is None:
        if spec.required:
            raise _bad(f"'{name}' is required", name, "missing_required_parameter")
        return None
    if not any(KINDS[k](value) for k in spec.kinds):
        raise _bad(f"'{name}' must be {_kind_words(spec.kinds)}, not {json_type(value)}", name, "invalid_type")
    why = spec.check(value)
    if why:
        raise _bad(f"'{name}' {why}", name, "invalid_value")
    return value


def _typed(value, kinds: tuple[str, ...], param: str, *, optional: bool = False):
    """A nested value of one of `kinds` (or None when optional)."""
    if value is None and optional:
        return None
    if not any(KINDS[k](value) for k in kinds):
        raise _bad(f"'{param}' must be {_kind_words(kinds)}, not {json_type(value)}", param, "invalid_type")
    return value


# -- the body as a whole ---------------------------------------------------------------------------------

SURROGATE = re.compile(r"[\ud800-\udfff]")


def too_deep(value, limit: int) -> bool:
    """Lists and dicts nest more than `limit` levels in `value` (walked without recursion, and no deeper
    than the limit)."""
    todo = [(value, 1)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, (dict, list)):
            if level > limit:
                return True
            todo += [(v, level + 1) for v in (node.values() if isinstance(node, dict) else node)]
    return False


def _clean(body: dict) -> dict:
    """The body with nesting bounded, NaN and Infinity refused and lone surrogates replaced, in one pass
    through its JSON text."""
    if too_deep(body, MAX_BODY_DEPTH):
        raise _bad(f"the request is nested more than {MAX_BODY_DEPTH} levels deep")
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False)
    except ValueError:
        param = next((k for k, v in body.items() if not _finite(v)), None)
        raise _bad("the request holds a number JSON cannot carry (NaN or Infinity)", param, "invalid_value") from None
    except TypeError as e:  # not from JSON: a caller's mistake, said plainly all the same
        raise _bad(f"the request holds a value JSON cannot carry ({e})") from None
    return json.loads(SURROGATE.sub("\ufffd", text)) if SURROGATE.search(text) else body


def _finite(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def parse_chat_request(body: object) -> ChatRequest:
    """A chat-completions body (parsed JSON) as a ChatRequest; ApiError(400) naming the `param` at fault."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, not {json_type(body)}")
    body = _clean(body)
    values = {name: _field(body, name) for name in FIELDS}
    tools = _tools(values["tools"])
    max_tokens = values["max_completion_tokens"] or values["max_tokens"]
    given = {k: values[k] for k in ("temperature", "top_p", "frequency_penalty", "presence_penalty") if values[k] is not None}
    seed = None if values["seed"] is None else values["seed"] % 2**32  # llama.cpp's seed is 32 bits
    stream_options = values["stream_options"] or {}
    include_usage = _typed(stream_options.get("include_usage"), ("boolean",), "stream_options.include_usage", optional=True)
    stop = values["stop"]
    return ChatRequest(
        model=values["model"],
        messages=_messages(values["messages"]),
        sampling=Sampling(max_tokens=min(max_tokens or NO_LIMIT, NO_LIMIT), seed=seed, **given),
        max_tokens=max_tokens,
        tools=tools,
        tool_choice=_tool_choice(values["tool_choice"], tools),
        schema=_response_format(values["response_format"]),
        stop=tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s),  # an empty one stops nothing
        stream=bool(values["stream"]),
        include_usage=bool(include_usage),
    )


# -- messages --------------------------------------------------------------------------------------------

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# content part type -> the key holding its text; other types (images, audio, files) are refused
TEXT_PARTS = {"text": "text", "refusal": "refusal"}


def _content(value, param: str, *, optional: bool) -> str:
    """A message's content as text: a string, or OpenAI's list of text parts."""
    if value is None and optional:
        return ""
    _typed(value, ("string", "array"), param)
    if isinstance(value, str):
        return value
    texts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        _typed(part, ("object",), where)
        kind = part.get("type")
        if kind not in TEXT_PARTS:
            raise _bad(f"'{where}.type' {json.dumps(kind)[:40]} is not supported: this model reads text only",
                       f"{where}.type", "unsupported_content")
        texts.append(_typed(part.get(TEXT_PARTS[kind]), ("string",), f"{where}.{TEXT_PARTS[kind]}"))
    return "".join(texts)


def _arguments(value, param: str) -> dict:
    """A call's arguments: OpenAI's JSON text of an object (an object itself is taken too)."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise _bad(f"'{param}' is not JSON text of an object", param, "invalid_value") from None
        if too_deep(value, MAX_DEPTH):
            raise _bad(f"'{param}' is nested more than {MAX_DEPTH} levels deep", param, "invalid_value")
        value = _clean(value) if isinstance(value, dict) else value
    if not isinstance(value, dict):
        raise _bad(f"'{param}' must be a JSON object (as text), not {json_type(value)}", param, "invalid_value")
    return value


def _tool_calls(value, param: str) -> list[dict]:
    """OpenAI's assistant tool_calls as localmix calls {"id", "name", "arguments": dict}."""
    calls = []
    for k, call in enumerate(_typed(value, ("array",), param, optional=True) or []):
        where = f"{param}[{k}]"
        _typed(call, ("object",), where)
        if call.get("type", "function") != "function":
            raise _bad(f"'{where}.type' must be \"function\"", f"{where}.type", "invalid_value")
        fn = _typed(call.get("function"), ("object",), f"{where}.function")
        calls.append({"id": _typed(call.get("id"), ("string",), f"{where}.id"),
                      "name": _typed(fn.get("name"), ("string",), f"{where}.function.name"),
                      "arguments": _arguments(fn.get("arguments"), f"{where}.function.arguments")})
    return calls


def _messages(raw: list) -> list[dict]:
    """OpenAI messages as localmix messages: developer is system, a tool result gets the name of the call
    it answers (looked up by id in the calls made before it)."""
    out, called = [], {}  # call id -> tool name
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        _typed(m, ("object",), where)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"'{where}.role' {json.dumps(role)[:40]} is not one of {', '.join(ROLES)}", f"{where}.role", "invalid_value")
        msg = {"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content", optional=role == "assistant")}
        if role == "assistant":
            calls = _tool_calls(m.get("tool_calls"), f"{where}.tool_calls")
            if calls:
                msg["tool_calls"] = calls
                called.update((c["id"], c["name"]) for c in calls)
        elif role == "tool":
            call_id = _typed(m.get("tool_call_id"), ("string",), f"{where}.tool_call_id")
            if call_id not in called:
                raise _bad(f"'{where}.tool_call_id' answers no tool call made before it", f"{where}.tool_call_id", "invalid_value")
            msg |= {"tool_call_id": call_id, "name": called[call_id]}
        out.append(msg)
    return out


# -- tools, tool_choice, response_format -----------------------------------------------------------------


def _schema(value, param: str) -> dict:
    try:
        check_schema(value)
    except LocalmixError as e:
        raise _bad(f"'{param}': {e}", param, "invalid_schema") from None
    return value


def _tools(value) -> list[dict] | None:
    """OpenAI's tools as specs {"name", "description", "parameters"}; an empty list is no tools."""
    specs = []
    for k, tool in enumerate(value or []):
        where = f"tools[{k}]"
        _typed(tool, ("object",), where)
        if tool.get("type", "function") != "function":
            raise _bad(f"'{where}.type' must be \"function\"", f"{where}.type", "invalid_value")
        fn = _typed(tool.get("function"), ("object",), f"{where}.function")
        name = _typed(fn.get("name"), ("string",), f"{where}.function.name")
        if not TOOL_NAME.match(name):
            raise _bad(f"'{where}.function.name' must be 1 to 64 letters, digits, _ or -", f"{where}.function.name", "invalid_value")
        if any(s["name"] == name for s in specs):
            raise _bad(f"'{where}.function.name': two tools are called {name}", f"{where}.function.name", "invalid_value")
        parameters = _typed(fn.get("parameters"), ("object",), f"{where}.function.parameters", optional=True)
        parameters = {"type": "object", "properties": {}} if parameters is None else parameters
        if parameters.get("type", "object") != "object":
            raise _bad(f"'{where}.function.parameters' must describe an object", f"{where}.function.parameters", "invalid_schema")
        specs.append({"name": name,
                      "description": _typed(fn.get("description"), ("string",), f"{where}.function.description", optional=True) or "",
                      "parameters": _schema(parameters, f"{where}.function.parameters")})
    return specs or None


CHOICES = ("auto", "none", "required")


def _tool_choice(value, tools: list[dict] | None) -> str:
    """"auto" | "none" | "required" | a tool name; without tools only "auto" and "none" mean anything."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in CHOICES:
            raise _bad(f"'tool_choice' must be one of {', '.join(CHOICES)} or a function", "tool_choice", "invalid_value")
        choice = value
    else:
        if value.get("type") != "function":
            raise _bad("'tool_choice.type' must be \"function\"", "tool_choice.type", "invalid_value")
        fn = _typed(value.get("function"), ("object",), "tool_choice.function")
        choice = _typed(fn.get("name"), ("string",), "tool_choice.function.name")
        if not any(t["name"] == choice for t in tools or []):
            raise _bad(f"'tool_choice' names a function that is not among the tools: {json.dumps(choice)[:80]}",
                       "tool_choice.function.name", "invalid_value")
    if choice == "required" and not tools:
        raise _bad("'tool_choice' is \"required\" but there are no tools", "tool_choice", "invalid_value")
    return "none" if not tools else choice


def _response_format(value) -> dict | None:
    """The schema the answer must follow: json_object any object (llama-server's "schema" taken too),
    json_schema its schema (checked: the grammar must be able to enforce it)."""
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = _typed(value.get("schema"), ("object",), "response_format.schema", optional=True)
        return ANY_JSON_OBJECT if schema is None else _schema(schema, "response_format.schema")
    if kind == "json_schema":
        spec = _typed(value.get("json_schema"), ("object",), "response_format.json_schema")
        schema = _typed(spec.get("schema"), ("object",), "response_format.json_schema.schema", optional=True)
        return ANY_JSON_OBJECT if schema is None else _schema(schema, "response_format.json_schema.schema")
    raise _bad("'response_format.type' must be text, json_object or json_schema", "response_format.type", "invalid_value")


# -- responses -------------------------------------------------------------------------------------------

# localmix's reasons -> OpenAI's finish_reason (a cancelled answer has no one left to read it)
FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}


def new_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage(finish) -> dict:
    """OpenAI's usage object from a Finish."""
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}


def completion(id: str, created: int, model: str, finish) -> dict:
    """The chat.completion object of a Finish (content None when the answer is tool calls)."""
    message = {"role": "assistant", "content": None if finish.tool_calls else finish.content, "refusal": None}
    if finish.tool_calls:
        message["tool_calls"] = openai_tool_calls(finish.tool_calls)
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH_REASONS[finish.reason]}],
            "usage": usage(finish), "system_fingerprint": None}


def chunk(id: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """One chat.completion.chunk of a stream (`finish_reason`: localmix's or OpenAI's)."""
    reason = FINISH_REASONS.get(finish_reason, finish_reason)
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def closing_chunks(id: str, created: int, model: str, finish) -> list[dict]:
    """The chunks that end a stream after its text deltas: the tool calls (if any), then the finish reason."""
    calls = [chunk(id, created, model, {"tool_calls": openai_tool_calls(finish.tool_calls, indexed=True)})] if finish.tool_calls else []
    return [*calls, chunk(id, created, model, {}, finish.reason)]


def usage_chunk(id: str, created: int, model: str, finish) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": usage(finish)}


def model_object(name: str, created: int, extra: dict | None = None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "localmix", **(extra or {})}

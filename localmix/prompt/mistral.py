"""Mistral's native tool format (v3 tokenizer: Mixtral 8x22B), as mistral-common encodes it.

A conversation becomes a sequence of control tokens and text segments; each text segment is tokenized
on its own (SentencePiece adds its word-start space to each), exactly as mistral-common's
InstructTokenizerV3 does:

  <s> ... [AVAILABLE_TOOLS] tools-json [/AVAILABLE_TOOLS] [INST] system\\n\\nlast user [/INST]
  assistant text </s>   or   [TOOL_CALLS] calls-json </s>   and   [TOOL_RESULTS] result-json [/TOOL_RESULTS]

Messages are plain dicts: {"role": "system"|"user"|"assistant"|"tool", "content": str,
"tool_calls": [{"id", "name", "arguments": dict}], "tool_call_id": str, "name": str}.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ToolCallError

CONTROL = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
BOS, EOS = "<s>", "</s>"


@dataclass(frozen=True)
class Control:
    """A special token, by its text."""

    text: str


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _maybe_json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError, RecursionError):  # nested too deeply to read: text it stays
        return text


ID = re.compile(r"^[A-Za-z0-9]{9}$")
ALNUM = string.ascii_letters + string.digits


def wire_id(call_id: str) -> str:
    """A call id as Mistral's models were trained on (9 letters and digits): other servers' ids
    ("call_..." from OpenAI's) mapped to one deterministically, so that a call and its result still match."""
    if ID.match(call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "replace")).digest()[:8], "big")
    return "".join(ALNUM[(n // 62**k) % 62] for k in range(9))


def tool_spec(tool: dict) -> dict:
    """A tool as Mistral lists it: {"type": "function", "function": {name, description, parameters}}."""
    return {"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""),
                                             "parameters": tool.get("parameters", {"type": "object", "properties": {}})}}


def segments(messages: list[dict], tools: list[dict] | None = None) -> list:
    """The v3 sequence for a conversation: Control tokens and text segments, BOS first."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m.get("content"))
    rest = [m for m in messages if m["role"] != "system"]
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    out: list = [Control(BOS)]
    for i, m in enumerate(rest):
        role = m["role"]
        if role == "user":
            if i == last_user and tools:
                out += [Control("[AVAILABLE_TOOLS]"), _json([tool_spec(t) for t in tools]), Control("[/AVAILABLE_TOOLS]")]
            content = f"{system}\n\n{m['content']}" if i == last_user and system else m["content"]
            out += [Control("[INST]"), content, Control("[/INST]")]
        elif role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                call = {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], dict) else _maybe_json(c["arguments"])}
                if c.get("id"):
                    call["id"] = wire_id(c["id"])
                calls.append(call)
            out += [Control("[TOOL_CALLS]"), _json(calls), Control(EOS)]
        elif role == "assistant":
            out += [m["content"].rstrip(" "), Control(EOS)]
        elif role == "tool":
            result = {"content": _maybe_json(m["content"]), "call_id": wire_id(m["tool_call_id"])}
            out += [Control("[TOOL_RESULTS]"), _json(result), Control("[/TOOL_RESULTS]")]
        else:
            raise ValueError(f"unknown role {role!r}")
    return out


def encode(messages: list[dict], tools: list[dict] | None, tokenize: Callable[[str], list[int]], ids: dict[str, int]) -> list[int]:
    """Token ids: `tokenize` turns one text segment into ids (with SentencePiece's word-start space,
    no BOS); `ids` maps each control token's text to its id."""
    tokens: list[int] = []
    for s in segments(messages, tools):
        tokens += [ids[s.text]] if isinstance(s, Control) else tokenize(s)
    return tokens


def new_call_id() -> str:
    """Mistral's call ids are 9 letters and digits."""
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


def parse_tool_calls(text: str, known: set[str] | None = None) -> list[dict]:
    """The calls in a [TOOL_CALLS] reply (the text after the control token): a JSON list of
    {"name", "arguments"[, "id"]}. Raises ToolCallError with a readable reason otherwise."""
    text = text.strip()
    if text.startswith("[TOOL_CALLS]"):
        text = text[len("[TOOL_CALLS]"):].strip()
    try:
        data = json.loads(text, strict=False)  # a control character inside a string is still the model's call
    except json.JSONDecodeError as e:
        raise ToolCallError(f"the model's tool call is not valid JSON ({e.msg} at character {e.pos}): {text[:120]!r}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise ToolCallError(f"the model's tool call is not a list of calls: {text[:120]!r}")
    calls = []
    for c in data:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise ToolCallError(f"a tool call has no name: {_json(c)[:120]}")
        args = c.get("arguments", {})
        if isinstance(args, str):
            args = _maybe_json(args)
        if not isinstance(args, dict):
            raise ToolCallError(f"the arguments of {c['name']} are not a JSON object: {_json(args)[:120]}")
        if known is not None and c["name"] not in known:
            raise ToolCallError(f"the model called an unknown tool {c['name']!r} (available: {', '.join(sorted(known))})")
        calls.append({"id": c.get("id") or new_call_id(), "name": c["name"], "arguments": args})
    return calls

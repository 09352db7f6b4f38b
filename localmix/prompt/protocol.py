"""Tools for models without Mistral's tool tokens: a JSON protocol described in the system prompt. The
model calls tools by replying with only {"tool_calls": [{"name", "arguments"}]}; results come back as a
user message. Both directions live here: the conversation as plain chat messages, and the calls read
back out of a reply."""

from __future__ import annotations

import json

from ..errors import ToolCallError
from .mistral import parse_tool_calls

PROTOCOL = (
    "You can call these tools (JSON schemas):\n{tools}\n\n"
    "To call tools, reply with only a JSON object: "
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{...}}}}]}}. '
    "The results come back in the next message; then answer the user normally."
)


def protocol_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """A tool conversation in plain chat messages."""
    intro = PROTOCOL.format(tools=json.dumps(tools, ensure_ascii=False))
    systems = [m["content"] for m in messages if m["role"] == "system" and m.get("content")]
    out = [{"role": "system", "content": "\n\n".join([*systems, intro])}]
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["name"], "arguments": c["arguments"]} for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"Result of {m.get('name', 'the tool')}: {m['content']}\n"
                                                   "Use it to answer my question in words."})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def find_calls(text: str, native: bool, forced: bool, known: set[str]) -> list[dict]:
    """The calls in a reply, [] for a plain answer; ToolCallError for a call that cannot be read.
    `native`: Mistral's [TOOL_CALLS] format; `forced`: the reply had to be a call."""
    stripped = text.strip()
    if native:
        if forced or stripped.startswith("[TOOL_CALLS]"):
            return parse_tool_calls(stripped, known)
        return []
    if stripped.startswith("{") and '"tool_calls"' in stripped:
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            if forced:
                raise ToolCallError(f"the model's tool call is not valid JSON ({e.msg}); was it cut by --max-tokens? "
                                    f"{stripped[:120]!r}") from None
            return []
        if isinstance(data, dict) and "tool_calls" in data:
            return parse_tool_calls(json.dumps(data["tool_calls"]), known)
    if forced:
        raise ToolCallError(f"the model did not call a tool: {stripped[:120]!r}")
    return []

"""The call-and-answer loop: the model calls tools, localmix runs them (asking first for tools with side
effects), feeds the results back, until the model answers in words or the round limit is reached.

Two ways to speak tools: Mistral's native tokens (models whose vocabulary has [AVAILABLE_TOOLS], such as
Mixtral 8x22B), and for every other model a JSON protocol described in the system prompt,
{"tool_calls": [{"name", "arguments"}]}. Either way a grammar can force a valid call."""

from __future__ import annotations

import json
from typing import Callable

from . import ToolSet
from .grammar import call_or_words_grammar, grammar_for, native_calls_schema, protocol_schema, words_grammar
from .mistral import ToolCallError, parse_tool_calls

MAX_ROUNDS = 6

PROTOCOL = (
    "You can call these tools (JSON schemas):\n{tools}\n\n"
    "To call tools, reply with only a JSON object: "
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{...}}}}]}}. '
    "The results come back in the next message; then answer the user normally."
)


class ToolLoopError(Exception):
    pass


def protocol_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """A tool conversation in plain chat messages, for models without native tool tokens."""
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


def find_calls(text: str, native: bool, forced: bool, toolset: ToolSet) -> list[dict]:
    """The calls in a reply, [] for a plain answer; ToolCallError for a call that cannot be read."""
    known = set(toolset.tools)
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


def run_tools(backend, messages: list[dict], toolset: ToolSet, sampling, *, choice: str = "auto",
              confirm: Callable[[dict], bool] = lambda call: False, on_call: Callable[[dict, str], None] | None = None,
              on_text: Callable[[str], None] | None = None, on_calls: Callable[[list[dict]], None] | None = None,
              max_rounds: int = MAX_ROUNDS) -> str:
    """Run the loop; returns the final answer and appends the whole exchange to `messages`.
    choice: "auto" (the model decides each round), "required" (one round of calls of any tool, then an
    answer in words), or a tool name (one round calling that tool, then an answer in words)."""
    specs = toolset.specs()
    if choice not in ("auto", "required") and choice not in toolset:
        raise ToolLoopError(f"--tool-choice {choice}: no such tool (available: {', '.join(toolset.tools)})")
    native = backend.native_tools
    for round_ in range(max_rounds):
        forced = choice != "auto" and round_ == 0
        grammar = None
        if forced:
            allowed = specs if choice == "required" else [toolset[choice].spec()]
            grammar = grammar_for(native_calls_schema(allowed) if native else protocol_schema(allowed))
        elif choice != "auto":
            grammar = words_grammar()  # the forced calls are done: now the answer
        elif not native:
            grammar = call_or_words_grammar(protocol_schema(specs))  # a well-formed call, or words
        pieces = []
        for piece in backend.stream(messages, sampling, tools=specs, grammar=grammar, force_tool_calls=forced and native):
            pieces.append(piece)
            if on_text and not forced:
                on_text(piece)
        text = "".join(pieces)
        calls = find_calls(text, native, forced, toolset)
        if not calls:
            messages.append({"role": "assistant", "content": text})
            return text
        messages.append({"role": "assistant", "tool_calls": calls})
        if on_calls:
            on_calls(calls)
        for call in calls:
            t = toolset[call["name"]]
            if t.side_effects and not confirm(call):
                result = json.dumps({"error": "the user did not allow this call"})
            else:
                result = toolset.run(call)
            if on_call:
                on_call(call, result)
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": result})
    raise ToolLoopError(f"stopped after {max_rounds} rounds of tool calls without an answer")

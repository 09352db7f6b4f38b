"""The call-and-answer loop: the model calls tools, localmix runs them (asking first for tools with side
effects), feeds the results back, until the model answers in words or the round limit is reached.

Two ways to speak tools (localmix.prompt): Mistral's native tokens for models whose vocabulary has them
(Mixtral 8x22B), the JSON protocol for every other model. Either way a grammar can force a valid call.
One generation of the loop is a Round (localmix.backends): `tool_round` for a model loaded here, a
ChatBackend's `chat` for a model behind a server (which speaks tools its own way). The loop is a
generator of events: the answer's Text, each round's ToolCalls and ToolResult, and one Done at the end.
The server (localmix/server/engine.py) runs single rounds: its client runs the tools."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from .. import prompt
from ..backends import Backend, ChatBackend, Done, Event, Round, Sampling, Text, ToolCalls, ToolResult
from ..errors import ToolCallError
from ..prompt.protocol import find_calls
from . import ToolSet
from .grammar import WORDS_GBNF, call_or_words_grammar, grammar_for, native_calls_schema, protocol_schema

MAX_ROUNDS = 6
REFUSED = '{"error": "the user did not allow this call"}'
UNKNOWN = '{"error": "there is no tool of that name"}'


def forced(choice: str) -> bool:
    """The round must be a call: "required", or a tool's name."""
    return choice not in ("auto", "none")


def tool_round(backend: Backend, messages: list[dict], specs: list[dict] | None, choice: str, sampling: Sampling
               ) -> Iterator[Text | ToolCalls | Done]:
    """One generation with `specs` on offer, on a model loaded here (a Round). choice: "auto" (a call or
    words, as the model likes), "none" (words; the tools are still described), "required" (calls of any
    tool) or a tool's name (one call of it). Every piece of text is yielded, a call's own included; the
    calls read from it follow as one ToolCalls, then the Done."""
    specs = specs or []
    fmt, tok = backend.info.prompt, backend.tokenizer
    native = prompt.native(fmt, tok)
    grammar = None
    if forced(choice):  # a named tool is called once; "required" allows several calls
        allowed, most = (specs, None) if choice == "required" else ([s for s in specs if s["name"] == choice], 1)
        if not allowed:
            raise ToolCallError(f"tool choice {choice}: no such tool (available: {', '.join(s['name'] for s in specs)})")
        grammar = grammar_for(native_calls_schema(allowed, most) if native else protocol_schema(allowed, most))
    elif choice == "none" and specs:
        grammar = WORDS_GBNF
    elif specs and not native:
        grammar = call_or_words_grammar(protocol_schema(specs))  # a well-formed call, or words
    tokens = prompt.encode(fmt, tok, messages, specs or None, force_tool_calls=forced(choice) and native)
    pieces, done = [], None
    for event in backend.generate(tokens, sampling, grammar):
        if isinstance(event, Text):
            pieces.append(event.text)
            yield event
        else:
            done = event
    if specs and choice != "none" and done.stats.stop != "cancelled":
        try:
            calls = find_calls("".join(pieces), native, forced(choice), {s["name"] for s in specs})
        except ToolCallError:
            if done.stats.stop != "length":
                raise
            calls = []  # a call cut by the token limit: the round ends without one, and its Done says why
        if calls:
            yield ToolCalls(calls)
    yield done


def round_for(backend: Backend | ChatBackend) -> Round:
    """The backend's Round: a server's own, or tool_round on a model loaded here."""
    return backend.chat if isinstance(backend, ChatBackend) else partial(tool_round, backend)


def run_tools(backend: Backend | ChatBackend, messages: list[dict], toolset: ToolSet, sampling: Sampling, *,
              choice: str = "auto", confirm: Callable[[dict], bool] = lambda call: False,
              max_rounds: int = MAX_ROUNDS) -> Iterator[Event]:
    """choice: "auto" (the model decides each round), "required" (one round of calls of any tool, then an
    answer in words), or a tool name (one round calling that tool, then an answer in words).
    `confirm(call)` is asked before a tool with side effects runs."""
    specs = toolset.specs()
    if choice not in ("auto", "required") and choice not in toolset:
        raise ToolCallError(f"--tool-choice {choice}: no such tool (available: {', '.join(toolset.tools)})")
    round_ = round_for(backend)
    messages = list(messages)
    for n in range(max_rounds):
        this = choice if n == 0 or choice == "auto" else "none"  # the forced calls are done: now the answer
        calls, done = [], None
        for event in round_(messages, specs, this, sampling):
            if isinstance(event, Text):
                if not forced(this):  # a forced round is a call: nothing of it is the answer
                    yield event
            elif isinstance(event, ToolCalls):
                calls = event.calls
            else:
                done = event
        if forced(this) and not calls and done.stats.stop == "length":
            raise ToolCallError(f"the model's tool call was cut at {sampling.max_tokens} tokens; allow more (--max-tokens)")
        if not calls or done.stats.stop == "cancelled":
            yield done
            return
        yield ToolCalls(calls)
        messages.append({"role": "assistant", "tool_calls": calls})
        for call in calls:
            result = _result(toolset, call, confirm)
            yield ToolResult(call, result)
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": result})
    raise ToolCallError(f"stopped after {max_rounds} rounds of tool calls without an answer")


def _result(toolset: ToolSet, call: dict, confirm: Callable[[dict], bool]) -> str:
    """What the model reads back for one call (a server's call may name a tool this side does not have)."""
    if call["name"] not in toolset:
        return UNKNOWN
    if toolset[call["name"]].side_effects and not confirm(call):
        return REFUSED
    return toolset.run(call)

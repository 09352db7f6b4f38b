"""The call-and-answer loop: the model calls tools, localmix runs them (asking first for tools with side
effects), feeds the results back, until the model answers in words or the round limit is reached.

Two ways to speak tools (localmix.prompt): Mistral's native tokens for models whose vocabulary has them
(Mixtral 8x22B), the JSON protocol for every other model. Either way a grammar can force a valid call.
The loop is a generator of events: the answer's Text, each round's ToolCalls and ToolResult, and one
Done at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .. import prompt
from ..backends import Backend, Event, Sampling, Text, ToolCalls, ToolResult
from ..errors import ToolCallError
from ..prompt.protocol import find_calls
from . import ToolSet
from .grammar import WORDS_GBNF, call_or_words_grammar, grammar_for, native_calls_schema, protocol_schema

MAX_ROUNDS = 6
REFUSED = '{"error": "the user did not allow this call"}'


def run_tools(backend: Backend, messages: list[dict], toolset: ToolSet, sampling: Sampling, *, choice: str = "auto",
              confirm: Callable[[dict], bool] = lambda call: False, max_rounds: int = MAX_ROUNDS) -> Iterator[Event]:
    """choice: "auto" (the model decides each round), "required" (one round of calls of any tool, then an
    answer in words), or a tool name (one round calling that tool, then an answer in words).
    `confirm(call)` is asked before a tool with side effects runs."""
    specs = toolset.specs()
    if choice not in ("auto", "required") and choice not in toolset:
        raise ToolCallError(f"--tool-choice {choice}: no such tool (available: {', '.join(toolset.tools)})")
    fmt, tok = backend.info.prompt, backend.tokenizer
    native = prompt.native(fmt, tok)
    messages = list(messages)
    for round_ in range(max_rounds):
        forced = choice != "auto" and round_ == 0
        grammar = None
        if forced:  # a named tool is called once; "required" allows several calls
            allowed, most = (specs, None) if choice == "required" else ([toolset[choice].spec()], 1)
            grammar = grammar_for(native_calls_schema(allowed, most) if native else protocol_schema(allowed, most))
        elif choice != "auto":
            grammar = WORDS_GBNF  # the forced calls are done: now the answer
        elif not native:
            grammar = call_or_words_grammar(protocol_schema(specs))  # a well-formed call, or words
        tokens = prompt.encode(fmt, tok, messages, specs, force_tool_calls=forced and native)
        pieces, done = [], None
        for event in backend.generate(tokens, sampling, grammar):
            if isinstance(event, Text):
                pieces.append(event.text)
                if not forced:
                    yield event
            else:
                done = event
        if done is not None and done.stats.stop == "cancelled":
            yield done
            return
        text = "".join(pieces)
        calls = find_calls(text, native, forced, set(toolset.tools))
        if not calls:
            yield done
            return
        yield ToolCalls(calls)
        messages.append({"role": "assistant", "tool_calls": calls})
        for call in calls:
            result = REFUSED if toolset[call["name"]].side_effects and not confirm(call) else toolset.run(call)
            yield ToolResult(call, result)
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["name"], "content": result})
    raise ToolCallError(f"stopped after {max_rounds} rounds of tool calls without an answer")

"""One chat-completions request answered on a model loaded here: a blocking generator of Delta (answer text
to send now) and one Finish. The HTTP layer (app.py) runs it in a thread, one at a time, and stops it with
backend.cancel().

Each generation is a Round (tools.loop.tool_round: the prompt encoded, a grammar for forced calls, the
calls read back). What the client sees of it:
- text that may still turn out to be a tool call is held (Mistral's native format: the reply starts with
  [TOOL_CALLS]; the JSON protocol: with "{"); the rest is sent as soon as it comes; held text that never
  became words (a call cut short or unreadable) is no part of the content;
- `stop` strings cut the answer: a tail that could begin one is held back until it cannot, and when one
  appears the generation is cancelled;
- calls of the server's own tools (side-effect free, `serve --tools`) are run and the loop goes on; calls
  of the client's tools end the answer (reason "tool_calls"): the client runs them, as the API intends;
- response_format: the answer is generated under the schema's grammar and validated (a failure, which
  the grammar should make impossible, is ApiError(500) after the Deltas); with tools on offer, words
  from a round with tools are dropped and the answer generated again under the grammar.
Request errors (prompt longer than the context, a template that rejects the conversation, a schema the
grammar cannot enforce) are ApiError(400) raised before any Delta; a worker that stops answering (WorkerError) is not one: the HTTP
layer answers it as the server's failure."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import prompt
from ..backends import Backend, Done, Sampling, Stats, Text, ToolCalls
from ..errors import ContextFull, LocalmixError, TemplateError, ToolCallError, WorkerError
from ..prompt.mistral import new_call_id
from ..tools import ToolSet
from ..tools.grammar import grammar_for, validate
from ..tools.loop import MAX_ROUNDS, forced, tool_round
from .api import ApiError, ChatRequest

CALL_MARK = "[TOOL_CALLS]"
REFUSED = '{"error": "this tool has side effects: the server does not run it"}'


@dataclass(frozen=True)
class Delta:
    text: str  # answer content to send now (never part of a tool call)


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    content: str  # the whole answer text ("" for tool calls; JSON text for response_format)
    tool_calls: list = field(default_factory=list)  # localmix calls {"id", "name", "arguments": dict}
    prompt_tokens: int = 0  # the whole prompt (cached included), summed over the server's tool rounds
    cached_tokens: int = 0
    completion_tokens: int = 0


# -- stop strings ----------------------------------------------------------------------------------------


class StopFilter:
    """Text with `stops` cut out: feed() returns what may be sent now, holding back a tail that could
    begin a stop string; after a stop string, nothing more passes."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, out, self.held = True, self.held[:min(found)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held) + 1)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out


# -- what the client may see of a round ------------------------------------------------------------------


def may_be_call(text: str, native: bool) -> bool:
    """The text so far may still be a tool call (so it is held): Mistral's [TOOL_CALLS] begun or
    started; in the JSON protocol, nothing yet or an opening "{" (its words never start with one)."""
    s = text.lstrip()
    return (CALL_MARK.startswith(s) or s.startswith(CALL_MARK)) if native else (not s or s.startswith("{"))


@dataclass
class Totals:
    prompt: int = 0
    cached: int = 0
    completion: int = 0

    def add(self, stats: Stats) -> None:
        whole = stats.prompt_tokens + stats.cached_tokens
        self.prompt += whole
        self.cached += stats.cached_tokens
        # Tokens sampled: all are in the KV cache but the last, unless that was the end of text (never
        # evaluated, not counted). llama.cpp's own counters count a one-token prefill as decoding.
        self.completion += max(0, stats.ctx_used - whole + (stats.stop != "eos")) if stats.ctx_used else 0


def _with_ids(calls: list[dict]) -> list[dict]:
    """Calls whose ids are distinct non-empty strings (a model writing its own ids may write anything)."""
    seen: set[str] = set()
    out = []
    for c in calls:
        call_id = c.get("id")
        if not isinstance(call_id, str) or not call_id or call_id in seen:
            call_id = new_call_id()
        seen.add(call_id)
        out.append({**c, "id": call_id})
    return out


def _schema_round(backend: Backend, messages: list[dict], specs: list[dict] | None, grammar: str, sampling: Sampling
                  ) -> Iterator[Text | Done]:
    """A generation under the response_format's grammar (the tools, if any, still described)."""
    yield from backend.generate(prompt.encode(backend.info.prompt, backend.tokenizer, messages, specs or None), sampling, grammar)


def _request_errors(fn):
    """Expected failures of the request itself, as OpenAI's 400 errors (raised before any Delta: each
    comes out of a round's first step, and the rounds before the answer's send nothing)."""

    def wrapped(*args, **kwargs):
        try:
            return (yield from fn(*args, **kwargs))
        except (ApiError, WorkerError):  # a worker that stopped is the server's failure, not the request's
            raise
        except ContextFull as e:
            raise ApiError(400, f"{e}: shorten the conversation", param="messages", code="context_length_exceeded") from None
        except TemplateError as e:
            raise ApiError(400, str(e), param="messages", code="template_error") from None
        except LocalmixError as e:  # a schema the grammar cannot express, a grammar llama.cpp cannot take
            raise ApiError(400, str(e), code="invalid_request") from None

    return wrapped


# -- the answer ------------------------------------------------------------------------------------------

REASONS = {"eos": "stop", "length": "length", "cancelled": "cancelled"}  # a generation's stop -> the answer's reason


def answer(backend: Backend, req: ChatRequest, *, server_tools: ToolSet | None = None) -> Iterator[Delta | Finish]:
    """The answer to `req`, streamed: Delta pieces of content, then one Finish."""
    return _answer(backend, req, server_tools)


@_request_errors
def _answer(backend: Backend, req: ChatRequest, server_tools: ToolSet | None):
    client = {t["name"] for t in req.tools or []}
    ours = [s for s in (server_tools.specs() if server_tools else []) if s["name"] not in client]  # the client's win
    specs = [*(req.tools or []), *ours] or None
    grammar = grammar_for(req.schema) if req.schema is not None else None
    native = prompt.native(backend.info.prompt, backend.tokenizer)
    messages, totals, stops, sent = list(req.messages), Totals(), StopFilter(req.stop), []
    words = False  # the next round must be the answer in words (or in the response format)
    for n in range(MAX_ROUNDS + 1):
        choice = "none" if words or n == MAX_ROUNDS else _choice(req.tool_choice, n, bool(client), bool(ours))
        if specs is None or choice == "none":
            rounds = (_schema_round(backend, messages, specs, grammar, req.sampling) if grammar is not None
                      else tool_round(backend, messages, specs, "none", req.sampling))
            mode = "send"
        else:  # with response_format, words from a round with tools are not the answer: that comes under the grammar
            rounds = tool_round(backend, messages, specs, choice, req.sampling)
            mode = "hold" if forced(choice) or grammar is not None else "decide"
        calls, stats = yield from _round(backend, rounds, mode, native, stops, sent, req.sampling.max_tokens)
        totals.add(stats)
        if calls:
            mine = [c for c in calls if c["name"] in client]
            if mine or not ours:
                yield _finish("tool_calls", "", _with_ids(mine or calls), totals)
                return
            messages += _run(server_tools, _with_ids(calls))
            continue
        if mode == "hold" and grammar is not None and stats.stop != "cancelled":
            words = True
            continue
        tail = stops.flush()  # what was held back as the possible start of a stop string
        if tail:
            sent.append(tail)
            yield Delta(tail)
        reason = "stop" if stops.hit else REASONS[stats.stop]
        content = "".join(sent)
        if grammar is not None and reason == "stop" and not stops.hit:
            try:
                validate(content, req.schema)
            except LocalmixError as e:
                raise ApiError(500, f"the answer does not follow the response format: {e}", type="server_error",
                               code="invalid_output") from None
        yield _finish(reason, content, [], totals)
        return
    raise AssertionError("the last round answers in words")  # pragma: no cover


def _choice(asked: str, n: int, client_tools: bool, server_tools: bool) -> str:
    """The choice for round `n`: the client's first; after a round of the server's tools a forced choice
    has been met, so the model decides ("auto")."""
    if not client_tools:
        return "auto" if server_tools else "none"
    return asked if n == 0 or asked in ("auto", "none") else "auto"


def _run(tools: ToolSet, calls: list[dict]) -> list[dict]:
    """The server's tools run: the call and its results as messages (a tool with side effects is not run)."""
    out = [{"role": "assistant", "content": "", "tool_calls": calls}]
    for c in calls:
        result = REFUSED if tools[c["name"]].side_effects else tools.run(c)
        out.append({"role": "tool", "tool_call_id": c["id"], "name": c["name"], "content": result})
    return out


def _finish(reason: str, content: str, calls: list[dict], totals: Totals) -> Finish:
    return Finish(reason, content, calls, totals.prompt, totals.cached, totals.completion)


def _round(backend: Backend, rounds, mode: str, native: bool, stops: StopFilter, sent: list[str], limit: int):
    """Consume one round: yields the Deltas it may send; returns (calls, stats). mode: "send" (words),
    "hold" (a call, or words that are not the answer), "decide" (held while it may be a call). Text held
    to the end is never content: it is a call, one cut short or unreadable, or words under a wrong format."""
    held, pieces, calls, stats = "", 0, [], None
    try:
        for event in rounds:
            if isinstance(event, Text):
                pieces += 1
                if mode == "decide":
                    held += event.text
                    if may_be_call(held, native):
                        continue
                    mode, event, held = "send", Text(held), ""
                if mode == "hold":
                    continue
                piece = stops.feed(event.text)
                if piece:
                    sent.append(piece)
                    yield Delta(piece)
                if stops.hit:
                    backend.cancel()  # the rest would be cut: stop generating it
            elif isinstance(event, ToolCalls):
                calls = event.calls
            elif isinstance(event, Done):
                stats = event.stats
    except ToolCallError:
        # A call that cannot be read (tool_round reads calls before its Done, whose numbers are lost): a
        # forced one cut by max_tokens (its grammar allows nothing else), or [TOOL_CALLS] and then no call.
        return [], Stats(stop="length" if mode == "hold" or pieces >= limit else "eos")
    return calls, stats

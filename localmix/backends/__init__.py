"""The interface between localmix and an inference engine, and the events a reply is made of.

A backend loads a model, evaluates the tokens it is given and samples: it knows nothing of messages,
chat templates or tools (localmix.prompt turns conversations into tokens; localmix.reply runs a turn).
`run`, `bench`, `chat` and the tool loop use only this Protocol; backends/llama.py is the llama.cpp one.
A ChatBackend takes conversations instead (a server, backends/openai.py): `chat --server` uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

from ..model_info import ModelInfo
from ..prompt import Tokenizer


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int = 0  # evaluated for this reply
    cached_tokens: int = 0  # reused from the conversation's KV cache
    prompt_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    ttft: float = 0.0  # seconds from the request to the first token
    ctx_used: int = 0
    ctx_total: int = 0
    stop: str = ""  # "eos", "length", "cancelled"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_seconds if self.gen_seconds else 0.0


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    frequency_penalty: float = 0.0  # OpenAI's: less of a token the more often it already came
    presence_penalty: float = 0.0  # less of any token that already came


@dataclass(frozen=True)
class Speed:
    """Measured tokens per second (bench)."""

    prefill_tps: float
    decode_tps: float


# -- events ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A piece of the reply, as it is generated."""

    text: str


@dataclass(frozen=True)
class Done:
    """The end of one generation, with its numbers (stats.stop says why it ended)."""

    stats: Stats


@dataclass(frozen=True)
class Trimmed:
    """`dropped` old messages were left out of the prompt to fit the context."""

    dropped: int


@dataclass(frozen=True)
class ToolCalls:
    """The model asked for these calls ({"id", "name", "arguments"}); the text streamed since the last
    event was the call itself."""

    calls: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ToolResult:
    """One call ran (or was refused); `result` is what the model reads next."""

    call: dict
    result: str


Event = Union[Text, Done, Trimmed, ToolCalls, ToolResult]  # noqa: UP007 - a runtime alias, Python 3.10

# One generation of a turn: (messages, the tools on offer or None, the choice for this round, sampling).
# choice: "auto" | "none" (tools described, words forced) | "required" | a tool name. It yields the Text
# pieces (a call's own text included), then one ToolCalls if the model called tools, then one Done.
# tools.loop.tool_round is the one for a token backend; a ChatBackend's `chat` is one.
Round = Callable[[list[dict], Union[list[dict], None], str, Sampling], Iterator[Union[Text, ToolCalls, Done]]]  # noqa: UP007


class Backend(Protocol):
    info: ModelInfo  # the model (its prompt format included)
    ctx: int  # the context window, in tokens

    @property
    def tokenizer(self) -> Tokenizer: ...

    def load(self, progress: Callable[[float], None] | None = None) -> None: ...

    def generate(self, tokens: list[int], sampling: Sampling, grammar: str | None = None) -> Iterator[Text | Done]:
        """The reply to `tokens`, piece by piece, then one Done. `grammar`: GBNF the reply must follow.
        ContextFull when the tokens leave no room."""
        ...

    def measure(self, prompt_tokens: list[int], gen_tokens: int) -> Speed:
        """Prefill `prompt_tokens` in one batch, then decode `gen_tokens` one at a time."""
        ...

    def cancel(self) -> None:
        """Stop the reply being generated (from any thread); it ends with Done(stop="cancelled")."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ChatBackend(Protocol):
    """A backend that takes conversations, not tokens: a server that speaks the OpenAI API
    (backends/openai.py). The prompt, its template and its context are the server's business."""

    ctx: int  # the context window, in tokens; 0 when the server does not say

    def load(self, progress: Callable[[float], None] | None = None) -> None: ...

    def chat(self, messages: list[dict], tools: list[dict] | None, choice: str, sampling: Sampling
             ) -> Iterator[Text | ToolCalls | Done]:
        """A Round (see Round above)."""
        ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...

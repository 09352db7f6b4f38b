"""What `run`, `bench` and `chat` need from an inference engine: load with progress, stream a chat
reply token by token, cancel, report speed. The UI sees only this interface; only
backends/llama.py knows llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol


@dataclass
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


@dataclass
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None


class ContextFull(Exception):
    """The prompt does not fit the context window."""


class Backend(Protocol):
    stats: Stats

    def load(self, progress: Callable[[float], None] | None = None) -> None: ...

    def render(self, messages: list[dict]) -> str: ...

    def count_tokens(self, messages: list[dict]) -> int: ...

    def stream(self, messages: list[dict], sampling: Sampling) -> Iterator[str]: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...

"""Conversations to the tokens a model evaluates. Everything about the prompt is here: the model's chat
template (template.py), Mistral's native tool format (mistral.py), the JSON tool protocol for other
models (protocol.py), counting tokens, and trimming a conversation to the context. The backend is given
the tokens this module makes; it never sees messages.

Messages are plain dicts: {"role": "system"|"user"|"assistant"|"tool", "content": str,
"tool_calls": [{"id", "name", "arguments": dict}], "tool_call_id": str, "name": str}.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

from . import mistral
from .protocol import protocol_messages
from .template import render


@dataclass(frozen=True)
class PromptFormat:
    """How a model wants its conversations: from its GGUF metadata."""

    template: str | None = None  # the Jinja chat template; None: ChatML
    bos: str = ""  # the text of its BOS and EOS tokens, as the template names them
    eos: str = ""
    add_bos: bool = False  # the tokens start with BOS
    native_tools: bool = False  # the vocabulary has Mistral's tool tokens ([AVAILABLE_TOOLS], [TOOL_CALLS]...)


class Tokenizer(Protocol):
    """What the prompt needs of a model's vocabulary (localmix.llamacpp.Engine is one)."""

    @property
    def bos(self) -> int: ...

    @property
    def eos(self) -> int: ...

    def tokenize(self, text: str, *, special: bool) -> list[int]: ...

    def piece(self, token: int, special: bool = False) -> bytes: ...


_control_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of Mistral's control tokens, {} unless every one is a single token of this vocabulary."""
    if tok not in _control_ids:
        ids = {}
        for text in mistral.CONTROL:
            found = tok.tokenize(text, special=True)
            if len(found) == 1:
                ids[text] = found[0]
        _control_ids[tok] = {**ids, mistral.BOS: tok.bos, mistral.EOS: tok.eos} if len(ids) == len(mistral.CONTROL) else {}
    return _control_ids[tok]


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def native(fmt: PromptFormat, tok: Tokenizer) -> bool:
    """The model speaks tools in Mistral's own tokens."""
    return fmt.native_tools and bool(control_ids(tok))


def encode(fmt: PromptFormat, tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
           force_tool_calls: bool = False) -> list[int]:
    """The tokens that make the model write the next assistant turn. `tools`: the tools on offer (their
    specs); `force_tool_calls`: with native tools, the turn starts with [TOOL_CALLS].

    A model whose vocabulary has Mistral's control tokens (v3: Mixtral 8x22B) gets Mistral's own encoding,
    with or without tools: each text segment tokenized on its own, token for token as mistral-common
    does. Its chat template, tokenized as one text, would put an extra word-start space token after each
    control token ([INST] '▁' '▁Hello')."""
    if native(fmt, tok):
        ids = control_ids(tok)
        tokens = mistral.encode(messages, tools, lambda text: tok.tokenize(text, special=False), ids)
        return tokens + [ids["[TOOL_CALLS]"]] if force_tool_calls else tokens
    if uses_tools(messages, tools):
        messages = protocol_messages(messages, tools or [])
    tokens = tok.tokenize(render(fmt.template, messages, bos=fmt.bos, eos=fmt.eos), special=True)
    if fmt.add_bos and tok.bos >= 0 and tokens[:1] != [tok.bos]:
        tokens.insert(0, tok.bos)
    return tokens


def text_of(tok: Tokenizer, tokens: list[int]) -> str:
    """The text of tokens as the model will read them, control tokens included."""
    return b"".join(tok.piece(t, special=True) for t in tokens).decode("utf-8", errors="replace")


def fit(fmt: PromptFormat, tok: Tokenizer, messages: list[dict], budget: int, tools: list[dict] | None = None
        ) -> tuple[list[dict], int]:
    """The system messages and as much recent history as fits `budget` tokens, tool specifications
    included; returns (messages, how many old messages were left out). The history left starts with a
    user message; the system prompt and the last message are never left out."""
    system = [m for m in messages if m["role"] == "system"]
    history = [m for m in messages if m["role"] != "system"]
    dropped = 0
    while len(history) > 1 and len(encode(fmt, tok, system + history, tools)) > budget:
        history.pop(0)
        dropped += 1
        while len(history) > 1 and history[0]["role"] != "user":
            history.pop(0)
            dropped += 1
    return system + history, dropped

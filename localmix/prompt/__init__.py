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
from .history import repair
from .protocol import protocol_messages
from .template import render_marked


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

    The history is repaired first (history.repair: no two messages of one role in a row). Text from
    users and tools is data: only the template's own markup becomes control tokens, so a message that
    says `<|im_end|>` cannot end its turn.

    A model whose vocabulary has Mistral's control tokens (v3: Mixtral 8x22B) gets Mistral's own encoding,
    with or without tools: each text segment tokenized on its own, token for token as mistral-common
    does. Its chat template, tokenized as one text, would put an extra word-start space token after each
    control token ([INST] '▁' '▁Hello')."""
    messages = repair(messages)
    if native(fmt, tok):
        ids = control_ids(tok)
        tokens = mistral.encode(messages, tools, lambda text: tok.tokenize(text, special=False), ids)
        return tokens + [ids["[TOOL_CALLS]"]] if force_tool_calls else tokens
    if uses_tools(messages, tools):
        messages = repair(protocol_messages(messages, tools or []))
    # The template sees roles and texts only: nothing else of a message can reach its markup unmarked.
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    tokens = template_tokens(fmt, tok, messages)
    if fmt.add_bos and tok.bos >= 0 and tokens[:1] != [tok.bos]:
        tokens.insert(0, tok.bos)
    return tokens


def template_tokens(fmt: PromptFormat, tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The rendered conversation as tokens, content as data. llama.cpp tokenizes a text with special
    tokens by cutting it at each control token and tokenizing the runs of text between them on their
    own; the same is done here, with the control tokens taken from the template's markup only, so a
    normal conversation gets exactly the tokens llama.cpp would give its whole text."""
    _, spans = render_marked(fmt.template, messages, bos=fmt.bos, eos=fmt.eos)
    if spans is None:  # the template rewrites content: it is rendered with control texts in it defused
        return _defused_tokens(fmt, tok, messages)
    parts = [[piece] if data else _markup(tok, piece) for piece, data in spans]
    if None in parts:  # a control token not where its text is: not seen with llama.cpp's vocabularies
        return _defused_tokens(fmt, tok, messages)
    tokens: list[int] = []
    run: list[str] = []  # text since the last control token
    for part_list in parts:
        for part in part_list:
            if isinstance(part, str):
                run.append(part)
                continue
            if run:
                tokens += tok.tokenize("".join(run), special=False)
                run = []
            tokens.append(part)
    if run:
        tokens += tok.tokenize("".join(run), special=False)
    return tokens


def _defused_tokens(fmt: PromptFormat, tok: Tokenizer, messages: list[dict]) -> list[int]:
    defused = [{**m, "content": defuse(tok, m["content"])} for m in messages]
    return tok.tokenize(render_marked(fmt.template, defused, bos=fmt.bos, eos=fmt.eos)[0], special=True)


_markup_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_control(tok: Tokenizer, token: int) -> bool:
    """A control token (<|im_end|>, [INST], </s>): llama.cpp writes it as nothing unless asked to."""
    return tok.piece(token, special=False) == b"" and tok.piece(token, special=True) != b""


def _markup(tok: Tokenizer, piece: str) -> list[str | int] | None:
    """A piece of the template's markup as text and control-token ids, in order (None if a control
    token cannot be placed in the text)."""
    cache = _markup_cache.setdefault(tok, {})
    if piece not in cache:
        parts: list[str | int] | None = []
        pos = 0
        for t in tok.tokenize(piece, special=True):
            if not is_control(tok, t):
                continue
            name = tok.piece(t, special=True).decode("utf-8", errors="replace")
            at = piece.find(name, pos)
            if at < 0:
                parts = None
                break
            parts += [piece[pos:at], t]
            pos = at + len(name)
        if parts is not None:
            parts = [p for p in [*parts, piece[pos:]] if p != ""]
        if len(cache) > 4096:
            cache.clear()
        cache[piece] = parts
    return cache[piece]


def defuse(tok: Tokenizer, text: str) -> str:
    """`text` with every control token written in it broken by a word joiner (U+2060), so that even a
    reading with special tokens sees text: for templates that rewrite content, which cannot be marked."""
    for _ in range(8):
        names = {tok.piece(t, special=True).decode("utf-8", errors="replace")
                 for t in tok.tokenize(text, special=True) if is_control(tok, t)}
        names = {n for n in names if len(n) > 1 and n in text}
        if not names:
            break
        for name in names:
            text = text.replace(name, f"{name[0]}\u2060{name[1:]}")
    return text


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
    # Where the kept history may start: the whole of it, each later user message, the last message.
    # Fewer messages never take more tokens, so the first start that fits is found by bisection.
    starts = sorted({0, *(i for i, m in enumerate(history) if i and m["role"] == "user"), max(len(history) - 1, 0)})
    if len(encode(fmt, tok, system + history, tools)) <= budget:
        return system + history, 0
    lo, hi = 1 if len(starts) > 1 else 0, len(starts) - 1  # starts[hi] is taken when nothing before it fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(fmt, tok, system + history[starts[mid]:], tools)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return system + history[starts[lo]:], starts[lo]

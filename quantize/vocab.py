"""The tokenizer, written into GGUF metadata the way llama.cpp's convert_hf_to_gguf.py writes it.

Two kinds: SentencePiece (`tokenizer.model`: Mixtral 8x7B's v1, Mixtral 8x22B's v3 with its control
tokens) preferred as llama.cpp prefers it, and byte-level BPE (`tokenizer.json`). Special token ids,
the add-BOS flag and the chat template come from gguf-py's SpecialVocab, which reads
tokenizer_config.json, config.json and chat_template.jinja.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from hashlib import sha256
from importlib import resources
from pathlib import Path

import gguf
from gguf import TokenType

from .checkpoint import read_json
from .errors import QuantizeError, shown
from .metadata import INT_RANGES


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes | str]
    types: list[int]
    scores: list[float] | None = None
    special: gguf.SpecialVocab | None = field(default=None, repr=False)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)


MAX_TOKEN_ID = INT_RANGES["vocab_size"][1]


def _token_id(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_TOKEN_ID:
        raise QuantizeError(f"{where} is {shown(value)}, not a token id")
    return value


def _check_unique(tokens: list[bytes | str], source: str) -> None:
    """llama.cpp aborts on a vocabulary with the same text twice (its text-to-id map must be as long as
    the list)."""
    seen: dict[bytes, int] = {}
    for i, t in enumerate(tokens):
        key = t.encode() if isinstance(t, str) else t
        if key in seen:
            raise QuantizeError(f"{source}: token {shown(key.decode(errors='backslashreplace'))} is both id {seen[key]} and id {i}")
        seen[key] = i


class _SpecialVocab(gguf.SpecialVocab):
    """gguf-py's reader of special token ids, add-BOS flags and the chat template. A token id that is no
    id of this vocabulary (negative, a bool, too large: seen in real config.json files as pad_token_id
    -1) is left out, as llama.cpp's converter leaves out the too-large ones, but without raising or logging."""

    def _set_special_token(self, typ: str, tid) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < (self.n_vocab or MAX_TOKEN_ID):
            super()._set_special_token(typ, tid)


def _chat_template_ok(value: object) -> bool:
    if value is None or isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    )


def check_files(folder: Path) -> None:
    """The tokenizer's JSON and template files are what gguf-py and we expect, or one line names the
    file: checked before any of them is read for its tokens."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        data = read_json(folder / name, required=False) or {}
        if not _chat_template_ok(data.get("chat_template")):
            raise QuantizeError(f"{name}: chat_template is {shown(data.get('chat_template'))}, "
                                "neither text nor a list of named templates")
    text_config = (read_json(folder / "config.json", required=False) or {}).get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        raise QuantizeError(f"config.json: text_config is {shown(text_config)}, not an object")
    for path in [folder / "chat_template.jinja", *sorted(folder.glob("additional_chat_templates/*.jinja"))]:
        try:
            if path.is_file():
                path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QuantizeError(f"{path.name} cannot be read as UTF-8 text: {shown(str(e))}") from None


def special_vocab(folder: Path, n_vocab: int, load_merges: bool = False) -> gguf.SpecialVocab:
    """Special tokens and the chat template (from files `check_files` accepted)."""
    try:
        return _SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OSError) as e:
        # What is left: a structure gguf-py does not expect inside valid JSON (a post_processor that is
        # a number, merges of an unknown format, a text_config that is a list).
        raise QuantizeError(f"the tokenizer files in {folder.name} (tokenizer.json, tokenizer_config.json, config.json) "
                            f"cannot be read: {type(e).__name__}: {shown(str(e))}") from None


def _looks_special(text: str) -> bool:  # convert_hf_to_gguf's does_token_look_special
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _sentencepiece(folder: Path, vocab_size: int | None) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(folder / "tokenizer.model"))
    except (OSError, RuntimeError, ValueError) as e:
        raise QuantizeError(f"tokenizer.model cannot be read: {shown(str(e), 160)}") from None
    n = vocab_size or sp.vocab_size()
    tokens: list[bytes | str] = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [TokenType.UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        kind = TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind

    added = read_json(folder / "added_tokens.json", required=False) or {}
    for text, i in added.items():
        if _token_id(i, f"added_tokens.json: the id of {shown(text)}") < n:
            tokens[i], scores[i], types[i] = text.encode(), -1000.0, TokenType.USER_DEFINED
    for i, text, data in _added_tokens_decoder(folder):
        if i < n:
            if data.get("special") or _looks_special(text):
                types[i] = TokenType.CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[i] = TokenType.USER_DEFINED
            tokens[i], scores[i] = text.encode(), -1000.0
    _check_unique(tokens, "tokenizer.model with tokenizer_config.json")
    return Vocab("llama", "default", tokens, [int(t) for t in types], scores, special_vocab(folder, len(tokens)))


def _added_tokens_decoder(folder: Path) -> list[tuple[int, str, dict]]:
    """tokenizer_config.json's added tokens as (id, text, entry), each checked."""
    name = "tokenizer_config.json"
    decoder = (read_json(folder / name, required=False) or {}).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise QuantizeError(f"{name}: added_tokens_decoder is {shown(decoder)}, not an object")
    out = []
    for key, data in decoder.items():
        if not key.isdecimal() or not isinstance(data, dict) or not isinstance(data.get("content"), str):
            raise QuantizeError(f"{name}: added_tokens_decoder entry {shown(key)}: {shown(data)} is not a token id with its content")
        out.append((_token_id(int(key), f"{name}: added_tokens_decoder key"), data["content"], data))
    return out


@cache
def _pre_table() -> dict:
    return json.loads(resources.files("quantize").joinpath("data/bpe_pre.json").read_text(encoding="utf-8"))


def bpe_pre_name(tokenizer_json: Path) -> str:
    """llama.cpp names a BPE pre-tokenizer by the hash of how the tokenizer splits a test string
    (convert_hf_to_gguf.py's get_vocab_base_pre); data/bpe_pre.json is that table."""
    from tokenizers import Tokenizer

    table = _pre_table()
    try:
        ids = Tokenizer.from_file(str(tokenizer_json)).encode(table["chktxt"]).ids
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception on a bad file
        raise QuantizeError(f"{tokenizer_json.name} cannot be loaded: {shown(str(e).splitlines()[0] if str(e) else e, 160)}") from None
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in table["hashes"]:
        raise QuantizeError(
            "this BPE tokenizer's pre-tokenizer is unknown to llama.cpp (hash "
            f"{digest[:12]}...); llama.cpp would tokenize it differently from Hugging Face"
        )
    return table["hashes"][digest]


def _bpe(folder: Path, vocab_size: int | None) -> Vocab:
    path = folder / "tokenizer.json"
    model, added = _bpe_model(read_json(path))
    reverse = {i: t for t, i in model["vocab"].items()}
    reverse.update({i: t["content"] for i, t in added.items()})
    if not reverse:
        raise QuantizeError("tokenizer.json has no tokens")
    top = max(reverse)
    if vocab_size is not None and top >= vocab_size:  # the embedding has no row for it
        raise QuantizeError(f"tokenizer.json has token id {top}, beyond vocab_size {vocab_size} in config.json")
    n = max(vocab_size or 0, top + 1)
    tokens: list[bytes | str] = []
    types: list[int] = []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            text = added[i]["content"]
            if added[i].get("special") or _looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL)
    _check_unique(tokens, "tokenizer.json")
    special = special_vocab(folder, len(tokens), load_merges=True)
    if not special.merges:
        raise QuantizeError("tokenizer.json has no BPE merges")
    return Vocab("gpt2", bpe_pre_name(path), tokens, [int(t) for t in types], None, special)


def _bpe_model(data: dict) -> tuple[dict, dict[int, dict]]:
    """tokenizer.json's model (a BPE with a vocabulary of text -> id) and its added tokens by id, checked."""
    model = data.get("model")
    kind = model.get("type") if isinstance(model, dict) else model
    if kind != "BPE":
        raise QuantizeError(f"unsupported tokenizer type {shown(kind)} in tokenizer.json (need BPE or tokenizer.model)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise QuantizeError(f"tokenizer.json: model.vocab is {shown(vocab)}, not an object")
    for text, i in vocab.items():
        _token_id(i, f"tokenizer.json: the id of {shown(text)}")
    entries = data.get("added_tokens") or []
    if not isinstance(entries, list) or not all(isinstance(t, dict) for t in entries):
        raise QuantizeError(f"tokenizer.json: added_tokens is {shown(entries)}, not a list of tokens")
    added = {}
    for t in entries:
        if not isinstance(t.get("content"), str):
            raise QuantizeError(f"tokenizer.json: added token {shown(t)} has no text")
        added[_token_id(t.get("id"), f"tokenizer.json: the id of added token {shown(t['content'])}")] = t
    return model, added


def load_vocab(folder: Path, vocab_size: int | None) -> Vocab:
    check_files(folder)
    if (folder / "tokenizer.model").is_file():
        return _sentencepiece(folder, vocab_size)
    if (folder / "tokenizer.json").is_file():
        return _bpe(folder, vocab_size)
    raise QuantizeError(f"no tokenizer in {folder} (need tokenizer.model or tokenizer.json)")

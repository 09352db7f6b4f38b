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

from .errors import QuantizeError


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
    except (OSError, RuntimeError) as e:
        raise QuantizeError(f"tokenizer.model cannot be read: {e}") from None
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

    added = folder / "added_tokens.json"
    if added.is_file():
        for text, i in json.loads(added.read_text(encoding="utf-8")).items():
            if i < n:
                tokens[i], scores[i], types[i] = text.encode(), -1000.0, TokenType.USER_DEFINED
    config = folder / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for key, data in decoder.items():
            i, text = int(key), data["content"]
            if i >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[i] = TokenType.CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[i] = TokenType.USER_DEFINED
            tokens[i], scores[i] = text.encode(), -1000.0
    special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    return Vocab("llama", "default", tokens, [int(t) for t in types], scores, special)


@cache
def _pre_table() -> dict:
    return json.loads(resources.files("quantize").joinpath("data/bpe_pre.json").read_text(encoding="utf-8"))


def bpe_pre_name(tokenizer_json: Path) -> str:
    """llama.cpp names a BPE pre-tokenizer by the hash of how the tokenizer splits a test string
    (convert_hf_to_gguf.py's get_vocab_base_pre); data/bpe_pre.json is that table."""
    from tokenizers import Tokenizer

    table = _pre_table()
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(table["chktxt"]).ids
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in table["hashes"]:
        raise QuantizeError(
            "this BPE tokenizer's pre-tokenizer is unknown to llama.cpp (hash "
            f"{digest[:12]}...); llama.cpp would tokenize it differently from Hugging Face"
        )
    return table["hashes"][digest]


def _bpe(folder: Path, vocab_size: int | None) -> Vocab:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise QuantizeError(f"unsupported tokenizer type {model.get('type')!r} in tokenizer.json (need BPE or tokenizer.model)")
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    reverse.update({i: t["content"] for i, t in added.items()})
    n = max(vocab_size or 0, max(reverse) + 1)
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
    special = gguf.SpecialVocab(folder, load_merges=True)
    if not special.merges:
        raise QuantizeError("tokenizer.json has no BPE merges")
    return Vocab("gpt2", bpe_pre_name(path), tokens, [int(t) for t in types], None, special)


def load_vocab(folder: Path, vocab_size: int | None) -> Vocab:
    if (folder / "tokenizer.model").is_file():
        return _sentencepiece(folder, vocab_size)
    if (folder / "tokenizer.json").is_file():
        return _bpe(folder, vocab_size)
    raise QuantizeError(f"no tokenizer in {folder} (need tokenizer.model or tokenizer.json)")

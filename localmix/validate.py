"""A GGUF's metadata checked against itself and its tensor table before anything else reads it, and before
llama.cpp does: llama.cpp aborts the whole process (GGML_ASSERT, SIGABRT, nothing on stderr) on some
values a file may hold, and throws on others with a message that names no key. Here every key localmix
or llama.cpp relies on is checked for its type, its range and its agreement with the tensor shapes, and a
file that fails is refused with one line naming the key and the value.

Pure: it is given the merged header (metadata, and each tensor's name and shape in ggml order, row
length first) and raises ModelFileError. The limits are llama.cpp's own (src/llama-hparams.h,
src/llama-vocab.cpp, src/llama-model-loader.cpp), cited where they are used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ModelFileError
from .text import shown

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: the per-layer arrays llama.cpp keeps
MAX_EXPERTS = 512  # LLAMA_MAX_EXPERTS: llama.cpp asserts expert_count <= this
MAX_CONTEXT = 2**31 - 1
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
LAYER = re.compile(r"^blk\.(\d+)\.")

# GGUF value types
U16, U32, I32, F32, BOOL, STR, ARR = 2, 4, 5, 6, 7, 8, 9
TYPE_NAMES = ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"]

# The type llama.cpp reads each key as: its loader's get_key refuses any other, ggml's gguf reader aborts on
# a general.alignment of another type (gguf_get_val_u32). Keys under "{arch}." also say whether llama.cpp
# takes one value per layer instead (get_key_or_arr: an array of i32 or u32; another element type aborts
# in get_arr's GGML_ASSERT).
ARCH_KEYS: dict[str, tuple[int, bool]] = {
    **{k: (U32, False) for k in ("block_count", "context_length", "embedding_length", "expert_feed_forward_length",
                                 "attention.key_length", "attention.value_length", "expert_count", "expert_used_count",
                                 "vocab_size", "rope.dimension_count")},
    **{k: (U32, True) for k in ("feed_forward_length", "attention.head_count", "attention.head_count_kv")},
    **{k: (F32, False) for k in ("rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon",
                                 "attention.layer_norm_epsilon")},
}
OTHER_KEYS: dict[str, int] = {
    "general.architecture": STR, "general.name": STR, "general.file_type": U32, "general.alignment": U32,
    "general.quantization_version": U32, "tokenizer.ggml.model": STR, "tokenizer.ggml.pre": STR,
    "tokenizer.chat_template": STR, "tokenizer.ggml.add_bos_token": BOOL, "tokenizer.ggml.add_eos_token": BOOL,
    "tokenizer.ggml.add_space_prefix": BOOL, "split.no": U16, "split.count": U16, "split.tensors.count": I32,
}
TOKEN_ID = re.compile(r"^tokenizer\.ggml\.\w+_token_id$")  # u32, each of them
# What a value must be, in words, for a GGUF type (a plain dict, made in memory, is checked by kind only).
INT, FLOAT, TEXT, TRUTH = "an integer", "a number", "a string", "true or false"
KIND = {U16: INT, U32: INT, I32: INT, F32: FLOAT, STR: TEXT, BOOL: TRUTH}


@dataclass(frozen=True)
class Skipped:
    """An array the reader stepped over without decoding (scores, token types, merges): its element type
    (a GGUF value type number) and length are all that is checked of it."""

    etype: int
    count: int


class Metadata(dict):
    """A GGUF's metadata as read: key -> value, and in `types` key -> (GGUF value type, element type of an
    array or None)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.types: dict[str, tuple[int, int | None]] = {}


def refuse(key: str, value: object, why: str) -> ModelFileError:
    return ModelFileError(f"{shown(key, 80)} is {_value(value)}{', ' if why.startswith('but ') else ': '}{why}")


def _value(value: object) -> str:
    if isinstance(value, list):
        inner = ", ".join(_value(v) for v in value[:4])
        return f"[{inner}, ...] (a list of {len(value)})" if len(value) > 4 else f"[{inner}]"
    if isinstance(value, str):
        return f"'{shown(value, 60)}'"
    return shown(value, 60)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return TRUTH
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        return TEXT
    return "a list"


def check_types(kv: dict) -> str:
    """The architecture name, once every key localmix or llama.cpp reads has the type llama.cpp reads it as."""
    arch = kv.get("general.architecture")
    if arch is None:
        raise ModelFileError("no general.architecture in the GGUF metadata")
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z0-9_\-]{1,64}", arch):
        raise refuse("general.architecture", arch, "not the name of a model architecture")
    wanted = {**{k: (t, False) for k, t in OTHER_KEYS.items()}, **{f"{arch}.{k}": v for k, v in ARCH_KEYS.items()},
              **{k: (U32, False) for k in kv if TOKEN_ID.match(k)}}
    types = kv.types if isinstance(kv, Metadata) else {}
    for key, (want, per_layer) in wanted.items():
        if key not in kv:
            continue
        _typed(key, kv[key], KIND[want], per_layer)
        if key in types:
            vtype, etype = types[key]
            if vtype != want and not (vtype == ARR and per_layer and etype in (I32, U32)):
                got = f"array of {TYPE_NAMES[etype]}" if vtype == ARR and etype is not None else TYPE_NAMES[vtype]
                raise refuse(key, kv[key], f"stored as {got}, llama.cpp reads it only as {TYPE_NAMES[want]}")
    return arch


def _typed(key: str, value: object, want: str, per_layer: bool) -> None:
    if per_layer and isinstance(value, list):
        if value and all(_kind(v) == INT for v in value):
            return
        raise refuse(key, value, "not an integer, nor a list of integers (one per layer)")
    kind = _kind(value)
    if kind == want or (want == FLOAT and kind == INT):
        if want == FLOAT and not math.isfinite(value):
            raise refuse(key, value, "not a finite number")
        return
    raise refuse(key, value, f"{kind} where {want} is expected")


def _range(key: str, value: int, low: int, high: int, why: str = "") -> None:
    if not low <= value <= high:
        raise refuse(key, value, why or f"out of range ({low} to {high:,})")


def _layer_values(key: str, value, n_layer: int, low: int, high: int) -> list[int]:
    """A per-layer key as one value per layer, each checked."""
    if isinstance(value, list):
        if len(value) != n_layer:
            raise refuse(key, value, f"a list of {len(value)} values for {n_layer} layers")
        values = value
    else:
        values = [value] * n_layer
    for v in values:
        _range(key, v, low, high)
    return values


def shapes_by_name(tensors: Iterable) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.shape) for t in tensors}


def check(kv: dict, tensors: Iterable) -> None:
    """Refuse (ModelFileError naming key and value) a header that localmix or llama.cpp cannot use.
    `tensors`: objects with `name` and `shape` (ggml order)."""
    arch = check_types(kv)
    shapes = shapes_by_name(tensors)

    def a(key, default=None):
        return kv.get(f"{arch}.{key}", default)

    def k(key):
        return f"{arch}.{key}"

    # Layers: block_count against the blk.N tensors, which must be exactly blk.0 to blk.(n-1).
    if k("block_count") not in kv:
        raise ModelFileError(f"no {k('block_count')} in the GGUF metadata: the model's number of layers is unknown")
    n_layer = a("block_count")
    _range(k("block_count"), n_layer, 1, MAX_LAYERS, f"llama.cpp takes 1 to {MAX_LAYERS} layers")
    if not shapes:
        raise ModelFileError("the file has no tensors (a vocabulary-only GGUF?)")
    layers = sorted({int(m.group(1)) for name in shapes if (m := LAYER.match(name))})
    if layers != list(range(n_layer)):
        found = ("no blk.N tensors" if not layers else f"tensors of layers 0 to {layers[-1]}" if layers == list(range(len(layers)))
                 else f"tensors of {len(layers)} layers numbered up to {layers[-1]}")
        raise refuse(k("block_count"), n_layer, f"but the file has {found}")

    n_embd = a("embedding_length")
    if n_embd is None:
        raise ModelFileError(f"no {k('embedding_length')} in the GGUF metadata")
    _range(k("embedding_length"), n_embd, 1, 1 << 20)
    _range(k("context_length"), a("context_length", 1), 1, MAX_CONTEXT)

    # Attention heads (one value per layer allowed; 0 only in a per-layer list: layers without attention).
    n_head = a("attention.head_count")
    if n_head is None:
        raise ModelFileError(f"no {k('attention.head_count')} in the GGUF metadata")
    heads = _layer_values(k("attention.head_count"), n_head, n_layer, 0 if isinstance(n_head, list) else 1, n_embd)
    heads_kv = _layer_values(k("attention.head_count_kv"), a("attention.head_count_kv", n_head), n_layer,
                             0 if isinstance(a("attention.head_count_kv"), list) else 1, n_embd)
    for h, h_kv in zip(heads, heads_kv):
        if h and (not h_kv or h_kv > h or h % h_kv):
            raise refuse(k("attention.head_count_kv"), a("attention.head_count_kv"),
                         f"{h} attention heads cannot share {h_kv} key/value heads evenly")
    key_len = a("attention.key_length")
    if key_len is not None:
        _range(k("attention.key_length"), key_len, 1, 1 << 16)
    if a("attention.value_length") is not None:
        _range(k("attention.value_length"), a("attention.value_length"), 1, 1 << 16)
    top = max(heads)
    if key_len is None and top and n_embd % top:
        raise refuse(k("attention.head_count"), n_head, f"does not divide the embedding length {n_embd}")
    head_dim = key_len or (n_embd // top if top else 0)
    rope = a("rope.dimension_count")
    if rope is not None and head_dim:
        _range(k("rope.dimension_count"), rope, 0, head_dim, f"more than the head size {head_dim}")
        if rope % 2:
            raise refuse(k("rope.dimension_count"), rope, "odd (rotary embedding works on pairs)")
    for key in ("rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        if a(key) is not None and not a(key) > 0:
            raise refuse(k(key), a(key), "not positive")

    n_expert = _experts(kv, arch, shapes)
    n_vocab = _vocabulary(kv, arch, shapes)
    ff = a("feed_forward_length")
    ffs = _layer_values(k("feed_forward_length"), ff, n_layer, 0, 1 << 24) if ff is not None else [None] * n_layer
    ff_exp = a("expert_feed_forward_length")
    if ff_exp is not None:
        _range(k("expert_feed_forward_length"), ff_exp, 1, 1 << 24)
    # The experts' hidden size: expert_feed_forward_length, or (Mixtral as llama) feed_forward_length.
    ff_key = k("expert_feed_forward_length") if ff_exp is not None else k("feed_forward_length")
    expert_ffs = [ff_exp] * n_layer if ff_exp is not None else ffs if arch == "llama" else [None] * n_layer
    _shapes(kv, arch, shapes, n_embd=n_embd, heads=heads, heads_kv=heads_kv, key_len=key_len, n_expert=n_expert,
            n_vocab=n_vocab, expert_ffs=expert_ffs, ff_key=ff_key)


def _experts(kv: dict, arch: str, shapes: dict) -> int:
    """expert_count and expert_used_count, checked as llama.cpp asserts them and against the stacked
    expert tensors (ggml shape: row, rows, experts)."""
    count_key, used_key = f"{arch}.expert_count", f"{arch}.expert_used_count"
    n_expert, n_used = kv.get(count_key, 0), kv.get(used_key, 0)
    stacked = {name: s for name, s in shapes.items() if name.split(".")[-2:-1] and name.split(".")[-2] in EXPERT_TENSORS}
    if n_expert == 0:
        if n_used:
            raise refuse(used_key, n_used, f"but {count_key} is {'missing' if count_key not in kv else 0} (llama.cpp aborts)")
        if stacked:
            raise ModelFileError(f"{count_key} is {'missing' if count_key not in kv else 0} but the file has stacked expert "
                                 f"tensors ({shown(next(iter(stacked)))})")
        return 0
    _range(count_key, n_expert, 2, MAX_EXPERTS, f"a mixture of experts has 2 to {MAX_EXPERTS} (llama.cpp aborts otherwise)")
    _range(used_key, n_used, 1, n_expert, f"each token must use 1 to {count_key} = {n_expert} experts (llama.cpp aborts otherwise)")
    for name, s in stacked.items():
        if len(s) != 3 or s[2] != n_expert:
            raise refuse(count_key, n_expert, f"but {shown(name)} has shape {list(s)} ({s[2] if len(s) == 3 else 'no'} experts)")
    return n_expert


def _vocabulary(kv: dict, arch: str, shapes: dict) -> int:
    """The vocabulary size (0 when the file has none): tokens unique, scores and types one per token."""
    tokens = kv.get("tokenizer.ggml.tokens")
    n_vocab = 0
    if tokens is not None:
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise refuse("tokenizer.ggml.tokens", tokens if not isinstance(tokens, Skipped) else [],
                         "not a list of token strings")
        n_vocab = len(tokens)
        if len(set(tokens)) != n_vocab:
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise ModelFileError(f"tokenizer.ggml.tokens has '{shown(dup, 60)}' twice: llama.cpp aborts on a duplicate token")
        for key, types, name in (("tokenizer.ggml.scores", (F32,), "32-bit floats"),
                                 ("tokenizer.ggml.token_type", (I32, U32), "32-bit integers")):
            v = kv.get(key)
            if v is None:
                continue
            if not isinstance(v, Skipped) or v.etype not in types or v.count != n_vocab:
                what = f"a list of {v.count}" if isinstance(v, Skipped) else _value(v)
                raise ModelFileError(f"{key} is {what}: llama.cpp reads {n_vocab} {name}, one per token")
        if kv.get("tokenizer.ggml.model") == "llama":
            _byte_fallback(set(tokens))
        merges = kv.get("tokenizer.ggml.merges")
        if merges is not None and (not isinstance(merges, Skipped) or merges.etype != STR):
            raise ModelFileError("tokenizer.ggml.merges is not a list of strings")
    vocab_size = kv.get(f"{arch}.vocab_size")
    if vocab_size is not None:
        _range(f"{arch}.vocab_size", vocab_size, 1, 1 << 24)
        if n_vocab and vocab_size != n_vocab:
            raise refuse(f"{arch}.vocab_size", vocab_size, f"but tokenizer.ggml.tokens has {n_vocab} tokens")
    return n_vocab or vocab_size or 0


def _byte_fallback(tokens: set[str]) -> None:
    """A SentencePiece vocabulary spells text it has no piece for byte by byte, as <0xNN> tokens (or the
    character itself): llama.cpp looks them up with unordered_map::at, and a missing one ends the whole
    process (std::out_of_range through its C API) as soon as a prompt needs that byte."""
    for b in range(256):
        if f"<0x{b:02X}>" not in tokens and (b >= 0x80 or chr(b) not in tokens):
            raise ModelFileError(f"tokenizer.ggml.tokens lacks the byte token <0x{b:02X}> of a SentencePiece vocabulary "
                                 "(llama.cpp aborts on a text that needs it)")


def _shapes(kv: dict, arch: str, shapes: dict, *, n_embd: int, heads: list[int], heads_kv: list[int], key_len,
            n_expert: int, n_vocab: int, expert_ffs: list, ff_key: str) -> None:
    """The tensors every llama-like model has, against the hyper-parameters (only those the file has)."""

    def need(name: str, want: tuple, key: str, value) -> None:
        s = shapes.get(name)
        if s is not None and tuple(s[: len(want)]) != want:
            raise refuse(key, value, f"but {shown(name)} has shape {list(s)}")

    e_key = f"{arch}.embedding_length"
    for name in ("token_embd.weight", "output.weight"):
        s = shapes.get(name)
        if s is not None and n_vocab and len(s) == 2 and s[0] == n_embd and s[1] != n_vocab:
            key = "tokenizer.ggml.tokens" if "tokenizer.ggml.tokens" in kv else f"{arch}.vocab_size"
            raise ModelFileError(f"{key} gives {n_vocab} tokens but {name} has {s[1]} rows")
        need(name, (n_embd,), e_key, n_embd)
    need("output_norm.weight", (n_embd,), e_key, n_embd)
    for i, (h, h_kv, ff) in enumerate(zip(heads, heads_kv, expert_ffs)):
        if ff is not None:
            for kind in ("ffn_gate_exps", "ffn_up_exps"):
                need(f"blk.{i}.{kind}.weight", (n_embd, ff), ff_key, ff)
        for kind in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps"):
            need(f"blk.{i}.{kind}.weight", (n_embd,), e_key, n_embd)
        if n_expert:
            need(f"blk.{i}.ffn_gate_inp.weight", (n_embd, n_expert), f"{arch}.expert_count", n_expert)
        s = shapes.get(f"blk.{i}.ffn_down_exps.weight")
        if s is not None and (len(s) < 2 or s[1] != n_embd):
            raise refuse(e_key, n_embd, f"but blk.{i}.ffn_down_exps.weight has shape {list(s)}")
        if not h:
            continue
        head_dim = key_len or n_embd // h
        need(f"blk.{i}.attn_q.weight", (n_embd, h * head_dim), f"{arch}.attention.head_count", h)
        need(f"blk.{i}.attn_k.weight", (n_embd, h_kv * head_dim), f"{arch}.attention.head_count_kv", h_kv)

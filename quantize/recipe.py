"""Which ggml type each tensor gets for a chosen output type.

This is a transcription of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp in the llama.cpp that
llama-cpp-python 0.3.36 vendors), restricted to the `llama` architecture and the output types localmix
offers. It must stay byte-compatible with llama-quantize: the test suite checks that a BF16 GGUF
quantized by `llama_model_quantize` gets exactly the types (and bytes) this module picks.

llama-quant.cpp's rules are an if-chain per tensor category in which each output type appears at most
once, so here they are tables: category -> output type -> rule. A rule looks at where the tensor sits
(`At`) and returns a type, or None to keep the one it was given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F


@dataclass(frozen=True)
class OutType:
    ftype: F  # written as general.file_type
    base: T  # the type most weights get before the mix adjusts them (llama_ftype_get_default_type)


# The types `localmix quantize --type` accepts.
OUT_TYPES: dict[str, OutType] = {
    "Q4_K_M": OutType(F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q4_K_S": OutType(F.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_0": OutType(F.MOSTLY_Q4_0, T.Q4_0),
    "Q5_K_M": OutType(F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": OutType(F.MOSTLY_Q6_K, T.Q6_K),
    "Q8_0": OutType(F.MOSTLY_Q8_0, T.Q8_0),
    "BF16": OutType(F.MOSTLY_BF16, T.BF16),
    "F16": OutType(F.MOSTLY_F16, T.F16),
    "Q5_K_S": OutType(F.MOSTLY_Q5_K_S, T.Q5_K),
    "Q3_K_L": OutType(F.MOSTLY_Q3_K_L, T.Q3_K),
    "Q3_K_M": OutType(F.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_S": OutType(F.MOSTLY_Q3_K_S, T.Q3_K),
    "Q2_K": OutType(F.MOSTLY_Q2_K, T.Q2_K),
    "IQ4_XS": OutType(F.MOSTLY_IQ4_XS, T.IQ4_XS),
    "IQ4_NL": OutType(F.MOSTLY_IQ4_NL, T.IQ4_NL),
    "IQ3_M": OutType(F.MOSTLY_IQ3_M, T.IQ3_S),
    "IQ3_S": OutType(F.MOSTLY_IQ3_S, T.IQ3_S),
    "IQ3_XXS": OutType(F.MOSTLY_IQ3_XXS, T.IQ3_XXS),
    "IQ2_M": OutType(F.MOSTLY_IQ2_M, T.IQ2_S),
}

# A row length that the block size does not divide falls back to another type (llama-quant.cpp's
# tensor_type_fallback): the 256-block i-quants to IQ4_NL, the k-quants to a 32-block legacy type. A
# 32-block type (the fallbacks themselves, Q8_0, Q4_0...) falls back to itself, and whatever still does
# not divide the row becomes F16.
FALLBACK: dict[T, T] = {
    **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS), T.IQ4_NL),
    **dict.fromkeys((T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0), T.Q4_0),
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}

# Types whose quantization is garbage without an importance matrix (tensor_requires_imatrix); llama.cpp
# adds Q2_K inside a Q2_K_S file, a mix localmix does not offer.
NEEDS_IMATRIX = frozenset((T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S))

# Tensors never quantized (llama-quant.cpp's tensor_allows_quantization, the parts that can occur in a
# llama-architecture file): they keep the type they were written with (F32 here).
_KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight")


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def is_quantized(t: T) -> bool:
    return t not in (T.F32, T.F16, T.BF16)


def row_bytes(t: T, n_per_row: int) -> int:
    blck, size = GGML_QUANT_SIZES[t]
    return n_per_row // blck * size


@dataclass(frozen=True)
class ModelShape:
    """The few hyper-parameters the recipe looks at."""

    n_layer: int
    n_expert: int  # 0 or 1 for a dense model
    n_head: int
    n_head_kv: int
    tied_embeddings: bool  # no output.weight: token_embd doubles as the output matrix

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B for the llama architecture: not an 8-expert model (those are typed by
        # their layer count as 8x7B / 8x22B), 80 layers, grouped-query attention
        return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv

    @property
    def n_gqa(self) -> int:  # query heads per key/value head, integer division as hparams.n_gqa()
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers llama.cpp gives extra bits in the *_M mixes: the first and last eighth, and every third."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def allows_quantization(name: str, n_dims: int) -> bool:
    return n_dims >= 2 and name.endswith("weight") and not any(s in name for s in _KEEP_SUBSTRINGS)


def requires_imatrix(name: str, t: T, out: str) -> bool:
    """llama-quant.cpp's tensor_requires_imatrix: llama-quantize refuses to make tensor `name` of type `t`
    without an importance matrix. The embeddings and the output matrix never require one."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return t in NEEDS_IMATRIX or (t == T.Q2_K and out == "Q2_K_S")


@dataclass(frozen=True)
class At:
    """Where a tensor sits, as llama-quant.cpp's rules see it.

    `layer` stands for the counters llama.cpp keeps (i_attention_wv, i_ffn_down): it visits tensors sorted
    by layer and a llama file has one attn_v and one ffn_down (stacked experts included) per layer, so the
    counter is the layer index; for experts it parses the layer from the name anyway."""

    layer: int
    model: ModelShape
    has_imatrix: bool

    @property
    def n_layer(self) -> int:
        return self.model.n_layer

    @property
    def first_eighth(self) -> bool:
        return self.layer < self.n_layer // 8

    @property
    def more_bits(self) -> bool:
        return use_more_bits(self.layer, self.n_layer)

    @property
    def eight_experts(self) -> bool:
        return self.model.n_expert == 8


Rule = Callable[[At], "T | None"]


def _gqa4(t: T) -> Rule:  # t when 4 or more query heads share a key/value head
    return lambda a: t if a.model.n_gqa >= 4 else None


def _more_bits(t: T) -> Rule:
    return lambda a: t if a.more_bits else None


def _first_eighth_without_imatrix(t: T) -> Rule:
    return lambda a: t if a.first_eighth and not a.has_imatrix else None


# attn_v; then a 70B model lifts Q3_K/Q4_K to Q5_K and an 8-expert model takes Q8_0 whatever the mix.
_ATTN_V: dict[str, Rule] = {
    "Q2_K": lambda a: T.Q4_K if a.model.n_gqa >= 4 else T.Q3_K,
    "IQ3_XXS": lambda a: T.Q4_K if a.model.n_gqa >= 4 else T.IQ3_XXS if a.has_imatrix else T.IQ3_S,
    "IQ3_S": _gqa4(T.Q4_K),
    "IQ3_M": lambda a: T.Q4_K,
    "Q3_K_M": lambda a: T.Q5_K if a.layer < 2 else T.Q4_K,
    "Q3_K_L": lambda a: T.Q5_K,
    "IQ4_NL": _gqa4(T.Q5_K),
    "IQ4_XS": _gqa4(T.Q5_K),
    "Q4_K_M": _more_bits(T.Q6_K),
    "Q5_K_M": _more_bits(T.Q6_K),
    "Q4_K_S": lambda a: T.Q5_K if a.layer < 4 else None,
}

_ATTN_K: dict[str, Rule] = {"IQ3_XXS": lambda a: T.IQ2_S}  # an 8-expert model takes Q8_0 first
_ATTN_Q: dict[str, Rule] = {"IQ3_XXS": lambda a: T.IQ2_S}

_FFN_DOWN: dict[str, Rule] = {
    "Q2_K": lambda a: T.Q3_K,
    "IQ3_XXS": lambda a: None if a.has_imatrix else T.Q4_K if a.first_eighth else T.Q3_K,
    "Q3_K_M": lambda a: T.Q5_K if a.layer < a.n_layer // 16 else T.Q4_K,  # (Q3_K between is Falcon's)
    "IQ3_M": lambda a: T.Q4_K if a.first_eighth or (a.eight_experts and a.more_bits) else None,
    "Q3_K_L": lambda a: T.Q5_K,
    "Q4_K_M": _more_bits(T.Q6_K),
    "IQ4_NL": _first_eighth_without_imatrix(T.Q5_K),
    "IQ4_XS": _first_eighth_without_imatrix(T.Q5_K),
    "Q5_K_M": _more_bits(T.Q6_K),
    "Q4_K_S": lambda a: T.Q5_K if a.first_eighth else None,
    # only with an imatrix, so that a plain Q4_0 stays what it always was
    "Q4_0": lambda a: T.Q4_1 if a.has_imatrix and a.first_eighth else None,
}

# attn_output of an 8-expert model: these mixes give it Q5_K (Q3_K_L, oddly, is not among them).
_ATTN_OUTPUT_8_EXPERTS = frozenset(("Q2_K", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"))
_ATTN_OUTPUT: dict[str, Rule] = {  # any other model
    "Q2_K": lambda a: T.Q3_K,
    "IQ3_XXS": lambda a: T.IQ3_S,
    "Q3_K_M": lambda a: T.Q4_K,
    "Q3_K_L": lambda a: T.Q5_K,
    "IQ3_M": lambda a: T.Q4_K,
}

# The output matrix (and token_embd when it doubles as one) gets Q6_K, Q5_K in these very low-bit mixes.
_OUTPUT_Q5_K = frozenset(("IQ3_XXS", "IQ2_M"))
# token_embd when it is not the output matrix: the base type, except in these mixes.
_TOKEN_EMBD: dict[str, T] = {"IQ3_XXS": T.IQ3_S, "IQ2_M": T.IQ3_S}

# The 2-bit i-quant mixes have their own branch, before the per-category rules.
_IQ2_MIXES = frozenset(("IQ2_M",))


def _category(name: str) -> str:
    # Same order of tests as llama-quant.cpp's tensor_get_category.
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key.removesuffix(".weight")
    return "other"


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def _rule(table: dict[str, Rule], out: str, a: At, t: T) -> T:
    rule = table.get(out)
    new = rule(a) if rule else None
    return t if new is None else new


def _iq2_mix(cat: str, t: T, a: At) -> T:
    """The IQ2 branch of llama_tensor_get_type_impl (IQ2_M's base type is IQ2_S)."""
    if cat == "attn_v":
        return T.Q4_K if a.model.n_gqa >= 4 or a.model.n_expert >= 4 else T.IQ3_S
    if cat == "attn_k" and a.eight_experts:
        return T.Q4_K
    if cat == "ffn_down":
        return T.IQ3_S if a.first_eighth else t
    if cat == "attn_output":
        return T.Q5_K if a.eight_experts else T.IQ3_S
    return t


def _mix(name: str, t: T, out: str, m: ModelShape, ne0: int, has_imatrix: bool) -> T:
    """llama_tensor_get_type_impl for the mixes in OUT_TYPES (llama architecture)."""
    cat = _category(name)
    a = At(_layer(name), m, has_imatrix)
    if cat == "output" or (cat == "token_embd" and m.tied_embeddings):
        if ne0 % block_size(t) != 0:
            return T.Q8_0
        return T.Q5_K if out in _OUTPUT_Q5_K else t if t == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return _TOKEN_EMBD.get(out, t)
    if out in _IQ2_MIXES:
        return _iq2_mix(cat, t, a)
    if cat == "attn_v":
        t = _rule(_ATTN_V, out, a, t)
        if m.is_70b and t in (T.Q3_K, T.Q4_K):  # 8 query heads share each attn_v row: cheap to lift
            t = T.Q5_K
        return T.Q8_0 if a.eight_experts else t
    if cat == "attn_k":
        return T.Q8_0 if a.eight_experts else _rule(_ATTN_K, out, a, t)
    if cat == "attn_q":
        return _rule(_ATTN_Q, out, a, t)
    if cat == "ffn_down":
        return _rule(_FFN_DOWN, out, a, t)
    if cat == "attn_output":
        if a.eight_experts:
            return T.Q5_K if out in _ATTN_OUTPUT_8_EXPERTS else t
        return _rule(_ATTN_OUTPUT, out, a, t)
    return t  # ffn_gate / ffn_up change only in IQ3_XS, which localmix does not offer


def _fallback(t: T, ne0: int) -> T:
    if ne0 % block_size(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if ne0 % block_size(t) == 0 else T.F16


def tensor_type(name: str, ne0: int, n_dims: int, stored: T, out: str, model: ModelShape, has_imatrix: bool = False) -> T:
    """The type llama-quantize would give tensor `name` (row length ne0) when making `out` from a
    file where the tensor is stored as `stored`, with or without an importance matrix."""
    if not allows_quantization(name, n_dims):
        return stored
    base = OUT_TYPES[out].base
    if not is_quantized(base):
        return base
    return _fallback(_mix(name, base, out, model, ne0, has_imatrix), ne0)

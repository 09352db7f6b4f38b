"""Which ggml type each tensor gets for a chosen output type.

This is a transcription of llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp in the llama.cpp that
llama-cpp-python 0.3.36 vendors), restricted to the `llama` architecture and the output types localmix
offers. It must stay byte-compatible with llama-quantize: the test suite checks that a BF16 GGUF
quantized by `llama_model_quantize` gets exactly the types (and bytes) this module picks.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F


@dataclass(frozen=True)
class OutType:
    ftype: F  # written as general.file_type
    base: T  # the type most weights get before the mix adjusts them


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
}

# A row length that the block size does not divide falls back to a 32-block type (llama-quant.cpp's
# tensor_type_fallback); a 32-block type that still does not fit becomes F16.
FALLBACK: dict[T, T] = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

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
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B: 80 dense layers with grouped-query attention
        return self.n_expert <= 1 and self.n_layer == 80 and self.n_head != self.n_head_kv


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers llama.cpp gives extra bits in the *_M mixes: the first and last eighth, and every third."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def allows_quantization(name: str, n_dims: int) -> bool:
    return n_dims >= 2 and name.endswith("weight") and not any(s in name for s in _KEEP_SUBSTRINGS)


def _category(name: str) -> str:
    # Same order of tests as llama-quant.cpp's tensor_get_category.
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key.removesuffix(".weight")
    return "other"


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def _mix(name: str, t: T, out: str, m: ModelShape, ne0: int) -> T:
    """llama_tensor_get_type_impl for the mixes in OUT_TYPES (llama architecture, no imatrix)."""
    cat = _category(name)
    layer = _layer(name)
    eight_experts = m.n_expert == 8
    if cat == "output" or (cat == "token_embd" and m.tied_embeddings):
        if ne0 % block_size(t) != 0:
            return T.Q8_0
        return t if t == T.Q8_0 else T.Q6_K
    if cat == "attn_v":
        if out in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, m.n_layer):
            t = T.Q6_K
        elif out == "Q4_K_S" and layer < 4:
            t = T.Q5_K
        if m.is_70b and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        return T.Q8_0 if eight_experts else t
    if cat == "attn_k":
        return T.Q8_0 if eight_experts else t
    if cat == "ffn_down":
        if out in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, m.n_layer):
            return T.Q6_K
        if out == "Q4_K_S" and layer < m.n_layer // 8:
            return T.Q5_K
        return t
    if cat == "attn_output" and eight_experts and out in ("Q4_K_S", "Q4_K_M"):
        return T.Q5_K
    return t


def _fallback(t: T, ne0: int) -> T:
    if ne0 % block_size(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if ne0 % block_size(t) == 0 else T.F16


def tensor_type(name: str, ne0: int, n_dims: int, stored: T, out: str, model: ModelShape) -> T:
    """The type llama-quantize would give tensor `name` (row length ne0) when making `out` from a
    file where the tensor is stored as `stored`."""
    if not allows_quantization(name, n_dims):
        return stored
    base = OUT_TYPES[out].base
    if not is_quantized(base):
        return base
    return _fallback(_mix(name, base, out, model, ne0), ne0)

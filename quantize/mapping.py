"""Hugging Face tensor names to llama.cpp's GGUF names for the `llama` architecture (Llama, Mistral,
Mixtral), in the spirit of gguf-py's tensor_mapping.py: a table, not a chain of ifs."""

from __future__ import annotations

import re
from dataclasses import dataclass

# HF architectures we convert, all written as GGUF architecture `llama`.
ARCHITECTURES = ("MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM")

# Whole-model tensors.
GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Per-layer tensors: HF suffix after `model.layers.N.` -> GGUF suffix after `blk.N.`.
# `permute` marks q/k projections, whose rows llama.cpp expects in its RoPE layout.
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
PERMUTE = {"attn_q.weight": "q", "attn_k.weight": "k"}

# Mixtral's experts: one HF tensor per expert, stacked into one 3-D GGUF tensor per layer.
EXPERT = {"w1": "ffn_gate_exps.weight", "w2": "ffn_down_exps.weight", "w3": "ffn_up_exps.weight"}

# Present in some checkpoints, never needed.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


@dataclass(frozen=True)
class Mapped:
    gguf_name: str
    expert: int | None = None  # index into the stacked expert tensor, or None
    permute: str | None = None  # "q" or "k"


def map_name(hf_name: str) -> Mapped | None:
    """The GGUF destination of one HF tensor; None for tensors to skip; KeyError if unknown."""
    if IGNORED.search(hf_name):
        return None
    if hf_name in GLOBAL:
        return Mapped(GLOBAL[hf_name])
    m = _LAYER_RE.match(hf_name)
    if m:
        bid, rest = m.group(1), m.group(2)
        if rest in LAYER:
            suffix = LAYER[rest]
            return Mapped(f"blk.{bid}.{suffix}", permute=PERMUTE.get(suffix))
        e = _EXPERT_RE.match(rest)
        if e:
            return Mapped(f"blk.{bid}.{EXPERT[e.group(2)]}", expert=int(e.group(1)))
    raise KeyError(hf_name)


def gguf_order(name: str) -> tuple[int, str]:
    """llama.cpp's loader order (weight_name_comparer): global tensors first, then by layer, then by name.
    Writing in this order makes our files list tensors exactly as llama-quantize would."""
    return (int(name.split(".")[1]) if name.startswith("blk.") else -1, name)

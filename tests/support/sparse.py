"""A Mixtral checkpoint with real 8x7B or 8x22B shapes whose weights are holes in a sparse file: a few
hundred KB on disk (the safetensors header, config and tokenizer), 93 GB or 281 GB as the converter sees
it. Every weight reads as zero, so quantize.sensitivity gives each tensor its Gaussian prior; what such a
checkpoint is for is everything that depends on shapes alone: layouts, types, sizes, plans, dry runs.
Used by benchmarks/mixed_precision.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.support.checkpoints import _write_mistral_tokenizer_config, mistral_tokenizer_file
from tests.support.shapes import MIXTRAL_8X7B, MIXTRAL_8X22B

SHAPES = {"8x7B": (MIXTRAL_8X7B, "v1"), "8x22B": (MIXTRAL_8X22B, "v3")}  # 8x22B has Mistral's v3 vocabulary (32768)
N_EXPERT = 8


def hf_tensors(m: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every tensor of a Mixtral checkpoint, in the hub's per-expert layout."""
    d, f, kv = m["n_embd"], m["n_ff"], m["n_kv"] * (m["n_embd"] // m["n_head"])
    out = [("model.embed_tokens.weight", (m["vocab"], d)), ("lm_head.weight", (m["vocab"], d)), ("model.norm.weight", (d,))]
    for b in range(layers):
        p = f"model.layers.{b}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "block_sparse_moe.gate.weight", (N_EXPERT, d))]
        for e in range(N_EXPERT):
            q = p + f"block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (f, d)), (q + "w3.weight", (f, d)), (q + "w2.weight", (d, f))]
    return out


def write_sparse_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """One bf16 safetensors file whose data section is a hole (os.truncate): its apparent size."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = 2
        for x in shape:
            n *= x
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return 8 + len(raw) + offset


def make_sparse_mixtral(folder: Path, shape: str = "8x7B", *, layers: int | None = None) -> Path:
    """A MixtralForCausalLM checkpoint folder with `shape`'s real sizes (all its layers unless `layers`),
    Mistral's tokenizer, and zero (sparse) weights."""
    m, tokenizer = SHAPES[shape]
    layers = m["n_layer"] if layers is None else layers
    folder.mkdir(parents=True, exist_ok=True)
    write_sparse_safetensors(folder / "model.safetensors", hf_tensors(m, layers))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": m["n_embd"],
        "intermediate_size": m["n_ff"], "num_hidden_layers": layers, "num_attention_heads": m["n_head"],
        "num_key_value_heads": m["n_kv"], "num_local_experts": N_EXPERT, "num_experts_per_tok": 2,
        "max_position_embeddings": m["ctx"], "rope_theta": 1e6, "rms_norm_eps": 1e-5, "vocab_size": m["vocab"],
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }, indent=1))
    shutil.copy(mistral_tokenizer_file(tokenizer), folder / "tokenizer.model")
    _write_mistral_tokenizer_config(folder)
    return folder

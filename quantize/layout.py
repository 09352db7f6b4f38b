"""The tensors config.json implies, each with its shape, checked against the checkpoint before a byte is
written: a config that contradicts its tensors (a layer count, a head size, an expert count) would
otherwise become a GGUF that llama.cpp refuses or aborts on.

HF weights are [out_features, in_features]; the table says which config.json keys set each dimension,
so a mismatch is reported in the config's own words."""

from __future__ import annotations

import re
from collections.abc import Callable

from .checkpoint import TensorRef
from .errors import QuantizeError, shown
from .mapping import IGNORED
from .metadata import HParams

Shape = Callable[[HParams], tuple[int, ...]]

GLOBAL: dict[str, tuple[Shape, str]] = {
    "model.embed_tokens.weight": (lambda h: (h.vocab_size, h.n_embd), "vocab_size, hidden_size"),
    "model.norm.weight": (lambda h: (h.n_embd,), "hidden_size"),
    "lm_head.weight": (lambda h: (h.vocab_size, h.n_embd), "vocab_size, hidden_size"),
}
OPTIONAL = {"lm_head.weight"}  # absent: tied to the embedding

ATTENTION: dict[str, tuple[Shape, str]] = {
    "input_layernorm.weight": (lambda h: (h.n_embd,), "hidden_size"),
    "post_attention_layernorm.weight": (lambda h: (h.n_embd,), "hidden_size"),
    "self_attn.q_proj.weight": (lambda h: (h.n_head * h.head_dim, h.n_embd), "num_attention_heads x head_dim, hidden_size"),
    "self_attn.k_proj.weight": (lambda h: (h.n_head_kv * h.head_dim, h.n_embd), "num_key_value_heads x head_dim, hidden_size"),
    "self_attn.v_proj.weight": (lambda h: (h.n_head_kv * h.head_dim, h.n_embd), "num_key_value_heads x head_dim, hidden_size"),
    "self_attn.o_proj.weight": (lambda h: (h.n_embd, h.n_head * h.head_dim), "hidden_size, num_attention_heads x head_dim"),
}
DENSE: dict[str, tuple[Shape, str]] = {
    "mlp.gate_proj.weight": (lambda h: (h.n_ff, h.n_embd), "intermediate_size, hidden_size"),
    "mlp.up_proj.weight": (lambda h: (h.n_ff, h.n_embd), "intermediate_size, hidden_size"),
    "mlp.down_proj.weight": (lambda h: (h.n_embd, h.n_ff), "hidden_size, intermediate_size"),
}
ROUTER: dict[str, tuple[Shape, str]] = {
    "block_sparse_moe.gate.weight": (lambda h: (h.n_expert, h.n_embd), "num_local_experts, hidden_size"),
}
EXPERT: dict[str, tuple[Shape, str]] = {
    "w1.weight": (lambda h: (h.n_ff, h.n_embd), "intermediate_size, hidden_size"),
    "w3.weight": (lambda h: (h.n_ff, h.n_embd), "intermediate_size, hidden_size"),
    "w2.weight": (lambda h: (h.n_embd, h.n_ff), "hidden_size, intermediate_size"),
}

_LAYER = re.compile(r"^model\.layers\.(0|[1-9][0-9]*)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.block_sparse_moe\.experts\.(0|[1-9][0-9]*)\.")


def expected(hp: HParams) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every HF tensor name the config implies -> (shape, the keys that set it)."""
    out = {name: (shape(hp), keys) for name, (shape, keys) in GLOBAL.items()}
    for b in range(hp.n_layer):
        layer = {**ATTENTION, **(ROUTER if hp.is_moe else DENSE)}
        out.update({f"model.layers.{b}.{s}": (shape(hp), keys) for s, (shape, keys) in layer.items()})
        if hp.is_moe:
            out.update({f"model.layers.{b}.block_sparse_moe.experts.{e}.{s}": (shape(hp), keys)
                        for e in range(hp.n_expert) for s, (shape, keys) in EXPERT.items()})
    return out


def _unexpected(name: str, hp: HParams) -> QuantizeError:
    """Why a tensor does not belong, in the config's words where the config is what it contradicts."""
    layer, expert = _LAYER.match(name), _EXPERT.match(name)
    if layer and int(layer.group(1)) >= hp.n_layer:
        return QuantizeError(f"tensor {shown(name)} is for layer {shown(layer.group(1))}, but config.json says "
                             f"num_hidden_layers {hp.n_layer}")
    if ".block_sparse_moe." in name and not hp.is_moe:
        return QuantizeError(f"tensor {shown(name)} is an expert tensor, but config.json describes a dense model "
                             f"(num_local_experts {hp.n_expert})")
    if expert and int(expert.group(1)) >= hp.n_expert:
        return QuantizeError(f"tensor {shown(name)} is for expert {shown(expert.group(1))}, but config.json says "
                             f"num_local_experts {hp.n_expert}")
    return QuantizeError(f"unexpected tensor {shown(name)} for {hp.arch}")


def check_layout(tensors: dict[str, TensorRef], hp: HParams) -> None:
    """The checkpoint holds exactly the tensors `hp` implies (ignored extras aside), each of its shape."""
    want = expected(hp)
    for name, ref in tensors.items():
        if IGNORED.search(name):
            continue
        if name not in want:
            raise _unexpected(name, hp)
        shape, keys = want[name]
        if ref.shape != shape:
            raise QuantizeError(f"tensor {shown(name)} has shape {list(ref.shape)}, but config.json implies {list(shape)} ({keys})")
    missing = [n for n in want if n not in tensors and n not in OPTIONAL]
    if missing:
        many = f"{len(missing)} tensors, e.g." if len(missing) > 1 else "tensor"
        raise QuantizeError(f"checkpoint is missing {many} {missing[0]}")

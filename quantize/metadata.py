"""config.json to llama.cpp's `llama.*` hyper-parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import QuantizeError, shown
from .mapping import ARCHITECTURES


@dataclass(frozen=True)
class HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_explicit: bool
    n_ctx: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    n_expert: int
    n_expert_used: int
    rope: dict  # rope scaling parameters, {} when none

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1


REQUIRED = object()

# Sane ranges: beyond them no model exists, llama.cpp refuses or aborts (at most 512 layers and experts,
# LLAMA_MAX_LAYERS/LLAMA_MAX_EXPERTS), or the value does not fit the GGUF field (uint32, float32).
INT_RANGES = {
    "num_hidden_layers": (1, 512),
    "hidden_size": (1, 1 << 20),
    "intermediate_size": (1, 1 << 24),
    "num_attention_heads": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12),
    "head_dim": (2, 1 << 14),
    "num_local_experts": (0, 512),
    "num_experts_per_tok": (1, 512),
    "vocab_size": (1, 1 << 21),  # Gemma's 262,144 tokens, 8 times over
    "max_position_embeddings": (1, 1 << 30),
    "original_max_position_embeddings": (1, 1 << 30),
}
FLOAT_RANGES = {  # (low, high), low excluded
    "rope_theta": (1.0, 1e12),
    "rms_norm_eps": (0.0, 1.0),
    "factor": (0.0, 1e6),
    "low_freq_factor": (0.0, 1e6),
    "high_freq_factor": (0.0, 1e6),
}
ROPE_TYPES = ("default", "linear", "llama3")


def _int(cfg: dict, key: str, default: object = REQUIRED, where: str = "config.json") -> int:
    """A whole number in its range; `default` when the key is absent or null (as transformers reads it)."""
    value = cfg.get(key)
    if value is None:
        if default is REQUIRED:
            raise QuantizeError(f"{where} lacks {key}")
        return default  # type: ignore[return-value]
    lo, hi = INT_RANGES[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise QuantizeError(f"{where}: {key} is {shown(value)}, not a whole number")
    if not lo <= value <= hi:
        raise QuantizeError(f"{where}: {key} {value} is out of range ({lo} to {hi})")
    return value


def _float(cfg: dict, key: str, default: float, where: str = "config.json") -> float:
    value = cfg.get(key)
    if value is None:
        return default
    lo, hi = FLOAT_RANGES[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise QuantizeError(f"{where}: {key} is {shown(value)}, not a number")
    if not lo < value <= hi:  # NaN fails too
        raise QuantizeError(f"{where}: {key} {value} is out of range (above {lo:g}, at most {hi:g})")
    return float(value)


def _rope_params(cfg: dict) -> dict:
    # Newer configs carry `rope_parameters` (with rope_theta inside); older ones `rope_theta` and
    # `rope_scaling` at top level.
    params: dict = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, dict):
            raise QuantizeError(f"config.json: {key} is {shown(value)}, not an object")
        params.update(value or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    rtype = params.get("rope_type") or "default"
    if not isinstance(rtype, str) or rtype.lower() not in ROPE_TYPES:
        raise QuantizeError(f"unsupported RoPE scaling {shown(rtype)} in config.json (supported: {', '.join(ROPE_TYPES)})")
    params["rope_type"] = rtype.lower()
    where = "config.json rope scaling"
    if params["rope_type"] == "linear":
        if params.get("factor") is None:
            raise QuantizeError(f"{where} lacks factor")
        params["factor"] = _float(params, "factor", 1.0, where)
    elif params["rope_type"] == "llama3":  # the defaults are Llama 3.1's
        for key, default in (("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0)):
            params[key] = _float(params, key, default, where)
        params["original_max_position_embeddings"] = _int(params, "original_max_position_embeddings", 8192, where)
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise QuantizeError(f"{where}: high_freq_factor {params['high_freq_factor']:g} is not above "
                                f"low_freq_factor {params['low_freq_factor']:g}")
    return params


def _architecture(cfg: dict) -> str:
    archs = cfg.get("architectures")
    if archs is None or archs == []:
        arch = "(none in config.json)"
    elif isinstance(archs, list) and isinstance(archs[0], str):
        arch = archs[0]
    else:
        raise QuantizeError(f"config.json: architectures is {shown(archs)}, not a list of names")
    if arch not in ARCHITECTURES:
        raise QuantizeError(f"unsupported architecture {shown(arch)} (supported: {', '.join(ARCHITECTURES)})")
    return arch


def read_hparams(cfg: dict) -> HParams:
    """config.json's hyper-parameters, each typed and in range, and consistent with one another (the
    tensors are checked against them in layout.py)."""
    arch = _architecture(cfg)
    rope = _rope_params(cfg)
    n_embd, n_head = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    n_head_kv = _int(cfg, "num_key_value_heads", n_head)
    head_dim = _int(cfg, "head_dim", None)
    if head_dim is None and n_embd % n_head:
        raise QuantizeError(f"config.json: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head} (and no head_dim)")
    if n_head % n_head_kv:
        raise QuantizeError(f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    n_expert = _int(cfg, "num_local_experts", 0)
    hp = HParams(
        arch=arch,
        n_layer=_int(cfg, "num_hidden_layers"),
        n_embd=n_embd,
        n_ff=_int(cfg, "intermediate_size"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim or n_embd // n_head,
        head_dim_explicit=head_dim is not None,
        n_ctx=_int(cfg, "max_position_embeddings", 4096),
        vocab_size=_int(cfg, "vocab_size"),
        rms_eps=_float(cfg, "rms_norm_eps", 1e-5),
        rope_theta=_float(cfg, "rope_theta", None) or _float(rope, "rope_theta", 10000.0, "config.json rope_parameters"),
        n_expert=n_expert,
        n_expert_used=_int(cfg, "num_experts_per_tok", REQUIRED if n_expert > 1 else 0),
        rope={k: v for k, v in rope.items() if k != "rope_theta"},
    )
    if hp.head_dim % 2:  # RoPE rotates pairs
        raise QuantizeError(f"config.json: head_dim {hp.head_dim} is odd")
    if hp.is_moe and hp.n_expert_used > hp.n_expert:
        raise QuantizeError(f"config.json: num_experts_per_tok {hp.n_expert_used} does not fit {hp.n_expert} experts")
    return hp


def add_hparams(w, hp: HParams) -> None:
    w.add_vocab_size(hp.vocab_size)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim_explicit:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    if hp.is_moe:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used)
    if hp.rope["rope_type"] == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope["factor"]))


def llama3_rope_freqs(hp: HParams) -> np.ndarray | None:
    """Llama 3.1's frequency factors, the extra `rope_freqs.weight` tensor convert_hf_to_gguf.py writes."""
    r = hp.rope
    if r["rope_type"] != "llama3":
        return None
    dim = hp.head_dim
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = r["factor"], r["low_freq_factor"], r["high_freq_factor"]  # checked in _rope_params
    old = r["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)

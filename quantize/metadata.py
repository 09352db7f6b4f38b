"""config.json to llama.cpp's `llama.*` hyper-parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import QuantizeError
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


def _rope_params(cfg: dict) -> dict:
    # Newer configs carry `rope_parameters` (with rope_theta inside); older ones `rope_theta` and
    # `rope_scaling` at top level.
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def read_hparams(cfg: dict) -> HParams:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else "(none in config.json)"
    if arch not in ARCHITECTURES:
        raise QuantizeError(f"unsupported architecture {arch} (supported: {', '.join(ARCHITECTURES)})")
    try:
        n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = _rope_params(cfg)
        head_dim = cfg.get("head_dim")
        hp = HParams(
            arch=arch,
            n_layer=int(cfg["num_hidden_layers"]),
            n_embd=n_embd,
            n_ff=int(cfg["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(head_dim or n_embd // n_head),
            head_dim_explicit=head_dim is not None,
            n_ctx=int(cfg.get("max_position_embeddings") or 4096),
            vocab_size=int(cfg["vocab_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            n_expert=int(cfg.get("num_local_experts") or 0),
            n_expert_used=int(cfg.get("num_experts_per_tok") or 0),
            rope={k: v for k, v in rope.items() if k != "rope_theta"},
        )
    except KeyError as e:
        raise QuantizeError(f"config.json lacks {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise QuantizeError(f"config.json has a bad value: {e}") from None
    rtype = str(hp.rope.get("rope_type", "default")).lower()
    if rtype not in ("default", "linear", "llama3"):
        raise QuantizeError(f"unsupported RoPE scaling {rtype!r} in config.json")
    if hp.is_moe and not (0 < hp.n_expert_used <= hp.n_expert):
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
    if str(hp.rope.get("rope_type", "")).lower() == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope["factor"]))


def llama3_rope_freqs(hp: HParams) -> np.ndarray | None:
    """Llama 3.1's frequency factors, the extra `rope_freqs.weight` tensor convert_hf_to_gguf.py writes."""
    r = hp.rope
    if str(r.get("rope_type", "")).lower() != "llama3":
        return None
    dim = hp.head_dim
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = r.get("factor", 8.0), r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old = r.get("original_max_position_embeddings", 8192)
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

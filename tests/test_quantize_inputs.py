"""Other inputs than Mixtral in bf16: f16 and f32 checkpoints, and the dense architectures (Llama,
Mistral) that share the mapping without experts."""

import numpy as np
import pytest

from quantize.checkpoint import open_checkpoint
from quantize.convert import convert
from tests.support.checkpoints import make_smollm_dense, make_tiny_mixtral
from tests.support.ggufs import metadata, tensor_table
from tests.support.llm import logits as llama_logits
from tests.support.reference import MIXED_TEXT
from tests.support.reference import hf_logits as hf_logits_of


@pytest.mark.parametrize("dtype, out_type", [("float16", "F16"), ("float32", "BF16")])
def test_f16_and_f32_checkpoints(tmp_path, dtype, out_type):
    src = make_tiny_mixtral(tmp_path / f"tiny-{dtype}", layers=2, dtype=dtype)
    out = tmp_path / "m.gguf"
    convert(src, out, out_type)
    table = tensor_table(out)
    # Unpermuted tensors carry the checkpoint's values: exactly (f16 to F16) or rounded (f32 to BF16).
    ck = open_checkpoint(src)
    experts = [ck.tensors[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] for e in range(8)]
    stacked = np.stack([r.file.raw(r) for r in experts]).astype(np.float32)
    kind, data = table["blk.1.ffn_down_exps.weight"]
    assert kind == out_type
    if out_type == "F16":
        got = np.frombuffer(data, dtype=np.float16).astype(np.float32)
        assert np.array_equal(got, stacked.ravel())
    else:
        got = (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        assert np.allclose(got, stacked.ravel(), rtol=2**-8, atol=0)
    ck.close()
    tokens = list(range(1, 200, 3))
    ref, ours = hf_logits_of("MixtralForCausalLM", src, tokens), llama_logits(out, tokens)
    assert np.corrcoef(ref.ravel(), ours.ravel())[0, 1] > 0.998


def test_dense_mistral(tmp_path):
    src = make_tiny_mixtral(tmp_path / "tiny-mistral", layers=2, dense=True, tokenizer="v1")
    out = tmp_path / "m.gguf"
    convert(src, out, "Q8_0")
    m = metadata(out)
    assert "llama.expert_count" not in m
    assert {n for n in tensor_table(out) if n.startswith("blk.0.")} == {
        f"blk.0.{s}.weight"
        for s in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    }
    tokens = list(range(1, 200, 3))
    ref, ours = hf_logits_of("MistralForCausalLM", src, tokens), llama_logits(out, tokens)
    assert np.corrcoef(ref.ravel(), ours.ravel())[0, 1] > 0.99  # Q8_0 weights


def test_dense_llama_smollm2(tmp_path):
    """The real SmolLM2-135M-Instruct, as published (LlamaForCausalLM, tied embeddings)."""
    from transformers import AutoTokenizer

    src = make_smollm_dense(tmp_path / "smollm2")
    out = tmp_path / "m.gguf"
    convert(src, out, "BF16")
    tokens = AutoTokenizer.from_pretrained(src).encode(MIXED_TEXT, add_special_tokens=False)
    ref, ours = hf_logits_of("LlamaForCausalLM", src, tokens), llama_logits(out, tokens)
    assert np.mean(ref.argmax(-1) == ours.argmax(-1)) >= 0.98
    assert np.corrcoef(ref.ravel(), ours.ravel())[0, 1] > 0.999

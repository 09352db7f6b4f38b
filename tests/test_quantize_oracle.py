"""The oracle: llama.cpp's own two-step route (a BF16 GGUF, then llama-quantize) must give the same
tensor types and the same bytes as localmix's direct pass, for every mix, on a checkpoint whose row
lengths all divide by 256 and on one whose hidden size (576) does not (the fallback types)."""

import pytest
from gguf import LlamaFileType

from quantize.recipe import OUT_TYPES
from tests.support.ggufs import differences, tensor_table
from tests.support.llm import llama_quantize


@pytest.mark.parametrize("out_type", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "F16"])
def test_direct_equals_two_step_divisible(tiny_gguf, tmp_path, out_type):
    two_step = tmp_path / "two-step.gguf"
    llama_quantize(tiny_gguf("BF16"), two_step, OUT_TYPES[out_type].ftype)
    assert differences(tiny_gguf(out_type), two_step) == []


@pytest.mark.parametrize("out_type", ["Q4_K_M", "Q4_0"])
def test_direct_equals_two_step_with_fallbacks(upcycled_gguf, tmp_path, out_type):
    two_step = tmp_path / "two-step.gguf"
    llama_quantize(upcycled_gguf("BF16"), two_step, OUT_TYPES[out_type].ftype)
    assert differences(upcycled_gguf(out_type), two_step) == []


def test_q4_k_m_mix_for_eight_experts(tiny_gguf):
    """The Q4_K_M mix llama.cpp uses for an 8-expert llama model (FIELD-NOTES), by tensor role."""
    types = {name: t for name, (t, _) in tensor_table(tiny_gguf("Q4_K_M")).items()}
    n_layer = 4
    for b in range(n_layer):
        assert types[f"blk.{b}.attn_k.weight"] == "Q8_0"
        assert types[f"blk.{b}.attn_v.weight"] == "Q8_0"
        assert types[f"blk.{b}.attn_output.weight"] == "Q5_K"
        assert types[f"blk.{b}.attn_q.weight"] == "Q4_K"
        assert types[f"blk.{b}.ffn_gate_exps.weight"] == "Q4_K"
        assert types[f"blk.{b}.ffn_up_exps.weight"] == "Q4_K"
        assert types[f"blk.{b}.ffn_gate_inp.weight"] == "F32"
        assert types[f"blk.{b}.attn_norm.weight"] == "F32"
    # use_more_bits(i, 4): 4//8 == 0 so no "first eighth"; layer 3 is in the last eighth (>= 28//8) and
    # layer 2 is every third ((2 - 0) % 3 == 2): those get Q6_K
    assert [types[f"blk.{b}.ffn_down_exps.weight"] for b in range(n_layer)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"


def test_fallback_types_when_rows_do_not_divide_by_256(upcycled_gguf):
    types = {name: t for name, (t, _) in tensor_table(upcycled_gguf("Q4_K_M")).items()}
    assert types["blk.1.ffn_gate_exps.weight"] == "Q5_0"  # Q4_K -> Q5_0 (576 columns)
    assert types["blk.1.attn_output.weight"] == "Q5_1"  # Q5_K -> Q5_1
    assert types["blk.0.ffn_down_exps.weight"] == "Q6_K"  # 1536 columns divide by 256: no fallback
    assert types["token_embd.weight"] == "Q8_0"  # tied output: Q6_K wanted, 576 columns -> Q8_0
    assert "output.weight" not in types
    assert LlamaFileType.MOSTLY_Q4_K_M == OUT_TYPES["Q4_K_M"].ftype

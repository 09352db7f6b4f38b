"""The recipe on the real shapes of Mixtral 8x7B and 8x22B (no weights needed): the Q4_K_M mix that
FIELD-NOTES describes, and file sizes close to the published Q4_K_M files."""

from gguf import GGMLQuantizationType as T

from quantize.recipe import ModelShape, tensor_type, use_more_bits
from tests.support.shapes import MIXTRAL_8X7B, MIXTRAL_8X22B, nbytes, types


def plan(m: dict, out: str) -> dict[str, tuple[T, tuple[int, ...]]]:
    return types(m, out)


def file_bytes(p: dict) -> int:
    return sum(nbytes(t, s) for t, s in p.values())


def test_mixtral_8x7b_q4_k_m_mix():
    p = plan(MIXTRAL_8X7B, "Q4_K_M")
    assert p["blk.0.attn_k.weight"][0] == T.Q8_0 and p["blk.0.attn_v.weight"][0] == T.Q8_0
    assert p["blk.0.attn_output.weight"][0] == T.Q5_K
    assert p["output.weight"][0] == T.Q6_K
    assert p["token_embd.weight"][0] == T.Q4_K
    assert p["blk.0.ffn_gate_inp.weight"][0] == T.F32
    down = [p[f"blk.{b}.ffn_down_exps.weight"][0] for b in range(32)]
    assert down == [T.Q6_K if use_more_bits(b, 32) else T.Q4_K for b in range(32)]
    assert down.count(T.Q6_K) == 16  # layers 0-3, 28-31 and every third between
    # The published Mixtral-8x7B Q4_K_M GGUF is 26.5 GiB (about 4.9 bits per weight).
    assert 26.0 < file_bytes(p) / 2**30 < 26.6


def test_mixtral_8x22b_sizes():
    q4 = file_bytes(plan(MIXTRAL_8X22B, "Q4_K_M"))
    assert 84e9 < q4 < 87e9  # published: 85.6 GB
    assert file_bytes(plan(MIXTRAL_8X22B, "BF16")) > 2.8e11


def test_use_more_bits_matches_llama_cpp():
    # i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, integer division
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_fallbacks_for_rows_not_divisible_by_256():
    shape = ModelShape(30, 8, 9, 3, tied_embeddings=True)
    tt = lambda name, ne0, out="Q4_K_M": tensor_type(name, ne0, 2, T.BF16, out, shape)
    assert tt("blk.1.attn_q.weight", 576) == T.Q5_0
    assert tt("blk.1.attn_output.weight", 576) == T.Q5_1
    assert tt("blk.0.ffn_down_exps.weight", 1536) == T.Q6_K
    assert tt("blk.0.ffn_down_exps.weight", 1568) == T.Q8_0  # Q6_K -> Q8_0 (1568 = 49 x 32)
    assert tt("blk.1.attn_q.weight", 100) == T.F16  # not even a multiple of 32
    assert tt("token_embd.weight", 576) == T.Q8_0  # tied: output rules, 576 % 256 != 0
    assert tt("blk.1.attn_q.weight", 576, "BF16") == T.BF16
    assert tensor_type("blk.1.attn_norm.weight", 576, 1, T.F32, "Q4_K_M", shape) == T.F32

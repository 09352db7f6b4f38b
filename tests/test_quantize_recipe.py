"""The recipe on the real shapes of Mixtral 8x7B and 8x22B (no weights needed): the Q4_K_M mix that
FIELD-NOTES describes, and file sizes close to the published Q4_K_M files; every mix on dense, 8-expert
and other-expert shapes against llama.cpp's own type selection; the imatrix and fallback tables."""

from dataclasses import dataclass

import pytest
from gguf import GGMLQuantizationType as T

from quantize.recipe import FALLBACK, NEEDS_IMATRIX, OUT_TYPES, ModelShape, block_size, requires_imatrix, tensor_type, use_more_bits
from tests.support.quant_types import llama_cpp_types
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


# every mix against llama.cpp's own type selection, on model shapes the fixtures do not have


@dataclass(frozen=True)
class Llama:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    vocab: int = 32000
    tied: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        d, f, e, kv = self.n_embd, self.n_ff, self.n_expert, self.n_head_kv * (self.n_embd // self.n_head)
        out = [("token_embd.weight", (self.vocab, d)), ("output_norm.weight", (d,))]
        out += [] if self.tied else [("output.weight", (self.vocab, d))]
        for b in range(self.n_layer):
            p = f"blk.{b}."
            out += [(p + "attn_norm.weight", (d,)), (p + "ffn_norm.weight", (d,)), (p + "attn_q.weight", (d, d)),
                    (p + "attn_k.weight", (kv, d)), (p + "attn_v.weight", (kv, d)), (p + "attn_output.weight", (d, d))]
            if e > 1:
                out += [(p + "ffn_gate_inp.weight", (e, d)), (p + "ffn_gate_exps.weight", (e, f, d)),
                        (p + "ffn_up_exps.weight", (e, f, d)), (p + "ffn_down_exps.weight", (e, d, f))]
            else:
                out += [(p + "ffn_gate.weight", (f, d)), (p + "ffn_up.weight", (f, d)), (p + "ffn_down.weight", (d, f))]
        return out

    def shape(self) -> ModelShape:
        return ModelShape(self.n_layer, self.n_expert, self.n_head, self.n_head_kv, self.tied)


MODELS = {
    "mixtral-8x7b": Llama(32, 4096, 14336, 32, 8, n_expert=8),
    "mixtral-8x22b": Llama(56, 6144, 16384, 48, 8, n_expert=8, vocab=32768),
    "llama-2-7b": Llama(32, 4096, 11008, 32, 32),  # no grouped-query attention
    "llama-3-70b": Llama(80, 8192, 28672, 64, 8, vocab=128256),  # LLM_TYPE_70B: attn_v lifted
    "llama-65b": Llama(80, 8192, 22016, 64, 64),  # 80 layers without GQA: not "70B"
    "moe-4-experts-gqa-2": Llama(24, 2048, 5632, 16, 8, n_expert=4),  # n_expert >= 4 but not 8
    "moe-16-experts": Llama(16, 1024, 2816, 16, 4, n_expert=16),
    "moe-4-experts-80-layers": Llama(80, 1024, 1024, 16, 4, n_expert=4),  # "70B" too: only 8 experts are typed apart
    "smollm-tied-576": Llama(30, 576, 1536, 9, 3, vocab=49152, tied=True),  # rows of 576: fallbacks
    "odd-rows": Llama(10, 800, 1000, 10, 5, tied=True),  # 800 % 256, 1000 % 32: F16 fallbacks
}


@pytest.mark.parametrize("model", MODELS)
def test_every_mix_is_llama_cpps_choice(model):
    """For each output type, each tensor's type is the one llama_quant_compute_types picks (no imatrix)."""
    m = MODELS[model]
    tensors = m.tensors()
    for out, o in OUT_TYPES.items():
        theirs = llama_cpp_types(tensors, int(o.ftype), n_layer=m.n_layer, n_head=m.n_head, n_head_kv=m.n_head_kv,
                                 n_expert=m.n_expert, n_embd=m.n_embd, n_ff=m.n_ff)
        ours = {n: tensor_type(n, s[-1], len(s), T.BF16, out, m.shape()).name for n, s in tensors if n in theirs}
        assert ours == theirs, f"{out}: {[(n, ours[n], theirs[n]) for n in theirs if ours[n] != theirs[n]][:6]}"


def test_the_new_mixes_on_mixtral_8x7b():
    """A few landmarks, by hand from llama-quant.cpp, so that a failure above has a readable twin."""
    p = {out: plan(MIXTRAL_8X7B, out) for out in ("Q3_K_M", "Q3_K_L", "Q2_K", "IQ3_XXS", "IQ2_M", "IQ4_XS")}
    assert p["Q3_K_M"]["blk.5.attn_v.weight"][0] == T.Q8_0  # 8 experts: attn_v and attn_k Q8_0
    assert p["Q3_K_M"]["blk.5.attn_output.weight"][0] == T.Q5_K
    assert p["Q3_K_L"]["blk.5.attn_output.weight"][0] == T.Q3_K  # not in the 8-expert Q5_K list
    assert [p["Q3_K_M"][f"blk.{b}.ffn_down_exps.weight"][0] for b in (0, 1, 2, 31)] == [T.Q5_K, T.Q5_K, T.Q4_K, T.Q4_K]
    assert p["Q2_K"]["blk.9.ffn_down_exps.weight"][0] == T.Q3_K and p["Q2_K"]["blk.9.ffn_up_exps.weight"][0] == T.Q2_K
    assert p["IQ3_XXS"]["output.weight"][0] == T.Q5_K and p["IQ3_XXS"]["token_embd.weight"][0] == T.IQ3_S
    assert p["IQ3_XXS"]["blk.9.attn_q.weight"][0] == T.IQ2_S
    assert p["IQ2_M"]["blk.9.attn_v.weight"][0] == T.Q4_K and p["IQ2_M"]["blk.3.ffn_down_exps.weight"][0] == T.IQ3_S
    assert p["IQ2_M"]["blk.4.ffn_down_exps.weight"][0] == T.IQ2_S
    assert p["IQ4_XS"]["blk.3.ffn_down_exps.weight"][0] == T.Q5_K and p["IQ4_XS"]["blk.4.ffn_down_exps.weight"][0] == T.IQ4_XS


def test_an_imatrix_changes_these_mixes():
    """qs.has_imatrix in llama-quant.cpp: IQ3_XXS keeps IQ3_XXS for attn_v and ffn_down, IQ4_* drop the Q5_K
    of the first ffn_down layers, Q4_0 takes Q4_1 there. Nothing else changes."""
    m = MODELS["llama-2-7b"].shape()
    tt = lambda name, out, imatrix: tensor_type(name, 4096, 2, T.BF16, out, m, imatrix)
    assert (tt("blk.9.attn_v.weight", "IQ3_XXS", False), tt("blk.9.attn_v.weight", "IQ3_XXS", True)) == (T.IQ3_S, T.IQ3_XXS)
    assert (tt("blk.0.ffn_down.weight", "IQ3_XXS", False), tt("blk.0.ffn_down.weight", "IQ3_XXS", True)) == (T.Q4_K, T.IQ3_XXS)
    assert (tt("blk.9.ffn_down.weight", "IQ3_XXS", False), tt("blk.9.ffn_down.weight", "IQ3_XXS", True)) == (T.Q3_K, T.IQ3_XXS)
    assert (tt("blk.0.ffn_down.weight", "IQ4_NL", False), tt("blk.0.ffn_down.weight", "IQ4_NL", True)) == (T.Q5_K, T.IQ4_NL)
    assert (tt("blk.0.ffn_down.weight", "Q4_0", False), tt("blk.0.ffn_down.weight", "Q4_0", True)) == (T.Q4_0, T.Q4_1)
    changed = {out for out in OUT_TYPES for name, s in MODELS["llama-2-7b"].tensors()
               if tensor_type(name, s[-1], len(s), T.BF16, out, m, False) != tensor_type(name, s[-1], len(s), T.BF16, out, m, True)}
    assert changed == {"IQ3_XXS", "IQ4_NL", "IQ4_XS", "Q4_0"}


def test_requires_imatrix_is_llama_cpps_list():
    assert requires_imatrix("blk.0.ffn_up_exps.weight", T.IQ3_XXS, "IQ3_XXS")
    assert requires_imatrix("blk.0.attn_q.weight", T.IQ2_S, "IQ2_M")
    assert not requires_imatrix("token_embd.weight", T.IQ2_S, "IQ2_M")  # embeddings and output never
    assert not requires_imatrix("output.weight", T.IQ3_XXS, "IQ3_XXS")
    assert not requires_imatrix("blk.0.attn_q.weight", T.IQ3_S, "IQ3_S")
    assert not requires_imatrix("blk.0.attn_q.weight", T.Q2_K, "Q2_K")  # only a Q2_K_S file's Q2_K needs one
    # which offered mixes cannot be made without one (on a model whose rows all divide by 256)
    m = MODELS["mixtral-8x7b"]
    needs = {out for out in OUT_TYPES for n, s in m.tensors()
             if requires_imatrix(n, tensor_type(n, s[-1], len(s), T.BF16, out, m.shape()), out)}
    assert needs == {"IQ3_XXS", "IQ2_M"}


def test_fallback_table():
    # every 256-block type the mixes can ask for has a fallback, and every fallback is a 32-block type
    assert all(block_size(v) == 32 for v in FALLBACK.values())
    assert {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.IQ3_S, T.IQ3_XXS, T.IQ2_S} <= set(FALLBACK)
    assert NEEDS_IMATRIX <= set(FALLBACK)
    shape = ModelShape(30, 8, 9, 3, tied_embeddings=True)
    tt = lambda name, ne0, out: tensor_type(name, ne0, 2, T.BF16, out, shape)
    assert tt("blk.5.ffn_up_exps.weight", 576, "IQ3_XXS") == T.IQ4_NL  # no longer needs an imatrix
    assert tt("blk.5.ffn_up_exps.weight", 576, "Q2_K") == T.Q4_0
    assert tt("blk.5.ffn_up_exps.weight", 576, "Q3_K_S") == T.Q4_0
    assert tt("blk.5.ffn_up_exps.weight", 100, "IQ4_NL") == T.F16  # even IQ4_NL's 32 does not divide 100
    assert tt("blk.5.ffn_up_exps.weight", 100, "IQ4_XS") == T.F16

"""The oracle: llama.cpp's own two-step route (a BF16 GGUF, then llama-quantize) must give the same
tensor types and the same bytes as localmix's direct pass, for every mix, on a checkpoint whose row
lengths all divide by 256 and on one whose hidden size (576) does not (the fallback types); and, for the
mixes an importance matrix changes, the same types as llama-quantize given one."""

import ctypes

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from quantize.recipe import OUT_TYPES, ModelShape, requires_imatrix, tensor_type
from tests.support.checkpoints import make_tiny_mixtral
from tests.support.ggufs import differences, tensor_table
from tests.support.llm import llama_quantize

# The mixes added for issue 11 that llama-quantize makes without an importance matrix.
NEW_PLAIN = ["Q5_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S"]
# Mixes that llama-quantize refuses without one (some of their tensors are IQ3_XXS / IQ2_S).
NEED_IMATRIX = ["IQ3_XXS", "IQ2_M"]
# Mixes whose types an imatrix changes (qs.has_imatrix in llama-quant.cpp).
IMATRIX_CHANGES = ["IQ3_XXS", "IQ4_XS", "IQ4_NL", "Q4_0"]


@pytest.mark.parametrize("out_type", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "F16", *NEW_PLAIN])
def test_direct_equals_two_step_divisible(tiny_gguf, tmp_path, out_type):
    two_step = tmp_path / "two-step.gguf"
    llama_quantize(tiny_gguf("BF16"), two_step, OUT_TYPES[out_type].ftype)
    assert differences(tiny_gguf(out_type), two_step) == []


# (no i-quant here: IQ4_XS of the 0.6B-weight upcycled model costs minutes; its fallbacks are checked on
# the small GGUF below, IQ4_NL's bytes on the tiny Mixtral)
@pytest.mark.parametrize("out_type", ["Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"])
def test_direct_equals_two_step_with_fallbacks(upcycled_gguf, tmp_path, out_type):
    two_step = tmp_path / "two-step.gguf"
    llama_quantize(upcycled_gguf("BF16"), two_step, OUT_TYPES[out_type].ftype)
    assert differences(upcycled_gguf(out_type), two_step) == []


@pytest.fixture(scope="module")
def dense_gguf(tmp_path_factory):
    """A dense 3-layer tiny Mistral converted by localmix (no experts, 2 query heads per KV head): the
    rules for models other than 8 experts (attn_output; attn_v of the first two layers in Q3_K_M)."""
    from quantize.convert import convert

    folder = tmp_path_factory.mktemp("dense")
    src, done = make_tiny_mixtral(folder / "tiny-dense", layers=3, dense=True), {}

    def converted(out_type: str):
        if out_type not in done:
            done[out_type] = folder / f"dense-{out_type}.gguf"
            convert(src, done[out_type], out_type)
        return done[out_type]

    return converted


@pytest.mark.parametrize("out_type", ["Q3_K_M", "Q2_K"])
def test_direct_equals_two_step_dense(dense_gguf, tmp_path, out_type):
    two_step = tmp_path / "two-step.gguf"
    llama_quantize(dense_gguf("BF16"), two_step, OUT_TYPES[out_type].ftype)
    assert differences(dense_gguf(out_type), two_step) == []


# The imatrix checks compare types only (engineer I's tests compare bytes with an imatrix), so they run
# on small BF16 GGUFs written here: real llama tensor names and consistent shapes, a 64-token vocabulary
# (no tokenizer: llama-quantize reads none), random weights.
SMALL = {
    "dense": dict(n_layer=8, n_expert=0),  # 8 // 8 = 1: layer 0 is the "first eighth"
    "8-experts": dict(n_layer=2, n_expert=8),
    "tied-576": dict(n_layer=2, n_expert=0, n_embd=576, n_ff=512, n_head=9, n_head_kv=3, tied=True),  # fallbacks
}


def small_llama(path, *, n_layer: int, n_expert: int, n_embd=256, n_ff=256, n_head=2, n_head_kv=1, vocab=64, tied=False, seed=0):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_vocab_size(vocab)
    w.add_file_type(int(LlamaFileType.MOSTLY_BF16))
    if n_expert > 1:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)

    def add(name: str, *shape: int) -> None:
        if len(shape) == 1 or "ffn_gate_inp" in name:
            w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
        else:  # BF16: the top half of each float32
            bits = (rng.standard_normal(shape, dtype=np.float32) * 0.05).view(np.uint32) >> 16
            w.add_tensor(name, bits.astype(np.uint16), raw_shape=shape, raw_dtype=T.BF16)

    kv = n_head_kv * (n_embd // n_head)
    add("token_embd.weight", vocab, n_embd)
    add("output_norm.weight", n_embd)
    if not tied:
        add("output.weight", vocab, n_embd)
    for b in range(n_layer):
        p = f"blk.{b}."
        for name, shape in [("attn_norm", (n_embd,)), ("ffn_norm", (n_embd,)), ("attn_q", (n_embd, n_embd)), ("attn_k", (kv, n_embd)),
                            ("attn_v", (kv, n_embd)), ("attn_output", (n_embd, n_embd))]:
            add(f"{p}{name}.weight", *shape)
        e, sfx = ((n_expert,), "_exps") if n_expert > 1 else ((), "")
        if n_expert > 1:
            add(f"{p}ffn_gate_inp.weight", n_expert, n_embd)
        add(f"{p}ffn_gate{sfx}.weight", *e, n_ff, n_embd)
        add(f"{p}ffn_up{sfx}.weight", *e, n_ff, n_embd)
        add(f"{p}ffn_down{sfx}.weight", *e, n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    return {k: small_llama(folder / f"{k}.gguf", **kw) for k, kw in SMALL.items()}


def _shape(path) -> ModelShape:
    r = gguf.GGUFReader(path)
    kv = lambda key: int(r.fields[key].contents()) if key in r.fields else 0
    names = {t.name for t in r.tensors}
    return ModelShape(kv("llama.block_count"), kv("llama.expert_count"), kv("llama.attention.head_count"),
                      kv("llama.attention.head_count_kv"), "output.weight" not in names)


def recipe_types(path, out: str, has_imatrix: bool) -> dict[str, str]:
    """What quantize.recipe gives each tensor of the GGUF at `path` (shapes as ggml's ne, row length first)."""
    m = _shape(path)
    return {t.name: tensor_type(t.name, int(t.shape[0]), len(t.shape), T(t.tensor_type), out, m, has_imatrix).name
            for t in gguf.GGUFReader(path).tensors}


def imatrix_for(path, seed: int = 0) -> dict[str, np.ndarray]:
    """Random positive importance weights, ne0 x n_expert per matrix, as llama-imatrix would give every
    matrix a token passes through (not token_embd, which is a lookup)."""
    rng = np.random.default_rng(seed)
    return {t.name: rng.uniform(0.1, 2.0, int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) > 2 else 1)).astype(np.float32)
            for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2 and t.name != "token_embd.weight"}


def llama_quantize_rc(src, dst, ftype: int, imatrix: dict[str, np.ndarray] | None = None) -> int:
    """llama_model_quantize, optionally with importance weights (params.imatrix: a NULL-name-terminated
    array of llama_model_imatrix_data); its return code (non-zero when llama.cpp refuses)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    if imatrix is not None:
        keep = [np.ascontiguousarray(w) for w in imatrix.values()]  # alive until the call returns
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()  # the last one all NULL
        for e, name, w in zip(entries, imatrix, keep):
            e.name, e.data, e.size = name.encode(), w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), w.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))


@pytest.mark.parametrize("out_type", list(dict.fromkeys(IMATRIX_CHANGES + NEED_IMATRIX)))
@pytest.mark.parametrize("model", SMALL)
def test_types_with_an_imatrix_are_llama_quantizes(small, tmp_path, model, out_type):
    src, dst = small[model], tmp_path / "with-imatrix.gguf"
    assert llama_quantize_rc(src, dst, OUT_TYPES[out_type].ftype, imatrix_for(src)) == 0
    theirs = {name: t for name, (t, _) in tensor_table(dst).items()}
    assert recipe_types(src, out_type, has_imatrix=True) == theirs
    if model == "dense" and out_type in IMATRIX_CHANGES:  # with a first eighth and GQA 2 the mix does change
        assert recipe_types(src, out_type, has_imatrix=False) != theirs


@pytest.mark.parametrize("out_type", NEED_IMATRIX)
def test_mixes_that_need_an_imatrix_are_refused_without_one(small, tmp_path, out_type):
    src = small["dense"]
    m = _shape(src)
    needs = [t.name for t in gguf.GGUFReader(src).tensors
             if requires_imatrix(t.name, tensor_type(t.name, int(t.shape[0]), len(t.shape), T(t.tensor_type), out_type, m), out_type)]
    assert needs
    assert llama_quantize_rc(src, tmp_path / "refused.gguf", OUT_TYPES[out_type].ftype) != 0


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


def test_fallbacks_of_the_new_mixes(upcycled_gguf):
    """576 columns: the k-quants fall back to Q4_0 / Q5_0 / Q5_1."""
    q3 = {name: t for name, (t, _) in tensor_table(upcycled_gguf("Q3_K_M")).items()}
    assert q3["blk.5.ffn_gate_exps.weight"] == "Q4_0" and q3["blk.5.ffn_down_exps.weight"] == "Q4_K"
    assert q3["blk.5.attn_output.weight"] == "Q5_1" and q3["token_embd.weight"] == "Q8_0"


@pytest.mark.parametrize("out_type", ["IQ4_XS", "IQ3_M"])
def test_i_quant_fallbacks_are_llama_quantizes(small, tmp_path, out_type):
    """576 columns: the i-quants fall back to IQ4_NL (512-column ffn_down keeps its type)."""
    src, dst = small["tied-576"], tmp_path / "plain.gguf"
    assert llama_quantize_rc(src, dst, OUT_TYPES[out_type].ftype) == 0
    theirs = {name: t for name, (t, _) in tensor_table(dst).items()}
    assert recipe_types(src, out_type, has_imatrix=False) == theirs
    assert theirs["blk.1.attn_q.weight"] == "IQ4_NL" and theirs["blk.1.ffn_down.weight"] != "IQ4_NL"

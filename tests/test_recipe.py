"""The recipe on the real shapes of Mixtral 8x7B and 8x22B (no weights needed): the Q4_K_M mix that
FIELD-NOTES describes, and file sizes close to the published Q4_K_M files."""

from gguf import GGMLQuantizationType as T

from quantize.recipe import ModelShape, row_bytes, tensor_type, use_more_bits

MIXTRAL_8X7B = dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_kv=8, vocab=32000)
MIXTRAL_8X22B = dict(n_layer=56, n_embd=6144, n_ff=16384, n_head=48, n_kv=8, vocab=32768)


def mixtral_tensors(m: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor in a Mixtral GGUF."""
    e, d, f, hd = 8, m["n_embd"], m["n_ff"], m["n_embd"] // m["n_head"]
    out = [("token_embd.weight", (m["vocab"], d)), ("output.weight", (m["vocab"], d)), ("output_norm.weight", (d,))]
    for b in range(m["n_layer"]):
        out += [
            (f"blk.{b}.attn_norm.weight", (d,)), (f"blk.{b}.ffn_norm.weight", (d,)),
            (f"blk.{b}.attn_q.weight", (d, d)), (f"blk.{b}.attn_k.weight", (m["n_kv"] * hd, d)),
            (f"blk.{b}.attn_v.weight", (m["n_kv"] * hd, d)), (f"blk.{b}.attn_output.weight", (d, d)),
            (f"blk.{b}.ffn_gate_inp.weight", (e, d)), (f"blk.{b}.ffn_gate_exps.weight", (e, f, d)),
            (f"blk.{b}.ffn_up_exps.weight", (e, f, d)), (f"blk.{b}.ffn_down_exps.weight", (e, d, f)),
        ]
    return out


def plan(m: dict, out: str) -> dict[str, tuple[T, tuple[int, ...]]]:
    shape = ModelShape(m["n_layer"], 8, m["n_head"], m["n_kv"], tied_embeddings=False)

    def stored(name, s):  # as the converter writes them: norms and routers F32, the rest BF16
        return T.F32 if len(s) == 1 or "ffn_gate_inp" in name else T.BF16

    return {n: (tensor_type(n, s[-1], len(s), stored(n, s), out, shape), s) for n, s in mixtral_tensors(m)}


def file_bytes(p: dict) -> int:
    total = 0
    for t, s in p.values():
        rows = 1
        for x in s[:-1]:
            rows *= x
        total += rows * row_bytes(t, s[-1])
    return total


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
    tt = lambda name, ne0, out="Q4_K_M": tensor_type(name, ne0, 2, T.BF16, out, shape)  # noqa: E731
    assert tt("blk.1.attn_q.weight", 576) == T.Q5_0
    assert tt("blk.1.attn_output.weight", 576) == T.Q5_1
    assert tt("blk.0.ffn_down_exps.weight", 1536) == T.Q6_K
    assert tt("blk.0.ffn_down_exps.weight", 1568) == T.Q8_0  # Q6_K -> Q8_0 (1568 = 49 x 32)
    assert tt("blk.1.attn_q.weight", 100) == T.F16  # not even a multiple of 32
    assert tt("token_embd.weight", 576) == T.Q8_0  # tied: output rules, 576 % 256 != 0
    assert tt("blk.1.attn_q.weight", 576, "BF16") == T.BF16
    assert tensor_type("blk.1.attn_norm.weight", 576, 1, T.F32, "Q4_K_M", shape) == T.F32

"""Tensor tables with the real shapes and Q4_K_M types of Mixtral 8x7B and 8x22B (no weights needed)."""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

from localmix.model_info import ModelInfo, Tensor, layer_of, role
from quantize.recipe import ModelShape, row_bytes, tensor_type

MIXTRAL_8X7B = dict(name="Mixtral-8x7B", n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_kv=8, vocab=32000, ctx=32768)
MIXTRAL_8X22B = dict(name="Mixtral-8x22B", n_layer=56, n_embd=6144, n_ff=16384, n_head=48, n_kv=8, vocab=32768, ctx=65536)


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


def stored_type(name: str, shape) -> T:  # as the converter writes them: norms and routers F32, the rest BF16
    return T.F32 if len(shape) == 1 or "ffn_gate_inp" in name else T.BF16


def types(m: dict, out: str) -> dict[str, tuple[T, tuple[int, ...]]]:
    shape = ModelShape(m["n_layer"], 8, m["n_head"], m["n_kv"], tied_embeddings=False)
    return {n: (tensor_type(n, s[-1], len(s), stored_type(n, s), out, shape), s) for n, s in mixtral_tensors(m)}


def nbytes(t: T, shape) -> int:
    rows = 1
    for x in shape[:-1]:
        rows *= x
    return rows * row_bytes(t, shape[-1])


def model_info(m: dict, out: str = "Q4_K_M") -> ModelInfo:
    tensors = []
    for name, (t, s) in types(m, out).items():
        n = 1
        for x in s:
            n *= x
        tensors.append(Tensor(name, nbytes(t, s), layer_of(name), role(name), t.name, n))
    return ModelInfo(
        path="(shapes)", arch="llama", n_layer=m["n_layer"], n_embd=m["n_embd"], n_head=m["n_head"], n_head_kv=m["n_kv"],
        head_dim=m["n_embd"] // m["n_head"], n_ff=m["n_ff"], n_expert=8, n_expert_used=2, n_ctx_train=m["ctx"],
        n_vocab=m["vocab"], tensors=tuple(tensors), name=m["name"], file_type=out,
    )


def sparse_mixtral_8x22b(path) -> list:
    """A split GGUF of Mixtral 8x22B at Q4_K_M with its real header and tensor table, as sparse files (85 GB
    on paper, headers real, data left as holes): the parts' paths."""
    from localmix.units import GiB
    from tests.support.ggufs import sparse_split

    m = MIXTRAL_8X22B
    kv = {"general.architecture": "llama", "general.name": "Mixtral-8x22B-shaped", "general.file_type": 15,
          "llama.block_count": m["n_layer"], "llama.context_length": m["ctx"], "llama.embedding_length": m["n_embd"],
          "llama.feed_forward_length": m["n_ff"], "llama.attention.head_count": m["n_head"],
          "llama.attention.head_count_kv": m["n_kv"], "llama.expert_count": 8, "llama.expert_used_count": 2,
          "llama.vocab_size": m["vocab"], "llama.rope.freq_base": 1e6}
    tensors = [(name, shape, t, nbytes(t, shape)) for name, (t, shape) in types(m, "Q4_K_M").items()]
    return sparse_split(path, kv, tensors, max_size=30 * GiB)

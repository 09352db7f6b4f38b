"""What the planner and the prompt read from a model file."""

from localmix.model_info import layer_of, read_model_info, role
from tests.support.ggufs import ARR, I32, base_model, serialise


def test_roles_and_layers():
    assert role("blk.3.ffn_up_exps.weight") == "expert" and role("token_embd.weight") == "embed"
    assert role("blk.3.ffn_gate_inp.weight") == "dense" and role("output.weight") == "dense"
    assert layer_of("blk.12.attn_q.weight") == 12 and layer_of("output_norm.weight") == -1
    assert layer_of("blk.x.attn_q.weight") == -1 and layer_of("blk.7") == -1


def test_mixtral_v3_file(tiny_gguf):
    info = read_model_info(tiny_gguf("Q4_K_M"))
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv, info.head_dim) == (4, 256, 4, 2, 64)
    assert (info.n_expert, info.n_expert_used, info.n_ctx_train, info.file_type) == (8, 2, 4096, "Q4_K_M")
    assert info.is_moe and info.n_vocab == 32768
    experts = [t for t in info.tensors if t.role == "expert"]
    assert len(experts) == 12 and {t.expert_kind for t in experts} == {"gate", "up", "down"}
    assert info.weight_bytes == sum(t.nbytes for t in info.tensors) and info.n_params > 20e6
    fmt = info.prompt
    assert fmt.native_tools and fmt.add_bos and (fmt.bos, fmt.eos) == ("<s>", "</s>") and "[INST]" in fmt.template


def test_split_file_has_the_parts_of_each_tensor(tiny_split):
    info = read_model_info(tiny_split[0])
    assert {t.part for t in info.tensors} == {0, 1}
    assert info.n_layer == 4 and len([t for t in info.tensors if t.role == "expert"]) == 12


def test_bpe_chatml_file(smol):
    fmt = read_model_info(smol).prompt
    assert not fmt.native_tools and "<|im_start|>" in fmt.template and fmt.eos == "<|im_end|>"


def test_hand_written_file_with_per_layer_heads_and_a_hostile_name(tmp_path):
    m = base_model()
    m.get("general.name").value = "\x1b]0;x\x07" + "n" * 1000
    m.get("llama.attention.head_count_kv").type, m.get("llama.attention.head_count_kv").value = ARR, [1, 2]
    m.get("llama.attention.head_count_kv").sub = I32
    for t in m.tensors:  # layer 0 with one key/value head
        if t.name in ("blk.0.attn_k.weight", "blk.0.attn_v.weight"):
            t.shape, t.data = [32, 8], bytes(2 * 32 * 8)
    path = tmp_path / "m.gguf"
    path.write_bytes(serialise(m))
    info = read_model_info(path)
    assert info.n_head_kv == 2  # the largest: what sizes the KV cache
    assert info.name.startswith("\\x1b]0;x\\x07nnn") and info.name.endswith("(1,006 characters)") and "\x1b" not in info.name


def _with_routing(tmp_path, counts, tokens=1000, sub=None):
    from tests.support.ggufs import KV, U64, write

    m = base_model()
    m.kv += [KV("localmix.routing.tokens", U64, tokens), KV("localmix.routing.expert_counts", ARR, counts, sub or U64)]
    return write(m, tmp_path / "routed.gguf")


def test_routing_statistics_are_rows_per_layer(tmp_path):
    # base_model: 2 layers of 4 experts, top-2: each layer's counts sum to tokens x 2
    counts = [700, 500, 400, 400, 1000, 600, 300, 100]
    info = read_model_info(_with_routing(tmp_path, counts))
    assert info.routing == ((700, 500, 400, 400), (1000, 600, 300, 100)) and info.routing_tokens == 1000


def test_routing_statistics_of_the_wrong_shape_are_ignored(tmp_path):
    info = read_model_info(_with_routing(tmp_path, [1, 2, 3]))  # 3 values for 2 layers x 4 experts
    assert info.routing == () and info.routing_tokens == 0
    info = read_model_info(_with_routing(tmp_path, [-1] * 8, sub=I32))
    assert info.routing == ()

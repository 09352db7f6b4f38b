"""The planner on the real tensor tables of Mixtral 8x7B and 8x22B at Q4_K_M (no weights needed)."""

import itertools
import re
from dataclasses import replace

import pytest

from localmix.errors import DoesNotFit
from localmix.planner import Budget, kv_cache_bytes, llama_args, n_cpu_moe, override_patterns, plan, split_layers
from localmix.units import GiB
from tests.support.shapes import MIXTRAL_8X7B, MIXTRAL_8X22B, model_info

MODELS = {"8x7B": model_info(MIXTRAL_8X7B), "8x22B": model_info(MIXTRAL_8X22B)}
BUDGETS_GIB = [24, 16, 12, 8, 0]
CTX = 4096


def budget(vram_gib: float, ram_gib: float = 256) -> Budget:
    return Budget(vram=int(vram_gib * GiB), ram=int(ram_gib * GiB), gpu_bandwidth=1.0e12, cpu_bandwidth=60e9)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("vram", BUDGETS_GIB)
def test_never_over_budget_and_every_tensor_placed(model, vram):
    m = MODELS[model]
    p = plan(m, budget(vram), CTX)
    assert p.vram_total <= vram * GiB
    assert p.gpu <= {t.name for t in m.tensors}
    assert p.vram.get("weights", 0) + p.ram["weights"] == m.weight_bytes
    assert p.vram.get("kv_cache", 0) + p.ram["kv_cache"] == kv_cache_bytes(m, CTX, "f16")
    if vram == 0:
        assert not p.gpu and p.n_gpu_layers == 0
    assert "token_embd.weight" not in p.gpu  # llama.cpp keeps the input embedding in host memory


@pytest.mark.parametrize("model", MODELS)
def test_monotonic_in_the_budget(model):
    m = MODELS[model]
    plans = [plan(m, budget(v), CTX, ubatch=512) for v in range(0, 100, 2)]  # one micro-batch: the auto one trades decode
    for a, b in itertools.pairwise(plans):
        assert b.vram.get("weights", 0) >= a.vram.get("weights", 0)
        assert b.decode_tps >= a.decode_tps * 0.999


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("vram", BUDGETS_GIB)
def test_at_least_as_fast_as_every_whole_layer_split_that_fits(model, vram):
    m = MODELS[model]
    auto = plan(m, budget(vram), CTX, ubatch=512)  # the same micro-batch as the splits (test_planner_tuning: the chosen one)
    fitting = [p for n in range(m.n_layer + 1) if (p := n_cpu_moe(m, budget(vram), n, CTX))]
    for p in fitting:
        assert p.vram_total <= vram * GiB
        assert auto.decode_tps >= p.decode_tps, p.label
        assert auto.vram["weights"] >= p.vram["weights"]
    if vram >= 16:
        assert fitting, "a 16 GiB card holds some whole expert layers"


def test_dense_first_then_experts():
    m = MODELS["8x7B"]
    p = plan(m, budget(12), CTX)
    dense = {t.name for t in m.tensors if t.role == "dense"}
    assert dense <= p.gpu  # attention, norms, routers and output read every token: all on the GPU
    experts_on_gpu = [t for t in m.tensors if t.role == "expert" and t.name in p.gpu]
    assert experts_on_gpu and len(experts_on_gpu) < 96
    assert p.cpu_experts and set(p.cpu_experts).isdisjoint(p.gpu)


@pytest.mark.parametrize("model", MODELS)
def test_tensor_granularity_leaves_no_tensor_that_fits(model):
    m = MODELS[model]
    partial_seen = False
    for tenth_gib in range(60, 400, 7):
        p = plan(m, budget(tenth_gib / 10), CTX)
        if p.n_gpu_layers < m.n_layer:
            continue
        left = tenth_gib / 10 * GiB - p.vram_total
        cpu = [t for t in m.tensors if t.role == "expert" and t.name not in p.gpu]
        assert all(t.nbytes > left for t in cpu), "an expert tensor that fits was left on the CPU"
        on_gpu = [t for t in m.tensors if t.role == "expert" and t.name in p.gpu]
        per_layer = {}
        for t in on_gpu:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + 1
        partial_seen |= any(n < 3 for n in per_layer.values())
    assert partial_seen, "some budget puts only part of a layer's experts on the GPU"


def test_small_budget_offloads_fewer_layers():
    """8 GiB cannot hold 8x22B's attention for all 56 layers plus the KV cache: only the last layers
    go to the GPU, all experts stay on the CPU."""
    m = MODELS["8x22B"]
    p = plan(m, budget(4), CTX)
    assert 0 < p.n_gpu_layers < m.n_layer
    assert not any(t.role == "expert" for t in m.tensors if t.name in p.gpu)
    assert p.vram_total <= 4 * GiB


def test_prediction_matches_field_notes_anchor():
    """FIELD-NOTES (H100, 8x7B-shaped Q4_0): all experts on the CPU 9.3 tok/s, none 200 tok/s."""
    m = model_info(MIXTRAL_8X7B, "Q4_0")
    b = Budget(vram=80 * GiB, ram=128 * GiB, gpu_bandwidth=3.35e12, cpu_bandwidth=59e9)
    all_cpu = n_cpu_moe(m, b, 32, CTX)
    none_cpu = n_cpu_moe(m, b, 0, CTX)
    assert all_cpu.decode_tps == pytest.approx(9.3, rel=0.2)
    assert none_cpu.decode_tps == pytest.approx(200, rel=0.2)
    assert n_cpu_moe(m, b, 8, CTX).decode_tps == pytest.approx(28.6, rel=0.2)


def test_no_fit_error_says_what_would_fit():
    m = MODELS["8x22B"]
    with pytest.raises(DoesNotFit) as e:
        plan(m, budget(24, ram_gib=64), 65536)
    msg = str(e.value)
    assert "does not fit" in msg and "--ctx" in msg
    with pytest.raises(DoesNotFit) as e:
        plan(m, budget(0, ram_gib=64), CTX)
    assert "smaller quantization" in str(e.value)


def test_llama_args_round_trip():
    m = MODELS["8x7B"]
    p = plan(m, budget(12), CTX)
    args = llama_args(m, p)
    assert args[:2] == ["-ngl", "33"]
    pats = [re.compile(a.removesuffix("=CPU")) for a in args[3::2]]
    matched = {t.name for t in m.tensors if any(r.search(t.name) for r in pats)}
    assert matched == set(p.cpu_experts)
    assert len(override_patterns(p)) <= 3


def test_split_layers_are_offloaded_layers_with_cpu_experts():
    """llama.cpp offloads the *last* n_gpu_layers layers: with 16 of 32 offloaded (layers 16-31) and the
    experts of layers 16-23 on the GPU, layers 24-31 are split, not 0-15."""
    m = MODELS["8x7B"]
    gpu = frozenset(t.name for t in m.tensors if t.layer >= 16 and (t.role == "dense" or t.layer < 24))
    assert split_layers(m, gpu, 16) == set(range(24, 32))
    assert split_layers(m, gpu, 0) == set()
    everything = frozenset(t.name for t in m.tensors)
    assert split_layers(m, everything, 32) == set()


def test_no_tensor_is_named_twice_in_the_overrides():
    m = MODELS["8x22B"]
    p = plan(m, budget(24, 128), CTX)
    pats = [re.compile(a) for a in override_patterns(p)]
    for t in m.tensors:
        assert sum(bool(r.search(t.name)) for r in pats) == (t.name in p.cpu_experts)


def test_tied_embeddings_read_token_embd_as_the_output_matrix():
    """Without output.weight (tied embeddings, as SmolLM2) llama.cpp computes the logits with token_embd: all
    of it is read for every token, from RAM, or from the copy llama.cpp makes on the GPU when the output
    layer is offloaded (that copy takes VRAM; the input embedding itself stays in RAM)."""
    untied = MODELS["8x7B"]
    tied = replace(untied, tensors=tuple(t for t in untied.tensors if t.name != "output.weight"))
    embd = next(t for t in tied.tensors if t.name == "token_embd.weight")
    output = next(t for t in untied.tensors if t.name == "output.weight")
    assert tied.tied_embeddings and not untied.tied_embeddings
    assert tied.read_fraction(embd) == 1.0 and untied.read_fraction(embd) == 0.0
    cpu = budget(0)
    seconds = lambda m: 1 / plan(m, cpu, CTX).decode_tps
    assert seconds(tied) == pytest.approx(seconds(untied) - output.nbytes / cpu.cpu_bandwidth + embd.nbytes / cpu.cpu_bandwidth)
    for vram in BUDGETS_GIB:
        p = plan(tied, budget(vram), CTX)
        assert embd.name not in p.gpu and p.vram_total <= vram * GiB
        copy = embd.nbytes if p.n_gpu_layers == tied.n_layer else 0
        assert p.vram.get("weights", 0) + p.ram["weights"] == tied.weight_bytes + copy
    all_in = Budget(vram=80 * GiB, ram=128 * GiB, gpu_bandwidth=3.35e12, cpu_bandwidth=59e9)
    p = plan(tied, all_in, CTX)
    assert p.n_gpu_layers == tied.n_layer and not p.cpu_experts
    assert 1 / p.decode_tps == pytest.approx(1 / plan(untied, all_in, CTX).decode_tps + (embd.nbytes - output.nbytes) / 3.35e12)

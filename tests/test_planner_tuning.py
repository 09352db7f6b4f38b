"""The planner's other knobs on Mixtral's real tensor tables: the micro-batch chosen with the placement (its
compute buffer in VRAM), prefill predicted from the experts copied per micro-batch, and context against speed."""

import itertools

import pytest

from localmix.errors import DoesNotFit
from localmix.planner import (
    KV_TYPES,
    UBATCH_DECODE_TOLERANCE,
    UBATCHES,
    Budget,
    compute_bytes,
    context_candidates,
    context_speeds,
    default_context,
    n_cpu_moe,
    plan,
    prefill_tps,
)
from localmix.units import GiB
from tests.support.shapes import MIXTRAL_8X7B, MIXTRAL_8X22B, model_info

M7 = model_info(MIXTRAL_8X7B)
M22 = model_info(MIXTRAL_8X22B)


def budget(vram_gib: float, ram_gib: float) -> Budget:
    return Budget(vram=int(vram_gib * GiB), ram=int(ram_gib * GiB), gpu_bandwidth=1.0e12, cpu_bandwidth=60e9)


@pytest.mark.parametrize(("m", "vram", "ram"), [(M7, 12, 64), (M22, 24, 96)], ids=["8x7B-12G", "8x22B-24G"])
def test_experts_in_ram_pick_a_larger_micro_batch_and_count_its_buffer(m, vram, ram):
    b = budget(vram, ram)
    auto = plan(m, b, 4096)
    base = plan(m, b, 4096, ubatch=512)
    assert base.cpu_experts and auto.n_ubatch > 512 and auto.n_batch == auto.n_ubatch
    assert auto.vram["compute"] == compute_bytes(m, auto.n_ubatch) > base.vram["compute"]
    assert auto.vram_total <= b.vram and base.vram_total <= b.vram
    assert len(auto.gpu) <= len(base.gpu)  # the buffer took experts' room...
    assert auto.decode_tps >= base.decode_tps * (1 - UBATCH_DECODE_TOLERANCE)  # ...for little decode
    assert prefill_tps(m, auto, b, 4096) > 1.5 * prefill_tps(m, base, b, 4096)  # a long prompt is much quicker
    # every candidate the rule passed over is either slower at decode beyond the tolerance or slower at prefill
    for u in UBATCHES:
        other = plan(m, b, 4096, ubatch=u)
        assert other.vram_total <= b.vram
        assert ((other.decode_tps < auto.decode_tps and other.decode_tps < base.decode_tps * (1 - UBATCH_DECODE_TOLERANCE))
                or prefill_tps(m, other, b, 4096) <= prefill_tps(m, auto, b, 4096))


def test_vram_never_over_budget_with_any_micro_batch():
    for m in (M7, M22):
        for vram in range(2, 100, 6):
            for u in (None, *UBATCHES):
                for kv in KV_TYPES:
                    try:
                        p = plan(m, budget(vram, 256), 8192, kv, u)
                    except DoesNotFit:
                        continue
                    assert p.vram_total <= vram * GiB


def test_everything_on_the_gpu_or_cpu_only_keeps_512():
    assert plan(M7, budget(80, 128), 4096).n_ubatch == 512  # nothing copied per micro-batch: no reason to grow
    cpu = plan(M7, budget(0, 128), 4096)
    assert cpu.n_ubatch == cpu.n_batch == 512 and not cpu.vram
    assert plan(M7, budget(0, 128), 4096, ubatch=2048).n_ubatch == 2048  # --ubatch wins


def test_prefill_counts_the_experts_copied_per_micro_batch():
    b = budget(12, 64)
    p = plan(M7, b, 4096, ubatch=512)
    copied = sum(t.nbytes for t in M7.tensors if t.role == "expert" and t.name not in p.gpu)
    # per token at least the copy's share: the experts in RAM over PCIe, once per micro-batch of 512
    assert 1 / prefill_tps(M7, p, b, 4096) >= copied / b.pcie_bandwidth / 512
    all_gpu = plan(M7, budget(80, 128), 4096)
    assert prefill_tps(M7, all_gpu, b, 4096) > 2 * prefill_tps(M7, p, b, 4096)
    cpu = plan(M7, budget(0, 128), 4096)
    assert prefill_tps(M7, cpu, b, 4096) < prefill_tps(M7, cpu, b, 512)  # attention's quadratic part


def test_longer_contexts_on_a_gpu_displace_experts_and_lower_decode():
    b = budget(24, 96)
    contexts = context_candidates(M22)
    assert contexts == [4096, 8192, 16384, 32768, 65536]
    rows = context_speeds(M22, b, contexts, tuple(KV_TYPES))
    assert [(c, kv) for c, kv, _ in rows] == [(c, kv) for c in contexts for kv in KV_TYPES]
    speed = {(c, kv): tps for c, kv, tps in rows}
    for kv in KV_TYPES:
        tps = [speed[c, kv] for c in contexts]
        assert all(x is not None for x in tps)
        # a longer context never helps and 64K costs (a doubling may fit in what the last expert tensor left over)
        assert all(a >= b for a, b in itertools.pairwise(tps)) and tps[0] > tps[-1] * 1.04, kv
    for c in contexts:
        assert speed[c, "f16"] <= speed[c, "q8_0"] <= speed[c, "q4_0"]  # a smaller cache leaves experts their room
    assert speed[65536, "f16"] < speed[65536, "q8_0"] < speed[65536, "q4_0"]
    assert plan(M22, b, 65536).vram["kv_cache"] > plan(M22, b, 4096).vram["kv_cache"]
    # a budget that cannot hold the longest context says so with None
    small = context_speeds(M22, budget(24, 64), [4096, 65536], ("f16",))
    assert small[0][2] is not None and small[1] == (65536, "f16", None)
    assert default_context(M22, budget(24, 64)) < 65536


def test_default_context_is_the_longest_within_ten_percent_of_the_best():
    for m, b in ((M22, budget(24, 96)), (M7, budget(12, 64)), (M7, budget(0, 128))):
        for kv in KV_TYPES:
            chosen = default_context(m, b, kv)
            speed = {c: tps for c, _, tps in context_speeds(m, b, context_candidates(m), (kv,)) if tps is not None}
            best = max(speed.values())
            assert speed[chosen] >= 0.9 * best
            assert all(speed[c] < 0.9 * best for c in speed if c > chosen)
    assert default_context(M7, budget(0, 128)) == M7.n_ctx_train  # CPU only: the KV cache displaces nothing


def test_cpu_only_decode_is_the_same_for_every_context():
    rows = context_speeds(M7, budget(0, 128), context_candidates(M7), ("f16",))
    assert len({round(tps, 9) for _, _, tps in rows}) == 1


def test_the_chosen_plan_against_llama_cpp_splits_at_the_same_micro_batch():
    b = budget(12, 64)
    auto = plan(M7, b, 4096)
    splits = [p for n in range(M7.n_layer + 1) if (p := n_cpu_moe(M7, b, n, 4096, ubatch=auto.n_ubatch))]
    assert splits and all(auto.decode_tps >= p.decode_tps for p in splits)

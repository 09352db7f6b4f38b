"""The planner with workers (llama.cpp's RPC backend), on the real tensor tables of Mixtral 8x7B and 8x22B
at Q4_K_M: pure placements, no weights, no network."""

import dataclasses
import itertools
import re

import pytest

from localmix.errors import DoesNotFit
from localmix.planner import NETWORKS, Budget, Remote, hop_bytes, llama_args, override_patterns, plan, remote_patterns
from localmix.units import GiB
from tests.support.shapes import MIXTRAL_8X7B, MIXTRAL_8X22B, model_info

M7 = model_info(MIXTRAL_8X7B)
M22 = model_info(MIXTRAL_8X22B)
CTX = 4096
CPU_BW = 54e9


def worker(endpoint="10.0.0.2:50052", memory_gib=64.0, network="1gbe", bandwidth=CPU_BW, device=0, kind="cpu") -> Remote:
    hop, link = NETWORKS[network]
    return Remote(endpoint, device, kind, int(memory_gib * GiB), bandwidth, hop, link)


def budget(vram_gib, ram_gib, *remotes) -> Budget:
    return Budget(vram=int(vram_gib * GiB), ram=int(ram_gib * GiB), gpu_bandwidth=1e12, cpu_bandwidth=CPU_BW, remotes=remotes)


def expert_layers(m, names) -> set[int]:
    return {t.layer for t in m.tensors if t.name in set(names)}


def test_ram_too_small_sends_whole_layers_to_the_worker():
    p = plan(M22, budget(24, 48, worker()), CTX)
    assert p.ram_total <= 48 * GiB
    placed = p.remote["RPC0[10.0.0.2:50052]"]
    layers = expert_layers(M22, placed)
    # whole layers: every expert tensor of those layers that is not on the GPU, and none of the GPU's
    assert set(placed) == {t.name for t in M22.tensors if t.role == "expert" and t.layer in layers and t.name not in p.gpu}
    assert p.remote_memory["RPC0[10.0.0.2:50052]"] == sum(t.nbytes for t in M22.tensors if t.name in set(placed))
    assert p.vram.get("weights", 0) + p.ram["weights"] + sum(p.remote_memory.values()) == M22.weight_bytes
    assert set(placed).isdisjoint(p.cpu_experts) and set(placed).isdisjoint(p.gpu)
    assert p.remotes == (worker(),)
    alone = plan(M22, budget(24, 256), CTX)  # the same machine with RAM enough: the hops are what the worker costs
    assert p.decode_tps < alone.decode_tps


def test_a_slow_network_and_ram_enough_keeps_everything_here():
    p = plan(M22, budget(24, 128, worker(network="1gbe")), CTX)
    assert p.remote == {} and p.remotes == () and p.rpc_devices == ()
    assert p == plan(M22, budget(24, 128), CTX)
    assert "--rpc" not in llama_args(M22, p)


def test_a_fast_worker_takes_layers_when_that_is_faster():
    fast = worker(network="10gbe", bandwidth=800e9, kind="gpu", memory_gib=20)
    p = plan(M7, budget(0, 128, fast), CTX)  # CPU only here; a worker's GPU reads 15x faster
    assert p.remote and p.decode_tps > plan(M7, budget(0, 128), CTX).decode_tps
    assert p.remote_memory[fast.name] <= 20 * GiB
    slow = worker(network="1gbe", bandwidth=CPU_BW / 2)
    assert plan(M7, budget(0, 128, slow), CTX).remote == {}


def test_each_workers_memory_is_respected():
    a, b = worker("10.0.0.2:50052", memory_gib=6), worker("10.0.0.3:50052", memory_gib=9, network="10gbe")
    p = plan(M22, budget(24, 45, a, b), CTX)
    assert set(p.remote) == {a.name, b.name}
    assert p.remote_memory[a.name] <= a.memory and p.remote_memory[b.name] <= b.memory
    assert p.ram_total <= 45 * GiB
    assert expert_layers(M22, p.remote[a.name]).isdisjoint(expert_layers(M22, p.remote[b.name]))
    assert [e for e, _ in p.rpc_devices] == [b.endpoint, a.endpoint] or [e for e, _ in p.rpc_devices] == [a.endpoint, b.endpoint]


def test_does_not_fit_counts_the_workers():
    with pytest.raises(DoesNotFit) as e:
        plan(M22, budget(24, 40, worker(memory_gib=8)), CTX)
    text = str(e.value)
    assert "on workers" in text and "+ 8.00 GiB on 1 worker" in text and "\n" not in text
    assert "another worker (--rpc)" in text
    with pytest.raises(DoesNotFit) as e:
        plan(M22, budget(24, 40), CTX)
    assert "worker" not in str(e.value)  # without workers the message is as it was


def test_hop_bytes_grow_with_the_activations_both_ways():
    # What a hop really sends is checked against a counting proxy in test_rpc_end_to_end.py.
    wider = dataclasses.replace(M22, n_embd=M22.n_embd + 1000)
    assert hop_bytes(wider) - hop_bytes(M22) == 2 * 4 * 1000
    assert hop_bytes(M22) > 2 * 4 * M22.n_embd


def test_llama_args_name_the_workers_and_keep_layers_local():
    a, b = worker("10.0.0.2:50052", memory_gib=6), worker("[::1]:50053", memory_gib=9, device=1)
    p = plan(M22, budget(24, 45, a, b), CTX)
    args = llama_args(M22, p)
    assert args[args.index("--rpc") + 1] == ",".join(e for e, _ in p.rpc_devices)
    assert dict(p.rpc_devices) == {"10.0.0.2:50052": 1, "[::1]:50053": 2}
    assert args[args.index("-ts") + 1] == "0,0,0,1"  # three RPC devices first, then the local GPU
    targets = [v.split("=", 1)[1] for f, v in itertools.pairwise(args) if f == "-ot"]
    assert set(targets) == {"CPU", "RPC0[10.0.0.2:50052]", "RPC1[[::1]:50053]"}
    cpu_only = plan(M22, budget(0, 60, worker(memory_gib=30)), CTX)
    assert cpu_only.remote and "-ts" not in llama_args(M22, cpu_only)  # -ngl 0 keeps every layer here


@pytest.mark.parametrize("ram_gib", [40, 48, 60])
def test_remote_patterns_match_exactly_the_tensors_placed(ram_gib):
    a, b = worker("10.0.0.2:50052", memory_gib=10), worker("10.0.0.3:50052", memory_gib=30, network="10gbe")
    p = plan(M22, budget(24, ram_gib, a, b), CTX)
    names = [t.name for t in M22.tensors]
    by_key = {(r.endpoint, r.device): r.name for r in p.remotes}
    assert set(by_key.values()) == set(p.remote)
    for key, patterns in remote_patterns(p).items():
        compiled = [re.compile(x) for x in patterns]
        assert {n for n in names if any(c.search(n) for c in compiled)} == set(p.remote[by_key[key]])
    cpu = [re.compile(x) for x in override_patterns(p)]
    assert {n for n in names if any(c.search(n) for c in cpu)} == set(p.cpu_experts)


def test_the_plan_in_words_names_the_workers():
    from localmix.describe import layer_rows, summary_line, workers

    a, b = worker("10.0.0.2:50052", memory_gib=6), worker("10.0.0.3:50052", memory_gib=9, network="10gbe")
    p = plan(M22, budget(24, 45, a, b), CTX)
    assert workers(p) == [a.endpoint, b.endpoint]
    rows = layer_rows(M22, p)
    assert all(len(r) == 5 for r in rows)
    on = {e: {x for r in rows if r[3 + i] for x in r[0].split(", ")} for i, e in enumerate(workers(p))}
    assert all(on.values()) and all(r[2] == "worker" for r in rows if r[3] or r[4])
    line = summary_line(M22, p)
    assert "; 2 workers 12.7 GiB: experts of layers 0-8; predicted" in line
    assert len(layer_rows(M22, plan(M22, budget(24, 128), CTX))[0]) == 3  # no workers, no columns


def test_the_split_label_counts_the_workers():
    from localmix.describe import split_label

    p = plan(M7, budget(0, 128, worker(network="10gbe", bandwidth=800e9, kind="gpu", memory_gib=20)), CTX)
    cpu, there = p.ram["weights"], sum(p.remote_memory.values())
    assert split_label(p) == f"{round(100 * cpu / (cpu + there))}%/{round(100 * there / (cpu + there))}% CPU/workers"
    assert split_label(plan(M22, budget(24, 45, worker(memory_gib=20)), CTX)).endswith("% CPU/GPU/workers")

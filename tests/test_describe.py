"""A plan in words, on the real tensor tables of Mixtral 8x7B and 8x22B."""

from localmix.describe import layer_rows, ranges, split_label, summary_line
from localmix.planner import Budget, plan
from localmix.units import GiB
from tests.support.shapes import MIXTRAL_8X7B, MIXTRAL_8X22B, model_info

M7, M22 = model_info(MIXTRAL_8X7B), model_info(MIXTRAL_8X22B)


def budget(vram_gib, ram_gib=256):
    return Budget(vram=int(vram_gib * GiB), ram=int(ram_gib * GiB), gpu_bandwidth=1e12, cpu_bandwidth=60e9)


def test_ranges():
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and ranges([]) == "" and ranges([4]) == "4"


def test_cpu_only():
    p = plan(M7, budget(0), 4096)
    assert split_label(p) == "100% CPU"
    assert summary_line(M7, p) == f"CPU only: {M7.weight_bytes / GiB:.1f} GiB of weights in RAM; predicted {p.decode_tps:.1f} tok/s"
    assert layer_rows(M7, p) == [("0-31", "CPU", "CPU")]


def test_experts_split_between_gpu_and_cpu():
    p = plan(M7, budget(16), 4096)
    cpu_share = round(100 * p.ram["weights"] / M7.weight_bytes)
    assert split_label(p) == f"{cpu_share}%/{100 - cpu_share}% CPU/GPU" and 30 < cpu_share < 70
    line = summary_line(M7, p)
    assert line.startswith(f"GPU {p.vram_total / GiB:.1f} GiB: attention + experts of layers ")
    assert "; CPU " in line and "experts of layers 0-" in line
    rows = layer_rows(M7, p)
    assert rows[0][0].startswith("0-") and rows[0][1:] == ("GPU", "CPU") and rows[-1][1:] == ("GPU", "GPU")
    assert {r[1] for r in rows} == {"GPU"}
    covered = []
    for first_last, _, _ in rows:
        a, _, b = first_last.partition("-")
        covered += list(range(int(a), int(b or a) + 1))
    assert covered == list(range(32))


def test_some_layers_offloaded():
    p = plan(M22, budget(4), 4096)
    assert 0 < p.n_gpu_layers < M22.n_layer
    first = M22.n_layer - p.n_gpu_layers
    line = summary_line(M22, p)
    assert f"attention of layers {first}-55" in line and "experts of layers 0-55" in line
    assert layer_rows(M22, p)[-1] == (f"{first}-55", "GPU", "CPU")


def test_all_on_the_gpu():
    p = plan(M7, budget(80), 4096)
    assert split_label(p) == "100% GPU"
    assert summary_line(M7, p).endswith(f"CPU {p.ram['weights'] / GiB:.1f} GiB: token embeddings; predicted {p.decode_tps:.1f} tok/s")

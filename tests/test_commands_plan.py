"""`localmix plan` as a user runs it: on the test model, and on a split GGUF of Mixtral 8x22B's real shapes
(85 GB at Q4_K_M, written by gguf-py's split writer as sparse files: headers real, data left as holes)."""

import json
import re
import shlex

import gguf
import pytest

from localmix.units import GiB
from tests.support.cli import one_line_error, run_cli
from tests.support.shapes import sparse_mixtral_8x22b


@pytest.fixture(scope="module")
def mixtral_8x22b_split(tmp_path_factory):
    parts = sparse_mixtral_8x22b(tmp_path_factory.mktemp("8x22b") / "Mixtral-8x22B-Q4_K_M.gguf")
    assert len(parts) == 3 and sum(p.stat().st_size for p in parts) > 84e9
    return parts


def test_every_expert_of_every_part_is_placed(mixtral_8x22b_split):
    part1 = str(mixtral_8x22b_split[0])
    r = run_cli("plan", part1, "--vram", "24G", "--ram", "128G", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    in_parts = [[t.name for t in gguf.GGUFReader(p).tensors] for p in mixtral_8x22b_split]
    assert len(d["tensors"]) == sum(map(len, in_parts)) == 56 * 10 + 3
    assert d["model"]["parts"] == [str(p) for p in mixtral_8x22b_split]
    assert d["vram"]["weights"] + d["ram"]["weights"] == d["model"]["bytes"] > 84e9
    assert sum(d["vram"].values()) <= 24 * GiB and d["n_gpu_layers"] == 56
    experts = {t["name"]: t for t in d["tensors"] if t["name"].endswith("_exps.weight")}
    assert len(experts) == 168 and {t["part"] for t in experts.values()} == {0, 1, 2}
    cpu = {name for name, t in experts.items() if t["device"] == "cpu"}
    assert cpu == set(d["cpu_experts"]) and 100 < len(cpu) < 168  # most experts stay in RAM; the rest fill the card
    for layer in d["layers"]:
        assert set(layer["experts"]) == {"gate", "up", "down"}

    args = shlex.split(run_cli("plan", part1, "--vram", "24G", "--ram", "128G", "--llama-args").stdout)
    assert args[:2] == ["-ngl", "57"]
    patterns = [re.compile(a.removesuffix("=CPU")) for flag, a in zip(args[2::2], args[3::2]) if flag == "-ot"]
    named = {n for names in in_parts for n in names if any(p.search(n) for p in patterns)}
    assert named == cpu  # every CPU expert of every part, and nothing else
    assert all(any(n in named for n in names) for names in in_parts[1:])  # later parts' experts are there


def test_plan_of_the_split_in_words(mixtral_8x22b_split):
    r = run_cli("plan", str(mixtral_8x22b_split[2]), "--vram", "24G", "--ram", "128G")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "Mixtral-8x22B-shaped Q4_K_M · 79.7 GiB · 3 files · 56 layers · 8 experts, top-2" in text
    assert "Predicted: decode" in text and "best of 3 probes, measured" in text


def test_plan_json_and_llama_args(smol):
    r = run_cli("plan", str(smol), "--vram", "0.9G", "--ram", "8G", "--json", "--ctx", "2048")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("model", "machine", "budget", "ctx", "kv_type", "n_gpu_layers", "vram", "ram", "predicted", "layers",
                "tensors", "cpu_experts", "llama_args"):
        assert key in d
    assert d["machine"]["bandwidth_probes"] == 3 and d["machine"]["read_bandwidth"] > 1e9
    assert sum(d["vram"].values()) <= 0.9 * GiB
    assert d["layers"][0]["experts"] == {"gate": "cpu", "up": "cpu", "down": "cpu"}
    args = run_cli("plan", str(smol), "--vram", "0.9G", "--ram", "8G", "--ctx", "2048", "--llama-args").stdout.split()
    assert args[:2] == ["-ngl", "31"] and args.count("-ot") == 3
    table = run_cli("plan", str(smol), "--vram", "0.9G", "--ctx", "2048")
    assert table.returncode == 0 and "Placement" in table.stdout and "Predicted: decode" in table.stdout


def test_plan_measures_again_on_request(smol):
    first = json.loads(run_cli("plan", str(smol), "--json").stdout)["machine"]
    again = json.loads(run_cli("plan", str(smol), "--json", "--measure").stdout)["machine"]
    assert again["bandwidth_measured"] > first["bandwidth_measured"] and again["bandwidth_probes"] == 3


def test_plan_that_does_not_fit_says_so(smol):
    assert one_line_error(run_cli("plan", str(smol), "--vram", "0", "--ram", "100M"), "does not fit")
    assert one_line_error(run_cli("plan", str(smol), "--ctx", "100000"), "longer than the model's trained context")
    r = run_cli("plan", str(smol), "--vram", "lots")
    assert r.returncode == 2 and "not a size: 'lots'" in r.stderr


def test_plan_for_another_machines_memory_bandwidth(smol):
    """--ram-bandwidth: the other machine's RAM read bandwidth (as our probe measures it); decode reads 0.9 of
    it, not capped by this machine's two cores."""
    def planned(*flags):
        r = run_cli("plan", str(smol), "--vram", "0", "--ram", "8G", "--json", *flags)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    here, fast, slow = planned(), planned("--ram-bandwidth", "80GB/s"), planned("--ram-bandwidth", "20e9")
    assert here["budget"]["ram_bandwidth"] is None and here["budget"]["cpu_decode_bandwidth"] == here["machine"]["cpu_decode_bandwidth"]
    assert fast["budget"]["ram_bandwidth"] == 80e9 and fast["budget"]["cpu_decode_bandwidth"] == pytest.approx(72e9)
    assert slow["budget"]["cpu_decode_bandwidth"] == pytest.approx(18e9)
    assert fast["predicted"]["decode_tps"] > here["predicted"]["decode_tps"] > slow["predicted"]["decode_tps"]
    assert fast["tensors"] == slow["tensors"]  # the placement is the same, only the speed changes
    table = run_cli("plan", str(smol), "--vram", "0", "--ram", "8G", "--ram-bandwidth", "80 GB/s")
    assert table.returncode == 0 and "Budget: VRAM 0.0 GiB, RAM 8.0 GiB at 80 GB/s" in " ".join(table.stdout.split())
    assert one_line_error(run_cli("plan", str(smol), "--ram-bandwidth", "80"), "not a memory bandwidth: '80'", code=2)

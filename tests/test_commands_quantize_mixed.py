"""`localmix quantize --bpw / --for`: a type per tensor, chosen from errors measured on the real weights.
Real checkpoints, real llama.cpp: the file's size against its target, the dry run against the real run,
every type one llama.cpp loads (the file answers through `run`), the target in the metadata and in `info`,
a `--for --tps` file whose plan on that machine reaches the speed, and each bad combination one line."""

import json
import math
from pathlib import Path

import gguf
import pytest

from quantize.convert import OVERRIDE_TYPES
from quantize.recipe import block_size
from tests.support.cli import one_line_error, run_cli

GiB = 1 << 30
BANDWIDTH = "2GB/s"  # a slow machine: the bytes read per token dominate the tiny model's decode time


def data(path: Path) -> tuple[int, int]:
    """(bytes of tensor data, weights): bits per weight as llama.cpp counts them."""
    r = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in r.tensors), sum(int(t.n_elements) for t in r.tensors)


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def dry_run_types(stdout: str) -> dict[str, str]:
    """The dry run's table back to tensor names: a row per run of layers, then the whole-model tensors."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layers "))
    kinds = lines[start].split()[1:]
    out = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.split()
        if len(cells) == 2:  # token_embd / output
            out[f"{cells[0]}.weight"] = cells[1]
            continue
        first, _, last = cells[0].partition("-")
        for layer in range(int(first), int(last or first) + 1):
            out.update({f"blk.{layer}.{k}.weight": t for k, t in zip(kinds, cells[1:], strict=True) if t != "-"})
    return out


def chosen(path: Path) -> dict[str, str]:
    """The types of the tensors the search chose for (norms and routers stay F32)."""
    return {n: t for n, t in tensor_types(path).items() if not n.endswith(("_norm.weight", "ffn_gate_inp.weight"))}


def info_json(path: Path) -> dict:
    r = run_cli("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def plan_json(path: Path, *budget: str) -> dict:
    r = run_cli("plan", str(path), *budget, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def nothing_written(folder: Path) -> bool:
    return not list(folder.iterdir())


@pytest.fixture(scope="module")
def at_q4_k_m(tiny, tiny_gguf, tmp_path_factory):
    """--bpw at uniform Q4_K_M's bits per weight (rounded down): the dry run's output, and the file."""
    uniform_bytes, n = data(tiny_gguf("Q4_K_M"))
    bpw = math.floor(uniform_bytes * 8 / n * 1e6) / 1e6
    folder = tmp_path_factory.mktemp("bpw")
    out = folder / "mixed.gguf"
    dry = run_cli("quantize", str(tiny), "--bpw", f"{bpw}", "-o", str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert nothing_written(folder)
    real = run_cli("quantize", str(tiny), "--bpw", f"{bpw}", "-o", str(out))
    assert real.returncode == 0, real.stderr
    return dry, out, bpw, uniform_bytes


def test_bpw_at_the_size_of_q4_k_m_is_within_one_percent_and_not_above(at_q4_k_m):
    _, out, _, uniform_bytes = at_q4_k_m
    mixed_bytes, _ = data(out)
    assert 0.99 * uniform_bytes <= mixed_bytes <= uniform_bytes


def test_the_dry_run_chooses_what_the_real_run_writes(at_q4_k_m):
    dry, out, _, _ = at_q4_k_m
    assert "Dry run: nothing was written." in dry.stdout
    assert dry_run_types(dry.stdout) == chosen(out)
    assert "mean KLD (uniform Q4_K_M: " in dry.stdout


def test_the_target_round_trips_into_info(at_q4_k_m):
    _, out, bpw, _ = at_q4_k_m
    d = info_json(out)
    target = d["target"]
    assert target["kind"] == "bpw"
    assert target["bpw"] == pytest.approx(bpw, rel=1e-6)  # float32
    assert target["predicted_error"] > 0 and target["reference_error"] > 0
    assert target["vram"] is None and target["predicted_decode_tps"] is None
    assert d["type"]  # general.file_type: a uniform mix's name
    r = run_cli("info", str(out))
    assert r.returncode == 0 and "made for" in r.stdout and "quantize --bpw" in " ".join(r.stdout.split())


def test_a_low_bpw_with_an_imatrix_loads_in_llama_cpp_and_answers(tiny, tmp_path):
    out = tmp_path / "low.gguf"
    text = Path(__file__).parent.parent / "README.md"  # shorter to tokenize than the built-in text
    r = run_cli("quantize", str(tiny), "--bpw", "3.2", "--imatrix", "auto", "--calibration-text", str(text),
                "--calibration-tokens", "1024", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "low.imatrix.gguf").is_file()
    accepted = {t.name for t in OVERRIDE_TYPES}
    for t in gguf.GGUFReader(out).tensors:  # what llama.cpp's loader holds a tensor to
        assert t.tensor_type.name in accepted, t.name
        assert int(t.shape[0]) % block_size(t.tensor_type) == 0, t.name  # gguf lists ne0 first
    answer = run_cli("run", str(out), "Hello", "--max-tokens", "8", "--temperature", "0")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()


def test_for_a_cpu_only_machine_at_a_speed_the_plan_reaches_it(tiny, tiny_gguf, tmp_path):
    budget = ("--vram", "0", "--ram", "8G", "--ram-bandwidth", BANDWIDTH)
    uniform = plan_json(tiny_gguf("Q4_K_M"), *budget)["predicted"]["decode_tps"]
    tps = round(uniform * 1.2, 1)
    out = tmp_path / "fast.gguf"
    r = run_cli("quantize", str(tiny), "--for", "0,8G", "--tps", f"{tps}", "--ram-bandwidth", BANDWIDTH, "-o", str(out))
    assert r.returncode == 0, r.stderr
    planned = plan_json(out, *budget)["predicted"]["decode_tps"]
    assert planned >= tps
    target = info_json(out)["target"]
    assert target["kind"] == "machine"
    assert (target["vram"], target["ram"], target["ctx"]) == (0, 8 * GiB, 4096)
    assert target["ram_bandwidth"] == pytest.approx(2e9, rel=1e-6)
    assert target["tps"] == pytest.approx(tps, rel=1e-6)
    assert target["predicted_decode_tps"] == pytest.approx(planned, rel=1e-4)


def test_for_without_a_speed_keeps_the_error_of_the_reference(tiny, tmp_path):
    r = run_cli("quantize", str(tiny), "--for", "0,8G", "--ram-bandwidth", BANDWIDTH, "-o", str(tmp_path / "x.gguf"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert nothing_written(tmp_path)
    text = r.stdout
    line = next(x for x in text.splitlines() if x.startswith("estimated error"))
    error, reference = float(line.split()[2]), float(line.split("uniform Q4_K_M: ")[1].split(";")[0])
    assert error <= reference
    assert "predicted decode" in text and "CPU only" in text


@pytest.mark.parametrize(("argv", "expect", "code"), [
    (["--tps", "5"], "--tps goes with --for", 1),
    (["--ram-bandwidth", "80GB/s"], "--ram-bandwidth goes with --for", 1),
    (["--bpw", "4", "--for", "0,8G"], "give one", 1),
    (["--bpw", "1.2"], "out of reach for this model: it takes from", 1),
    (["--bpw", "30"], "bits per weight", 1),
    (["--dry-run"], "--dry-run goes with --bpw or --for", 1),
    (["--for", "0,8G", "--vram", "1G"], "--vram and --ram go without --for", 1),
    (["--for", "0,8G", "--ctx", "100000"], "longer than the model's trained context", 1),
    (["--bpw", "4", "--type", "BF16"], "not a quantized mix", 1),
    (["--for", "12G"], "not VRAM,RAM", 2),
    (["--bpw", "x"], "not bits per weight", 2),
])
def test_bad_targets_are_one_line(tiny, tmp_path, argv, expect, code):
    out = tmp_path / "m.gguf"
    r = run_cli("quantize", str(tiny), "-o", str(out), *argv)
    assert one_line_error(r, expect, code), r.stderr
    assert nothing_written(tmp_path)


def test_a_machine_too_small_is_one_line(tiny, tmp_path):
    r = run_cli("quantize", str(tiny), "--for", "0,1M", "-o", str(tmp_path / "m.gguf"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert nothing_written(tmp_path)

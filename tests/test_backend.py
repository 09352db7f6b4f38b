"""The llama.cpp backend and the run/plan/bench commands, on real GGUF files made by quantize from the
test checkpoints, loaded by real llama.cpp (CPU build: -ngl is a no-op there, but the tensor overrides
are applied and logged all the same)."""

import json
import threading

import pytest
from conftest import run_cli

from localmix.backends import Sampling
from localmix.backends.llama import LlamaBackend
from localmix.model_info import read_model_info
from localmix.planner import GiB, Budget, plan

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(upcycled_gguf):
    return upcycled_gguf("Q4_K_M")


def backend(path, vram_gib=0.0, ctx=1024):
    info = read_model_info(path)
    p = plan(info, Budget(vram=int(vram_gib * GiB), ram=16 * GiB), ctx)
    b = LlamaBackend(info, p, ctx=ctx, threads=2)
    return b, p


def test_overrides_reach_llama_cpp(smol):
    b, p = backend(smol, vram_gib=0.9)
    assert 0 < len(p.cpu_experts) < 90  # a split plan: some experts pinned to the CPU, others not
    progress = []
    b.load(progress=progress.append)
    try:
        overridden = {line.split()[1] for line in b.load_log if "buffer type overridden to CPU" in line}
        assert overridden == set(p.cpu_experts)
        assert progress and progress[-1] == 1.0
    finally:
        b.close()


def test_stream_answers_and_second_turn_reuses_the_cache(smol):
    b, _ = backend(smol)
    b.load()
    try:
        reply = "".join(b.stream(FRANCE, Sampling(max_tokens=32, temperature=0)))
        assert "Paris" in reply
        first = b.stats
        assert first.prompt_tokens > 20 and first.gen_tokens > 0 and first.stop == "eos"
        assert first.ttft > 0 and first.ctx_used == first.prompt_tokens + first.gen_tokens
        follow = FRANCE + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Germany?"}]
        n_follow = len(b.tokens_for(follow))
        "".join(b.stream(follow, Sampling(max_tokens=16, temperature=0)))
        second = b.stats
        assert second.cached_tokens >= first.prompt_tokens  # the whole first turn came from the KV cache
        assert second.prompt_tokens < n_follow - first.prompt_tokens + 8  # only the new part was evaluated
    finally:
        b.close()


def test_cancel_stops_a_reply_at_once(smol):
    b, _ = backend(smol)
    b.load()
    try:
        story = [{"role": "user", "content": "Write a very long story about a dragon."}]
        got = []
        for i, piece in enumerate(b.stream(story, Sampling(max_tokens=400, temperature=0.8, seed=3))):
            got.append(piece)
            if i == 4:
                threading.Thread(target=b.cancel).start()
        assert b.stats.stop == "cancelled"
        assert b.stats.gen_tokens <= 8
        # the conversation can go on after a cancel
        assert "".join(b.stream(FRANCE, Sampling(max_tokens=24, temperature=0)))
    finally:
        b.close()


def test_system_prompt_is_folded_when_the_template_rejects_it(tiny_gguf):
    r = run_cli("run", str(tiny_gguf("Q4_K_M")), "Hello", "--system", "Be brief.", "--print-prompt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "<s>[INST] Be brief.\n\nHello [/INST]"


def test_run_streams_only_the_reply_on_stdout(smol):
    r = run_cli("run", str(smol), "What is the capital of France?", "--temperature", "0", "--max-tokens", "32", "--ctx", "1024")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "llama" not in r.stdout.lower() and r.stdout.endswith("\n")
    r = run_cli("run", str(smol), "Hi", "--max-tokens", "8", "--ctx", "1024", "--verbose", "--seed", "1")
    assert r.returncode == 0, r.stderr
    for key in ("plan: CPU only", "prompt eval rate:", "eval rate:", "time to first token:", "context:"):
        assert key in r.stderr


def test_plan_json_and_llama_args(smol):
    r = run_cli("plan", str(smol), "--vram", "0.9G", "--ram", "8G", "--json", "--ctx", "2048")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("model", "machine", "budget", "ctx", "kv_type", "n_gpu_layers", "vram", "ram", "predicted", "layers", "cpu_experts", "llama_args"):
        assert key in d
    assert sum(d["vram"].values()) <= 0.9 * GiB
    assert d["layers"][0]["experts"] == {"gate": "cpu", "up": "cpu", "down": "cpu"}
    args = run_cli("plan", str(smol), "--vram", "0.9G", "--ram", "8G", "--ctx", "2048", "--llama-args").stdout.split()
    assert args[:2] == ["-ngl", "31"] and args.count("-ot") == 3
    table = run_cli("plan", str(smol), "--vram", "0.9G", "--ctx", "2048")
    assert table.returncode == 0 and "Placement" in table.stdout and "Predicted: decode" in table.stdout


def test_plan_that_does_not_fit_says_so(smol):
    r = run_cli("plan", str(smol), "--vram", "0", "--ram", "100M")
    assert r.returncode == 1 and "does not fit" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bench_reports_predicted_beside_measured(smol):
    r = run_cli("bench", str(smol), "--vram", "0.9G", "--ctx", "512", "--prompt-tokens", "64", "--gen-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [x["config"] for x in rows][0] == "auto" and len(rows) >= 2
    assert rows[1]["config"] in ("all experts on CPU",) or rows[1]["config"].startswith("--n-cpu-moe")
    for x in rows:
        assert x["decode_measured"] > 0 and x["prefill_measured"] > 0 and x["decode_predicted"] > 0


def test_bad_model_files(tmp_path, smol):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smol.read_bytes()[: 50 << 20])
    for path, expect in ((tmp_path / "missing.gguf", "no such model file"), (fake, "not a GGUF file"), (truncated, "truncated")):
        r = run_cli("run", str(path), "hi")
        assert r.returncode == 1, r.stderr
        assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

"""`plan` shows the batch sizes, the thread choice and what each context costs; `--ubatch` overrides the plan's
micro-batch on every command that plans; `bench` gives predicted prefill and decode beside measured."""

import json

import pytest

from tests.support.cli import one_line_error, run_cli


def test_plan_shows_batches_threads_and_context_against_speed(smol):
    r = run_cli("plan", str(smol), "--vram", "0.9G", "--ram", "8G", "--ctx", "2048", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "Batches: " in text and " per micro-batch" in text
    assert "thread" in text.split("Machine:")[1].split("\n")[0]  # hardware.auto_threads().describe()
    assert "Context against speed" in text and "f16 KV" in text and "q4_0 KV" in text
    assert "chat and serve default to " in text
    assert "4096 " in text and "8192 " in text  # the fixture's trained context is 8192
    fixed = run_cli("plan", str(smol), "--vram", "0.9G", "--ubatch", "256", "--threads", "1", env={"COLUMNS": "200"})
    assert fixed.returncode == 0, fixed.stderr
    assert "256 per micro-batch (--ubatch)" in " ".join(fixed.stdout.split())
    assert "1 thread" in fixed.stdout


def test_plan_json_has_batches_and_the_context_table(smol):
    r = run_cli("plan", str(smol), "--vram", "0.9G", "--ram", "8G", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n_ubatch"] in (512, 1024, 2048, 4096) and d["n_batch"] == d["n_ubatch"]
    assert {(x["ctx"], x["kv_type"]) for x in d["contexts"]} == {(c, kv) for c in (4096, 8192) for kv in ("f16", "q8_0", "q4_0")}
    assert all(x["decode_tps"] is None or x["decode_tps"] > 0 for x in d["contexts"])
    assert d["default_ctx"] in (4096, 8192)
    assert d["predicted"]["prefill_4096_tps"] > 0
    assert d["vram"]["compute"] > 0 and sum(d["vram"].values()) <= 0.9 * 1024**3
    over = json.loads(run_cli("plan", str(smol), "--vram", "0.9G", "--ram", "8G", "--ubatch", "2048", "--json").stdout)
    assert over["n_ubatch"] == 2048 and sum(over["vram"].values()) <= 0.9 * 1024**3  # its buffer counted in the budget
    cpu = json.loads(run_cli("plan", str(smol), "--vram", "0", "--json").stdout)
    assert cpu["n_ubatch"] == 512 and cpu["default_ctx"] == 8192  # CPU only: the KV cache displaces nothing


@pytest.mark.parametrize("command", ["plan", "run", "bench", "serve", "chat"])
def test_bad_ubatch_is_one_line(smol, command):
    for bad, said in (("0", "--ubatch: 0 is out of range"), ("many", "--ubatch: not a micro-batch size"),
                      ("99999999", "is out of range")):
        assert one_line_error(run_cli(command, str(smol), "--ubatch", bad), said, code=2), (command, bad)


def test_bench_gives_predicted_prefill_and_decode(smol):
    r = run_cli("bench", str(smol), "--vram", "0", "--ctx", "512", "--prompt-tokens", "64", "--gen-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["prompt_tokens"] == 64 and d["gen_tokens"] == 4
    (row,) = d["results"]
    for key in ("predicted_prefill_tps", "measured_prefill_tps", "predicted_decode_tps", "measured_decode_tps"):
        assert row[key] > 0, key
    assert row["n_ubatch"] == 512
    table = run_cli("bench", str(smol), "--vram", "0", "--ctx", "512", "--prompt-tokens", "32", "--gen-tokens", "4",
                    "--ubatch", "32", env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "32-token prompt" in table.stdout and " 32 " in table.stdout

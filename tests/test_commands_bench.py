"""`localmix bench`: measured speeds of the auto plan beside llama.cpp's usual whole-layer splits."""

import json

from tests.support.cli import one_line_error, run_cli


def test_bench_reports_predicted_beside_measured(smol):
    r = run_cli("bench", str(smol), "--vram", "0.9G", "--ctx", "512", "--prompt-tokens", "64", "--gen-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    rows = d["results"]
    assert rows[0]["config"] == "auto" and len(rows) >= 2 and d["ctx"] == 512
    assert rows[1]["config"] == "all experts on CPU" or rows[1]["config"].startswith("--n-cpu-moe")
    for x in rows:
        assert x["decode_measured"] > 0 and x["prefill_measured"] > 0 and x["decode_predicted"] > 0
    assert rows[0]["cpu_expert_tensors"] < rows[1]["cpu_expert_tensors"]  # auto keeps more experts on the card
    table = run_cli("bench", str(smol), "--vram", "0", "--ctx", "512", "--prompt-tokens", "32", "--gen-tokens", "4",
                    "--ram-bandwidth", "80GB/s")
    assert table.returncode == 0 and "auto" in table.stdout and "predicted" in table.stdout
    assert "Predicted for RAM at 80 GB/s (--ram-bandwidth), measured on this machine." in " ".join(table.stdout.split())


def test_bench_flag_errors(smol):
    assert one_line_error(run_cli("bench", str(smol), "--gen-tokens", "0"), "--gen-tokens: 0 is out of range", code=2)
    assert one_line_error(run_cli("bench", str(smol), "--ctx", "16", "--gen-tokens", "32"), "leaves no room")
    assert one_line_error(run_cli("bench", str(smol), "--ram-bandwidth", "fast"), "--ram-bandwidth: not a memory bandwidth", code=2)

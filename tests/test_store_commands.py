"""The model store from the command line: list, info, rm, and store names in place of paths."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture
def store(tiny_gguf, upcycled_gguf):
    models = Path(os.environ["LOCALMIX_HOME"]) / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(upcycled_gguf("Q4_K_M"), models / "smollm2-moe-Q4_K_M.gguf")
    os.symlink(tiny_gguf("Q4_K_M"), models / "tiny-mixtral-Q4_K_M.gguf")  # as pull links the HF cache
    (models / "cut.gguf").write_bytes(upcycled_gguf("Q4_K_M").read_bytes()[: 10 << 20])
    return models


def test_list(store):
    r = run_cli("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert set(rows) == {"smollm2-moe-Q4_K_M", "tiny-mixtral-Q4_K_M", "cut"}
    s = rows["smollm2-moe-Q4_K_M"]
    assert (s["type"], s["experts"], s["experts_used"], s["context"]) == ("Q4_K_M", 8, 2, 8192)
    assert 0.6e9 < s["parameters"] < 0.8e9 and s["bytes"] > 400e6
    assert rows["cut"]["error"] and "truncated" in rows["cut"]["error"]
    table = run_cli("list")
    assert table.returncode == 0 and "smollm2-moe-Q4_K_M" in table.stdout and "broken" in table.stdout


def test_info(store):
    r = run_cli("info", "smollm2-moe-Q4_K_M", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["experts"] == 8 and d["layers"] == 30 and d["tokenizer"] == "gpt2"
    assert abs(sum(v["share"] for v in d["tensor_types"].values()) - 1) < 1e-9 and "Q5_0" in d["tensor_types"]
    assert "<|im_start|>" in d["chat_template"] and d["tools"] == "JSON protocol (localmix)"
    assert "predicted" in d["this_machine"]
    v3 = json.loads(run_cli("info", "tiny", "--json").stdout)  # a unique prefix is enough
    assert v3["tools"].startswith("native")
    text = run_cli("info", "smollm2-moe-Q4_K_M")
    assert text.returncode == 0 and "Tensor types" in text.stdout and "this machine" in text.stdout


def test_names_work_wherever_a_model_is_taken(store):
    r = run_cli("run", "smollm2-moe-Q4_K_M", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24", "--ctx", "1024")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert run_cli("plan", "smollm2", "--json").returncode == 0
    r = run_cli("run", "nosuchmodel", "hi")
    assert r.returncode == 1 and "no model 'nosuchmodel'" in r.stderr and "smollm2-moe-Q4_K_M" in r.stderr
    r = run_cli("run", "cut", "hi")
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_rm_asks_first(store, tiny_gguf):
    r = run_cli("rm", "smollm2-moe-Q4_K_M", stdin=subprocess_devnull())
    assert r.returncode == 1 and "--yes" in r.stderr and (store / "smollm2-moe-Q4_K_M.gguf").exists()
    r = run_cli("rm", "smollm2-moe-Q4_K_M", "--yes")
    assert r.returncode == 0 and not (store / "smollm2-moe-Q4_K_M.gguf").exists()
    r = run_cli("rm", "tiny-mixtral-Q4_K_M", "--yes")  # a link: the linked file stays
    assert r.returncode == 0 and tiny_gguf("Q4_K_M").exists()
    r = run_cli("rm", "ghost", "--yes")
    assert r.returncode == 1 and "no model 'ghost'" in r.stderr


def subprocess_devnull():
    import subprocess

    return subprocess.DEVNULL


@pytest.mark.parametrize("damage, expect", [
    (lambda b: b"GGUF" + (9).to_bytes(4, "little") + b[8:], "unsupported GGUF version 9"),
    (lambda b: b[:8] + (2**40).to_bytes(8, "little") + b[16:], "corrupt GGUF header"),
    (lambda b: b[:200], "truncated or corrupt GGUF header"),
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
])
def test_damaged_gguf_files_are_refused_before_llama_cpp(tmp_path, tiny_gguf, damage, expect):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(tiny_gguf("Q4_K_M").read_bytes()))
    for cmd in (("info", str(bad)), ("run", str(bad), "hi"), ("plan", str(bad))):
        r = run_cli(*cmd)
        assert r.returncode == 1 and expect in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)

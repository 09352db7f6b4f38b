"""The model store from the command line: list, info, rm, and store names in place of paths."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import one_line_error, run_cli


@pytest.fixture
def store(tiny_gguf, smol, tiny_split):
    models = Path(os.environ["LOCALMIX_HOME"]) / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(smol, models / "smollm2-moe-Q4_K_M.gguf")
    os.symlink(tiny_gguf("Q4_K_M"), models / "tiny-mixtral-Q4_K_M.gguf")  # as pull links the HF cache
    for p in tiny_split:
        shutil.copy(p, models / p.name.replace("tiny-mixtral", "split"))
    shutil.copy(tiny_split[0], models / "half-00001-of-00002.gguf")  # part 2 missing
    (models / "cut.gguf").write_bytes(smol.read_bytes()[: 10 << 20])
    return models


def test_list(store):
    r = run_cli("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert set(rows) == {"smollm2-moe-Q4_K_M", "tiny-mixtral-Q4_K_M", "split-Q4_K_M", "half", "cut"}
    s = rows["smollm2-moe-Q4_K_M"]
    assert (s["type"], s["experts"], s["experts_used"], s["context"], s["files"]) == ("Q4_K_M", 8, 2, 8192, 1)
    assert 0.6e9 < s["parameters"] < 0.8e9 and s["bytes"] > 400e6 and s["error"] is None
    split = rows["split-Q4_K_M"]
    assert split["files"] == 2 and split["error"] is None and split["parameters"] == rows["tiny-mixtral-Q4_K_M"]["parameters"]
    assert "truncated" in rows["cut"]["error"] and "part 2 of 2" in rows["half"]["error"] and rows["half"]["parameters"] == 0
    table = run_cli("list")
    assert table.returncode == 0 and "smollm2-moe-Q4_K_M" in table.stdout and "broken" in table.stdout


def test_info(store):
    r = run_cli("info", "smollm2-moe-Q4_K_M", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["experts"] == 8 and d["layers"] == 30 and d["tokenizer"] == "gpt2" and len(d["files"]) == 1
    assert abs(sum(v["share"] for v in d["tensor_types"].values()) - 1) < 1e-9 and "Q5_0" in d["tensor_types"]
    assert "<|im_start|>" in d["chat_template"] and d["tools"] == "JSON protocol (localmix)"
    assert "predicted" in d["this_machine"]
    v3 = json.loads(run_cli("info", "tiny", "--json").stdout)  # a unique prefix is enough
    assert v3["tools"].startswith("native")
    split = json.loads(run_cli("info", "split-Q4_K_M", "--json").stdout)
    assert len(split["files"]) == 2 and split["bytes"] == v3["bytes"]
    text = run_cli("info", "split-Q4_K_M")
    assert text.returncode == 0 and "Tensor types" in text.stdout and "1 more parts" in " ".join(text.stdout.split())


def test_names_work_wherever_a_model_is_taken(store):
    r = run_cli("run", "smollm2-moe-Q4_K_M", "Hi", "--max-tokens", "4", "--ctx", "1024")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert run_cli("plan", "smollm2", "--json").returncode == 0
    r = run_cli("run", "nosuchmodel", "hi")
    assert one_line_error(r, "no model 'nosuchmodel'") and "smollm2-moe-Q4_K_M" in r.stderr
    assert one_line_error(run_cli("run", "cut", "hi"), "truncated")
    assert one_line_error(run_cli("plan", "half"), "part 2 of 2 (half-00002-of-00002.gguf) is missing")


def test_rm_asks_first(store, tiny_gguf):
    r = run_cli("rm", "smollm2-moe-Q4_K_M", stdin=subprocess.DEVNULL)
    assert one_line_error(r, "--yes") and (store / "smollm2-moe-Q4_K_M.gguf").exists()
    r = run_cli("rm", "smollm2-moe-Q4_K_M", "--yes")
    assert r.returncode == 0 and not (store / "smollm2-moe-Q4_K_M.gguf").exists()
    r = run_cli("rm", "tiny-mixtral-Q4_K_M", "--yes")  # a link: the linked file stays
    assert r.returncode == 0 and tiny_gguf("Q4_K_M").exists()
    assert run_cli("rm", "split-Q4_K_M", "--yes").returncode == 0 and not list(store.glob("split-*"))
    assert run_cli("rm", "half", "--yes").returncode == 0 and not list(store.glob("half-*"))  # broken ones too
    assert one_line_error(run_cli("rm", "ghost", "--yes"), "no model 'ghost'")


@pytest.mark.parametrize("damage, expect", [
    (lambda b: b"GGUF" + (9).to_bytes(4, "little") + b[8:], "unsupported GGUF version 9"),
    (lambda b: b[:8] + (2**40).to_bytes(8, "little") + b[16:], "corrupt GGUF header"),
    (lambda b: b[:200], "truncated or corrupt GGUF header"),
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
])
def test_damaged_gguf_files_are_refused_before_llama_cpp(tmp_path, tiny_gguf, damage, expect):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(tiny_gguf("Q4_K_M").read_bytes()))
    for cmd in (("info", str(bad)), ("run", str(bad), "hi"), ("plan", str(bad)), ("bench", str(bad))):
        assert one_line_error(run_cli(*cmd), expect), cmd


def test_missing_and_foreign_parts_are_refused_with_one_line(tiny_split, tmp_path):
    shutil.copy(tiny_split[0], tmp_path / tiny_split[0].name)
    for cmd in ("info", "plan", "run"):
        args = (cmd, str(tmp_path / tiny_split[0].name)) + (("hi",) if cmd == "run" else ())
        assert one_line_error(run_cli(*args), "part 2 of 2"), cmd
    (tmp_path / tiny_split[1].name).write_bytes(tiny_split[0].read_bytes())  # part 1 again, named part 2
    assert one_line_error(run_cli("plan", str(tmp_path / tiny_split[0].name)), "not part 2 of this model")

"""The model store from the command line: list, info, rm, and store names in place of paths."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fuzz.harness import Case, Harness, failures
from tests.fuzz.store import ENV, cases, check
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
    assert re.search("truncated|more than the file", rows["cut"]["error"])
    assert "part 2 of 2" in rows["half"]["error"] and rows["half"]["parameters"] == 0
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
    r = run_cli("run", "cut", "hi")
    assert one_line_error(r, "cut: ") and re.search("truncated|more than the file", r.stderr)
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


def _store() -> Path:
    models = Path(os.environ["LOCALMIX_HOME"]) / "models"
    models.mkdir(parents=True, exist_ok=True)
    return models


def test_rm_never_removes_another_model(tiny_gguf):
    """Seen: `rm mixtral-Q4_K_M --yes` removed Mixtral-Q4_K_M.gguf, the first of two matches by case."""
    models = _store()
    for name in ("Mixtral-Q4_K_M", "mixtral-q4_k_m"):
        os.link(tiny_gguf("Q4_K_M"), models / f"{name}.gguf")
    r = run_cli("rm", "mixtral-Q4_K_M", "--yes")
    assert one_line_error(r, "'mixtral-Q4_K_M' matches several models only by case: Mixtral-Q4_K_M, mixtral-q4_k_m")
    assert (models / "Mixtral-Q4_K_M.gguf").exists() and (models / "mixtral-q4_k_m.gguf").exists()
    assert one_line_error(run_cli("info", "mixtral-Q4_K_M"), "matches several models only by case")
    r = run_cli("rm", "Mixtral-Q4_K_M", stdin=subprocess.DEVNULL)  # asks, and shows what it would remove first
    assert one_line_error(r, "--yes") and f"  {models / 'Mixtral-Q4_K_M.gguf'}\n" in r.stdout
    r = run_cli("rm", "mixtral-q4_k_m", "--yes")
    assert r.returncode == 0 and f"  {models / 'mixtral-q4_k_m.gguf'}\n" in r.stdout, r.stderr
    assert not (models / "mixtral-q4_k_m.gguf").exists() and (models / "Mixtral-Q4_K_M.gguf").exists()


def test_broken_entries_from_the_command_line(tiny_gguf, tmp_path):
    """A link whose Hugging Face blob was deleted, link loops, folders and an escape-laden name: listed as
    broken, one line from info/run/plan, removable by rm (a folder with files in it is refused)."""
    models = _store()
    blob = tmp_path / "blob"
    shutil.copy(tiny_gguf("Q4_K_M"), blob)
    os.symlink(blob, models / "linked.gguf")
    blob.unlink()
    os.symlink("loop-b.gguf", models / "loop-a.gguf")
    os.symlink("loop-a.gguf", models / "loop-b.gguf")
    (models / "full.gguf").mkdir()
    (models / "full.gguf" / "notes.txt").write_text("the user's")
    (models / "empty.gguf").mkdir()
    evil = "evil\x1b]0;t\x07[red]x[/INST]".replace("/", "")
    (models / f"{evil}.gguf").write_bytes(b"GGUF" + bytes(20))
    os.link(tiny_gguf("Q4_K_M"), models / "good.gguf")
    home = str(models.parent)
    with Harness(env={"LOCALMIX_HOME": home}) as h:
        read = h.run([Case(["list"], home), Case(["list", "--json"], home), Case(["info", "linked"], home),
                      Case(["run", "loop-a", "hi"], home), Case(["plan", "full"], home), Case(["info", evil], home),
                      Case(["info", "good", "--json"], home)])
        assert all(o.ok for o in read), failures(read)
        table, rows = read[0].stdout, {r["name"]: r for r in json.loads(read[1].stdout)}
        assert "\x1b" not in table and "\x07" not in table and "evil\\x1b]0;t\\x07[red]x[INST]" in table
        for line in ("linked is broken: a link to a missing file", "loop-a is broken: a link loop",
                     "full is broken: a folder, not a GGUF file", "evil\\x1b]0;t\\x07[red]x[INST] is broken: "):
            assert line in table
        assert set(rows) == {"linked", "loop-a", "loop-b", "full", "empty", evil, "good"} and rows["good"]["error"] is None
        assert [o.code for o in read[2:6]] == [1, 1, 1, 1] and "\x1b" not in read[5].stderr
        assert json.loads(read[6].stdout)["path"] == str(models / "good.gguf")
        removed = h.run([Case(["rm", name, "--yes"], home) for name in ("linked", "loop-a", "full", "empty", evil)])
    assert [o.code for o in removed] == [0, 0, 1, 0, 0] and all(o.ok for o in removed), failures(removed)
    assert "a folder with files in it" in removed[2].stderr and (models / "full.gguf" / "notes.txt").exists()
    assert sorted(os.listdir(models)) == ["full.gguf", "good.gguf", "loop-b.gguf"]  # nothing else was touched


def test_hostile_stores_fuzz(tiny_gguf, tmp_path):
    """Seeded hostile stores × list, info, run, rm, pull (tests/fuzz/store.py): every case ends in success or
    one line, and no other model's file is touched."""
    batch = cases(seed=10, n=240, workdir=tmp_path, model=tiny_gguf("Q4_K_M"))
    with Harness(env=ENV) as h:
        outcomes = h.run(batch)
    problems = [p for o in outcomes for p in check(o)]
    assert not problems, f"{len(problems)} problems in {len(batch)} cases:\n" + "\n".join(problems[:30])


def test_info_shows_the_routing_heat_table(tmp_path):
    from localmix.commands.info import shares, skew
    from tests.support.ggufs import ARR, KV, U64, base_model, write

    m = base_model()
    counts = [700, 500, 400, 400, 1000, 600, 300, 100]
    m.kv += [KV("localmix.routing.tokens", U64, 1000), KV("localmix.routing.expert_counts", ARR, counts, U64)]
    path = write(m, tmp_path / "routed.gguf")
    d = json.loads(run_cli("info", str(path), "--json").stdout)
    assert d["routing"] == {"tokens": 1000, "expert_counts": [[700, 500, 400, 400], [1000, 600, 300, 100]]}
    assert shares([1000, 600, 300, 100]) == [0.5, 0.3, 0.15, 0.05] and skew([1000, 600, 300, 100]) == 2.0
    text = run_cli("info", str(path))
    assert text.returncode == 0, text.stderr
    assert "Expert routing" in text.stdout and "1,000 tokens" in text.stdout
    rows = [line for line in text.stdout.splitlines() if "2.00x" in line]
    assert len(rows) == 1 and "50.0%" in rows[0] and "5.0%" in rows[0]
    assert "Expert routing" not in run_cli("info", str(write(base_model(), tmp_path / "plain.gguf"))).stdout

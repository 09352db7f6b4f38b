"""`localmix eval` as a user runs it: the KLD of a quant of the upcycled SmolLM2 against its Q8_0,
checked against the statistic from llama.cpp's full float logits; the reference computed once and
reused for another quant; Ctrl-C while the reference is computed leaves no cache; every bad input one
line and exit status 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from localmix import evaluate as ev
from quantize.texts import eval_text
from tests.support.cli import one_line_error, run_cli
from tests.support.llm import full_log_probs


def eval_json(*args: str) -> dict:
    r = run_cli("eval", *map(str, args), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cache_folder() -> Path:
    return Path(os.environ["LOCALMIX_HOME"]) / "cache" / "eval"


def test_kld_of_a_quant_against_its_q8_and_the_cache_reused(upcycled_gguf, smol):
    """Q4_0 against Q8_0 on the real (upcycled) SmolLM2: the mean KLD within 1% of the one from llama.cpp's
    full float logits on the same tokens. Then Q4_K_M against the same Q8_0: the reference's log-probs come
    from the cache file, untouched, and Q4_K_M drifts less than Q4_0 (0.04 against 0.21 here)."""
    ref, q4 = upcycled_gguf("Q8_0"), upcycled_gguf("Q4_0")
    a = eval_json(q4, "--reference", ref, "--ctx", 128, "--chunks", 4)
    cache = Path(a["cache"]["path"])
    assert not a["cache"]["reused"] and cache.parent == cache_folder()
    assert a["positions"] == 4 * 63 and a["ctx"] == 128 and a["chunks"] == 4
    assert a["model"]["path"] == str(q4) and a["model"]["parameters"] > 100e6
    assert a["reference"] == {"kind": "gguf", "path": str(ref), "given": str(ref)}
    assert set(a["kld"]) == {"mean", "uncertainty", "median", "p99", "max", "percentiles"}
    assert set(a["ppl"]) >= {"model", "model_uncertainty", "reference", "reference_uncertainty"}
    assert set(a["delta_p"]) >= {"rms", "rms_uncertainty"} and 0 < a["same_top1"] <= 1

    c = ev.read_cache(cache, ev.read_cache_key(cache))
    bos = c.meta["key"]["bos"]
    p, q = full_log_probs(ref, c.tokens, bos), full_log_probs(q4, c.tokens, bos)
    exact = np.concatenate([(np.exp(x) * (x - y)).sum(axis=1) for x, y in zip(p, q)])
    assert a["kld"]["mean"] > 0.001
    assert a["kld"]["mean"] == pytest.approx(exact.mean(), rel=0.01)
    assert a["kld"]["median"] == pytest.approx(np.median(exact), rel=0.02)

    before = cache.stat()
    b = eval_json(smol, "--reference", ref, "--ctx", 128, "--chunks", 4)
    after = cache.stat()
    assert b["cache"] == {"path": str(cache), "reused": True} and b["seconds"]["reference"] == 0
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [f.name for f in cache_folder().iterdir()] == [cache.name]
    assert b["ppl"]["reference"] == pytest.approx(a["ppl"]["reference"], rel=1e-9)
    assert b["kld"]["mean"] < a["kld"]["mean"]


def test_table_on_stdout(tiny_gguf):
    q4 = tiny_gguf("Q4_0")
    r = run_cli("eval", str(q4), "--reference", str(q4), "--ctx", "64", "--chunks", "2")
    assert r.returncode == 0, r.stderr
    for row in ("mean KLD", "median KLD", "99% KLD", "same top token", "RMS Δp", "PPL (model)", "PPL (reference)"):
        assert row in r.stdout
    assert "100.000 ± 0.000 %" in r.stdout  # against itself: the same top token everywhere


def test_ctrl_c_while_the_reference_is_computed_leaves_no_cache(tiny_gguf, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(eval_text() * 4)
    q4 = tiny_gguf("Q4_0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmix", "eval", str(q4), "--reference", str(tiny_gguf("BF16")), "--text", str(text),
         "--ctx", "256", "--chunks", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the cache is really being written
        partial = [p for p in cache_folder().glob(".*.partial")] if cache_folder().is_dir() else []
        if partial and partial[0].stat().st_size > 4 << 20:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the reference cache was never written")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(cache_folder().iterdir()) == []


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "short.txt").write_text("Only a few words.")
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    return d


def test_one_line_errors(tiny_gguf, upcycled_gguf, texts, tmp_path):
    q4 = str(tiny_gguf("Q4_0"))
    cases = [
        (("eval", q4, "--reference", str(upcycled_gguf("Q8_0"))), "different vocabularies"),
        (("eval", q4, "--reference", q4, "--text", str(texts / "short.txt")), "shorter than one chunk of --ctx 512"),
        (("eval", q4, "--reference", q4, "--ctx", "8192"), "longer than"),
        (("eval", q4, "--reference", q4, "--text", str(tmp_path / "missing.txt")), "cannot read --text"),
        (("eval", q4, "--reference", q4, "--text", str(texts / "latin1.txt")), "not UTF-8"),
        (("eval", str(tmp_path / "missing.gguf"), "--reference", q4), "missing.gguf"),
        (("eval", q4, "--reference", str(tmp_path / "missing.gguf")), "missing.gguf"),
        (("eval", q4, "--reference", str(texts / "short.txt")), "short.txt"),
    ]
    for argv, expect in cases:
        r = run_cli(*argv)
        assert one_line_error(r, expect), (argv, r.returncode, r.stderr)
    assert not [p for p in cache_folder().iterdir()] if cache_folder().is_dir() else True


def test_checkpoint_reference_without_torch_is_one_line(tiny, tiny_gguf, tmp_path):
    """torch is the optional `calibrate` extra: without it, a checkpoint reference is refused in one line
    naming it (a `torch` that cannot be imported stands in for a missing one)."""
    (tmp_path / "torch.py").write_text("raise ImportError('No module named torch', name='torch')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = run_cli("eval", str(tiny_gguf("Q4_0")), "--reference", str(tiny), "--ctx", "64", "--chunks", "1", env=env)
    assert one_line_error(r, "calibrate"), r.stderr


def test_reference_by_hub_repo_id_is_the_checkpoint(tiny, tiny_gguf):
    """REF as a hub repo id (no :QUANT) is the Hugging Face checkpoint, fetched as quantize fetches it and
    run in torch."""
    pytest.importorskip("torch")
    from tests.support.fake_hub import FakeHub

    with FakeHub() as h:
        h.add("acme/tiny-mixtral", {p.name: p for p in sorted(tiny.iterdir()) if p.is_file()})
        env = {"HF_ENDPOINT": h.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        r = run_cli("eval", str(tiny_gguf("BF16")), "--reference", "acme/tiny-mixtral", "--ctx", "64", "--chunks", "2",
                    "--json", env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["reference"]["kind"] == "checkpoint" and d["reference"]["given"] == "acme/tiny-mixtral"
    assert d["kld"]["mean"] < 0.01 and d["positions"] == 2 * 31  # the BF16 GGUF of that very checkpoint

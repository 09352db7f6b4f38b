"""localmix.evaluate on real GGUFs through llama.cpp: a model against itself, the KLD against the one
computed directly from llama.cpp's full float logits, a checkpoint reference (torch) against its BF16
GGUF, and the cache file (llama.cpp's base-file layout, whole or absent)."""

from __future__ import annotations

import math
import os
import struct
import subprocess

import numpy as np
import pytest

from localmix import evaluate as ev
from localmix import quality
from localmix.errors import LocalmixError
from quantize.texts import eval_text
from tests.support.llm import full_log_probs


def gguf(path) -> ev.Reference:
    return ev.Reference("gguf", path, str(path))


def direct_kld(model, reference, cache: ev.Cache, bos: int | None) -> float:
    """Mean KL(reference || model) from full float logits, over the cache's tokens."""
    p, q = full_log_probs(reference, cache.tokens, bos), full_log_probs(model, cache.tokens, bos)
    return float(np.mean(np.concatenate([(np.exp(a) * (a - b)).sum(axis=1) for a, b in zip(p, q)])))


def test_a_model_against_itself(tiny_gguf):
    q4 = tiny_gguf("Q4_0")
    r = ev.evaluate(q4, gguf(q4), eval_text(), ctx=128, chunks=3)
    s = r.summary
    assert s.count == 3 * 63
    assert abs(s.kld.value) < 1e-6 and s.kld_p99 < 1e-5
    assert s.same_top.value == 1.0
    assert s.rms_p_diff.value < 1e-4
    assert s.ppl.value == pytest.approx(s.ppl_ref.value, rel=1e-4)


def test_kld_agrees_with_llama_cpp_full_logits(tiny_gguf):
    """Q4_0 against BF16: the statistic through the compact cache within 1% (relative) of the one from
    llama.cpp's float logits on the same tokens."""
    q4, bf16 = tiny_gguf("Q4_0"), tiny_gguf("BF16")
    r = ev.evaluate(q4, gguf(bf16), eval_text(), ctx=256, chunks=3)
    cache = ev.read_cache(r.cache, ev.read_cache_key(r.cache))
    exact = direct_kld(q4, bf16, cache, cache.meta["key"]["bos"])
    assert r.summary.kld.value > 0.001  # a real difference to measure
    assert r.summary.kld.value == pytest.approx(exact, rel=0.01)
    assert r.summary.count == 3 * 127 and not r.cache_reused


def test_checkpoint_reference_agrees_with_its_bf16_gguf(tiny, tiny_gguf):
    """The checkpoint run in torch (float32 from its bf16 weights) and its BF16 GGUF run by llama.cpp are
    the same reference up to arithmetic: the KLD of a Q4_0 against either is close."""
    pytest.importorskip("torch")
    q4 = tiny_gguf("Q4_0")
    text = eval_text()
    from_gguf = ev.evaluate(q4, gguf(tiny_gguf("BF16")), text, ctx=128, chunks=3)
    from_ckpt = ev.evaluate(q4, ev.Reference("checkpoint", tiny, str(tiny)), text, ctx=128, chunks=3)
    assert from_ckpt.cache != from_gguf.cache
    assert from_ckpt.summary.kld.value == pytest.approx(from_gguf.summary.kld.value, rel=0.03)  # 0.3% here
    assert from_ckpt.summary.ppl_ref.value == pytest.approx(from_gguf.summary.ppl_ref.value, rel=0.01)
    # the BF16 GGUF against the checkpoint itself: next to nothing (1e-4 here, against Q4_0's 0.06), and
    # the checkpoint's log-probabilities come from the cache (same reference, same tokens)
    bf16 = ev.evaluate(tiny_gguf("BF16"), ev.Reference("checkpoint", tiny, str(tiny)), text, ctx=128, chunks=3)
    assert bf16.cache_reused and bf16.cache == from_ckpt.cache
    assert bf16.summary.kld.value < 0.02 * from_ckpt.summary.kld.value


def test_cache_is_llama_cpps_base_file_plus_a_trailer(tiny_gguf):
    q4 = tiny_gguf("Q4_0")
    r = ev.evaluate(q4, gguf(q4), eval_text(), ctx=64, chunks=2)
    data = r.cache.read_bytes()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", data[8:20])
    assert (n_ctx, n_chunk) == (64, 2)
    rows_at = 20 + 4 * n_ctx * n_chunk
    rows_end = rows_at + 2 * n_chunk * (n_ctx - 1 - n_ctx // 2) * quality.row_width(n_vocab)
    assert data.endswith(ev.TRAILER)
    (n_meta,) = struct.unpack("<Q", data[-len(ev.TRAILER) - 8:-len(ev.TRAILER)])
    assert rows_end + n_meta + 8 + len(ev.TRAILER) == len(data)
    tokens = np.frombuffer(data[20:rows_at], "<i4").reshape(n_chunk, n_ctx)
    cache = ev.read_cache(r.cache, ev.read_cache_key(r.cache))
    assert np.array_equal(cache.tokens, tokens)
    assert cache.meta["key"]["ctx"] == 64 and cache.meta["reference"] == str(q4)


def test_damaged_or_foreign_cache_is_not_used(tmp_path, tiny_gguf):
    q4 = tiny_gguf("Q4_0")
    r = ev.evaluate(q4, gguf(q4), eval_text(), ctx=64, chunks=2)
    key = ev.read_cache_key(r.cache)
    assert ev.read_cache(r.cache, {**key, "ctx": 128}) is None
    cut = tmp_path / "cut.logprobs"
    cut.write_bytes(r.cache.read_bytes()[:-100])
    assert ev.read_cache(cut, key) is None
    assert ev.read_cache(tmp_path / "none.logprobs", key) is None


def test_an_interrupted_write_leaves_nothing(tmp_path):
    def rows():
        yield np.zeros((3, quality.row_width(10)), np.uint16)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ev.write_cache(tmp_path / "x.logprobs", np.zeros((1, 8), np.int32), 10, {"key": {}}, rows())
    assert os.listdir(tmp_path) == []


def test_partial_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its PID no longer runs
    stale = ev.partial_name(tmp_path / "a.logprobs", dead.pid)
    mine = ev.partial_name(tmp_path / "b.logprobs")
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    ev.remove_stale_partials(tmp_path)
    assert not stale.exists() and mine.exists()


def test_text_shorter_than_one_chunk(tiny_gguf):
    q4 = tiny_gguf("Q4_0")
    with pytest.raises(LocalmixError, match="shorter than one chunk of --ctx 512"):
        ev.evaluate(q4, gguf(q4), "only a few words", ctx=512, chunks=1)


def test_chunks_and_scored_positions():
    tokens = list(range(1000))
    c = ev.chunked(tokens, 128, 20)
    assert c.shape == (7, 128) and c[1, 0] == 128
    assert ev.first_scored(128) == 64 and ev.n_scored(128) == 63  # positions 64..126, each against the next token
    assert ev.model_input(c[1], 1) == [1, *range(129, 256)] and ev.model_input(c[1], None)[0] == 128
    assert math.isclose(ev.n_scored(512), 255)


@pytest.mark.llama_tools
def test_llama_perplexity_reads_the_cache_as_its_base_file(tiny_gguf):
    """The cache is llama.cpp's own --kl-divergence-base file: llama-perplexity reads it and reports the
    reference's perplexity exactly as we do (the same uint16 data), and a KLD of the model within 2% of ours
    (its build's kernels give slightly different logits than llama-cpp-python's)."""
    import re

    from tests.support.llama_tools import run_tool

    q4 = tiny_gguf("Q4_0")
    r = ev.evaluate(q4, gguf(tiny_gguf("BF16")), eval_text(), ctx=128, chunks=4)
    for _ in range(2):  # once, a loaded CI machine got a log without the statistics (llama.cpp logs from a thread)
        out = run_tool("llama-perplexity", "-m", q4, "--kl-divergence-base", r.cache, "--kl-divergence", "-c", 128,
                       "-b", 128, "-t", 2)
        assert out.returncode == 0, out.stderr[-2000:]
        log = out.stdout + out.stderr
        if "Mean PPL(base)" in log:
            break

    def number(label: str) -> float:
        m = re.search(re.escape(label) + r"\s*:\s*([-0-9.]+)", log)
        assert m, f"no {label!r} in llama-perplexity's output:\n{log[-3000:]}"
        return float(m.group(1))

    assert number("Mean PPL(base)") == pytest.approx(r.summary.ppl_ref.value, rel=1e-5)
    assert number("Mean    KLD") == pytest.approx(r.summary.kld.value, rel=0.02)

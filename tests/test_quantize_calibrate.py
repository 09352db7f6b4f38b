"""quantize.forward against transformers, and quantize.calibrate (`--imatrix auto`) against llama.cpp's own
imatrix of a BF16 GGUF of the same checkpoint (collected in-process through the eval callback, as
tools/imatrix/imatrix.cpp collects it: tests/support/llama_imatrix.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.checkpoints import edit_json, linked_copy, make_tiny_mixtral
from tests.support.reference import MIXED_TEXT, hf_logits

torch = pytest.importorskip("torch")

TEXT_TOKENS = 2048  # 4 chunks of 512


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory) -> Path:
    """A dense tiny Mistral (3 layers, hidden 256), the Mixtral fixture's tokenizer."""
    return make_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-dense", dense=True, layers=3)


@pytest.fixture(scope="session")
def text() -> str:
    from quantize.texts import calibration_text

    return calibration_text()


def _ours(folder: Path, tokens: np.ndarray) -> np.ndarray:
    from quantize.forward import Forward

    with Forward(folder, device="cpu") as f:
        return f.logits(tokens).astype(np.float64)


def _assert_same_logits(folder: Path, tokens: np.ndarray) -> None:
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    ours = _ours(folder, tokens)
    for c in range(tokens.shape[0]):
        ref = hf_logits(arch, folder, tokens[c].tolist())
        assert np.abs(ours[c] - ref).max() <= 1e-4 * np.abs(ref).max(), arch


def _random_tokens(folder: Path, n_chunks: int, n_ctx: int) -> np.ndarray:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    return np.random.default_rng(0).integers(0, vocab, size=(n_chunks, n_ctx))


# ---- forward ------------------------------------------------------------------------------------------


def test_forward_matches_transformers_mixtral_dense_and_tied(tiny, tiny_dense, upcycled):
    """float32 logits within 1e-4 of the largest: Mixtral (router, experts), a dense Mistral, and the
    upcycled SmolLM2 (tied embeddings, head_dim 64 with 9 heads, 3 KV heads)."""
    for folder, n_chunks in ((tiny, 2), (tiny_dense, 2), (upcycled, 1)):  # chunks run as one batch
        _assert_same_logits(folder, _random_tokens(folder, n_chunks, 48))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
])
def test_forward_rope_scaling_matches_transformers(tiny_dense, tmp_path, scaling):
    folder = linked_copy(tiny_dense, tmp_path / "scaled")
    edit_json(folder / "config.json", rope_parameters={**scaling, "rope_theta": 10000.0})
    tokens = _random_tokens(folder, 1, 64)
    _assert_same_logits(folder, tokens)
    plain = linked_copy(tiny_dense, tmp_path / "plain")
    edit_json(plain / "config.json", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert np.abs(_ours(plain, tokens) - _ours(folder, tokens)).max() > 1e-3  # the scaling matters here


# ---- the imatrix against llama.cpp's ------------------------------------------------------------------


def _calibrator(folder: Path, text: str, tokens: int = TEXT_TOKENS, **kw):
    from quantize.calibrate import Calibrator

    return Calibrator(folder, text, max_tokens=tokens, device="cpu", **kw)


def _run_all(cal):
    """As the pass does it: weights for every blk tensor in file order, then routing and the imatrix."""
    for i in range(cal.n_layer):
        cal.weights(f"blk.{i}.attn_q.weight")
    return cal.imatrix()


@pytest.mark.parametrize("which", ["tiny", "tiny_dense"])
def test_imatrix_agrees_with_llama_cpp(which, request, tmp_path, text):
    from quantize.convert import convert
    from tests.support.llama_imatrix import llama_imatrix

    folder = request.getfixturevalue(which)
    gguf = tmp_path / "bf16.gguf"
    convert(folder, gguf, "BF16")
    chunks, theirs = llama_imatrix(gguf, text, max_chunks=TEXT_TOKENS // 512)

    cal = _calibrator(folder, text)
    assert np.array_equal(cal.tokens, chunks)  # llama.cpp's tokens, BOS at the head of every chunk
    ours = _run_all(cal)
    assert sorted(ours.entries) == sorted(theirs.sums)  # the same matrices get entries
    assert ours.chunk_count == TEXT_TOKENS // 512 and ours.chunk_size == 512
    for name, e in ours.entries.items():
        counts, sums = theirs.counts[name], theirs.sums[name]
        assert e.sums.shape == sums.shape
        # routing may differ where bf16 rounding flips a near-tie, so counts agree closely, not exactly
        assert np.abs(e.counts - counts).max() <= 0.02 * TEXT_TOKENS, name
        w_ours, w_theirs = e.sums / np.maximum(e.counts, 1)[:, None], sums / np.maximum(counts, 1)[:, None]
        assert np.corrcoef(w_ours.ravel(), w_theirs.ravel())[0, 1] >= 0.99, name
        for x in range(len(counts)):
            if counts[x] > 0 and e.counts[x] > 0:
                assert np.corrcoef(w_ours[x], w_theirs[x])[0, 1] >= 0.99, (name, x)


def test_routing_counts_sum_to_tokens_times_top_k(tiny, text):
    cal = _calibrator(tiny, text, tokens=1024 + 100)  # whole chunks only: 2 of them
    assert cal.tokens.shape == (2, 512) and cal.routing_tokens == 1024
    assert cal.routing_shape() == (4, 8)
    im = _run_all(cal)
    routing = cal.routing()
    assert routing.dtype == np.uint64 and routing.shape == (4, 8)
    assert (routing.sum(axis=1) == 1024 * 2).all()  # top-2
    for i in range(4):
        assert (im.entries[f"blk.{i}.ffn_gate_exps.weight"].counts == routing[i]).all()
        assert im.entries[f"blk.{i}.attn_q.weight"].counts.tolist() == [1024]


def test_weights_are_llama_quantizes_and_lazy(tiny, text):
    """weights() runs layers only as the pass reaches them, and gives sums/count per expert (1 for an
    expert no token reached), as llama-quantize's load_imatrix does; token_embd and output get none."""
    cal = _calibrator(tiny, text, tokens=512)
    assert cal.weights("token_embd.weight") is None and cal._done == 0
    w = cal.weights("blk.1.ffn_down_exps.weight")
    assert cal._done == 2 and w.shape == (8, 512) and w.dtype == np.float32
    e = cal._sums.entry("blk.1.ffn_down_exps.weight")
    for x in range(8):
        expect = e.sums[x] / np.float32(e.counts[x]) if e.counts[x] else np.ones(512, np.float32)
        assert np.array_equal(w[x], expect)
    assert cal.weights("output.weight") is None
    assert cal.imatrix().entries_count == 4 * 8 == cal.entries_count


def test_too_little_text_is_one_line(tiny):
    from quantize.errors import QuantizeError

    with pytest.raises(QuantizeError, match="at least 512 tokens"):
        _calibrator(tiny, "Only a few words.")
    with pytest.raises(QuantizeError, match="--calibration-tokens 100"):
        _calibrator(tiny, MIXED_TEXT * 50, tokens=100)


def test_auto_quantizes_as_its_saved_imatrix_does(tiny, tmp_path, text):
    """Quantizing with the calibration and with the imatrix file it saves gives the same tensor bytes."""
    import gguf

    from quantize.convert import convert
    from quantize.imatrix import read_imatrix, write_imatrix

    cal = _calibrator(tiny, text, tokens=1024)
    convert(tiny, tmp_path / "auto.gguf", "Q4_K_M", importance=cal)
    write_imatrix(cal.imatrix(), tmp_path / "auto.imatrix.gguf")
    convert(tiny, tmp_path / "file.gguf", "Q4_K_M", importance=read_imatrix(tmp_path / "auto.imatrix.gguf"))
    a, b = gguf.GGUFReader(tmp_path / "auto.gguf"), gguf.GGUFReader(tmp_path / "file.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), ta.name
    counts = a.fields["localmix.routing.expert_counts"].contents()
    assert sum(counts) == 1024 * 2 * 4


# ---- the command: Ctrl-C and memory -------------------------------------------------------------------


def _quantize_child(args: list[str]) -> list[str]:
    """`localmix quantize ARGS` in a child that reports its peak RSS (VmHWM) on stderr at exit."""
    code = ("import sys, runpy\nsys.argv = ['localmix', 'quantize', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_module('localmix', run_name='__main__')\nfinally:\n"
            "    print('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)\n")
    return [sys.executable, "-c", code, *args]


def test_ctrl_c_during_calibration_leaves_nothing(tiny, tmp_path):
    from quantize.texts import calibration_text

    # 64k tokens: each layer's calibration takes seconds even on a fast machine, so it is seen standing still
    text = tmp_path.parent / f"{tmp_path.name}-calibration.txt"
    text.write_text(calibration_text() * 2, encoding="utf-8")
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "quantize", str(tiny), "-o", str(out), "--imatrix", "auto",
                             "--calibration-text", str(text), "--calibration-tokens", "65536"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The output is written without a pause except while a layer is calibrated: a partial file whose size
    # stands still means the calibration is running.
    deadline, last, still = time.time() + 300, -1, 0.0
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        size = partial[0].stat().st_size if partial else -1
        if size > 0 and size == last:
            still += 0.05
            if still >= 0.5:
                break
        else:
            last, still = size, 0.0
        time.sleep(0.05)
    else:
        pytest.fail("the calibration was never seen running")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_peak_memory_of_auto_is_bounded(tiny, tmp_path):
    """Hidden states of 8192 tokens (8 MiB), one layer's weights, torch itself: well under 1 GiB."""
    out = tmp_path / "m.gguf"
    r = subprocess.run(_quantize_child([str(tiny), "-o", str(out), "--imatrix", "auto", "--calibration-tokens", "8192"]),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    peak_kib = int(r.stderr.rsplit("VmHWM", 1)[1].split()[0])
    assert peak_kib < 1 << 20, peak_kib
    assert out.is_file() and (tmp_path / "m.imatrix.gguf").is_file()

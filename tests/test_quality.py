"""localmix.quality: the KL-divergence statistics on hand-made distributions whose answers are known in
closed form, and llama.cpp's compact log-probabilities (layout, resolution, the 16-nat floor)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from localmix import quality


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


# p = (1/2, 1/4, 1/8, 1/8) against the uniform q over 4 tokens: KL(p||q) = ln 4 - H(p) = ln(2) / 4.
P = [0.5, 0.25, 0.125, 0.125]
Q = [0.25, 0.25, 0.25, 0.25]
KL_PQ = math.log(2) / 4


def test_kld_of_a_known_pair():
    pos = quality.positions(quality.log_softmax(logits_of([P])), logits_of([Q]), [0])
    assert pos.kld[0] == pytest.approx(KL_PQ, rel=1e-6)
    assert pos.nll[0] == pytest.approx(math.log(4), rel=1e-6)  # the model's -ln q(token 0)
    assert pos.nll_ref[0] == pytest.approx(math.log(2), rel=1e-6)
    assert pos.p_diff[0] == pytest.approx(0.25 - 0.5, abs=1e-6)
    assert pos.same_top[0]  # the tied uniform model's top is its first token, as the reference's


def test_logits_are_shift_invariant_and_top_is_the_first_maximum():
    """Model input may be raw logits (any offset); on a tie the first index is the top, as in llama.cpp."""
    ref = quality.log_softmax(logits_of([[0.25, 0.5, 0.125, 0.125]]))
    a = quality.positions(ref, logits_of([Q]) + 7.0, [1])
    assert a.kld[0] == pytest.approx(KL_PQ, rel=1e-6)
    assert not a.same_top[0]  # the tied uniform model's top is token 0, the reference's is token 1
    b = quality.positions(ref, np.array([[0.0, 3.0, 0.0, 0.0]], np.float32), [1])
    assert b.same_top[0]


def test_a_model_against_itself():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (300, 1000)).astype(np.float32)  # within the 16 nats the compact form resolves
    targets = rng.integers(0, 1000, 300)
    ref = quality.expand(quality.compact(logits), 1000)
    s = quality.summarize(quality.positions(quality.log_softmax(logits), logits, targets))
    assert s.kld.value == pytest.approx(0, abs=1e-6) and s.kld_p99 == pytest.approx(0, abs=1e-6)
    assert s.same_top.value == 1.0 and s.rms_p_diff.value == pytest.approx(0, abs=1e-7)
    assert s.ppl.value == pytest.approx(s.ppl_ref.value, rel=1e-6)
    # through the compact form: the same up to its resolution (16 nats / 65535 per step)
    s = quality.summarize(quality.positions(ref, logits, targets))
    assert abs(s.kld.value) < 1e-6 and s.same_top.value == 1.0
    assert s.ppl.value == pytest.approx(s.ppl_ref.value, rel=1e-4)


def test_summary_over_many_positions():
    """Mixed positions: the mean is the mean of the per-position KLDs, each from its closed form; PPL is
    exp of the mean negative log-likelihood; the percentiles interpolate linearly as llama.cpp's do."""
    rng = np.random.default_rng(1)
    n, v = 400, 50
    ref = rng.normal(0, 2, (n, v)).astype(np.float32)
    model = (ref + rng.normal(0, 0.3, (n, v))).astype(np.float32)
    targets = rng.integers(0, v, n)
    lp, lq = (quality.log_softmax(x).astype(np.float64) for x in (ref, model))
    exact = (np.exp(lp) * (lp - lq)).sum(axis=1)
    s = quality.summarize(quality.positions(lp, model, targets))
    assert s.count == n
    assert s.kld.value == pytest.approx(exact.mean(), rel=1e-5)
    assert s.kld.uncertainty == pytest.approx(exact.std() / math.sqrt(n - 1), rel=1e-4)
    assert s.kld_median == pytest.approx(np.median(exact), rel=1e-5)
    srt = np.sort(exact)
    at = 0.99 * (n - 1)
    assert s.kld_p99 == pytest.approx(srt[int(at)] + (at - int(at)) * (srt[int(at) + 1] - srt[int(at)]), rel=1e-5)
    assert s.kld_max == pytest.approx(srt[-1], rel=1e-5)
    rows = np.arange(n)
    assert s.ppl.value == pytest.approx(math.exp(-lq[rows, targets].mean()), rel=1e-5)
    assert s.ppl_ref.value == pytest.approx(math.exp(-lp[rows, targets].mean()), rel=1e-5)
    same = np.mean(lp.argmax(1) == lq.argmax(1))
    assert s.same_top.value == pytest.approx(same)
    assert s.same_top.uncertainty == pytest.approx(math.sqrt(same * (1 - same) / (n - 1)))
    dp = np.exp(lq[rows, targets]) - np.exp(lp[rows, targets])
    assert s.rms_p_diff.value == pytest.approx(math.sqrt(np.mean(dp**2)), rel=1e-4)
    d = quality.as_dict(s)
    assert d["kld"]["mean"] == s.kld.value and d["kld"]["p99"] == s.kld_p99 and d["same_top1"] == s.same_top.value
    assert d["ppl"]["model"] == s.ppl.value and d["ppl"]["reference"] == s.ppl_ref.value
    assert d["delta_p"]["rms"] == s.rms_p_diff.value and d["positions"] == n


def test_mean_uncertainty_as_llama_cpp():
    assert quality.mean(np.array([1.0, 2.0, 3.0])) == quality.Estimate(2.0, 0.0)  # 10 values or fewer: none
    x = np.arange(20, dtype=np.float64)
    assert quality.mean(x).uncertainty == pytest.approx(x.std() / math.sqrt(19))
    assert quality.mean(np.array([])) == quality.Estimate(0.0, 0.0)


def test_compact_layout_and_resolution():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 4, (5, 1001)).astype(np.float32)
    rows = quality.compact(logits)
    assert rows.dtype == np.uint16 and rows.shape == (5, quality.row_width(1001)) == (5, 1006)
    head = rows[:, :4].copy().view(np.float32)
    top = logits.max(axis=1)
    low = np.maximum(logits.min(axis=1), top - 16)
    assert np.allclose(head[:, 0], (top - low) / 65535)  # scale
    exact = quality.log_softmax(logits)
    assert np.allclose(head[:, 1], low - top + exact.max(axis=1), atol=1e-5)  # min_log_prob: the lowest resolved
    back = quality.expand(rows, 1001)
    resolved = logits > low[:, None]
    err = np.abs(back - exact)[resolved]
    assert err.max() <= head[:, 0].max() / 2 + 1e-5  # half a step
    # below the 16 nats under the top: the floor
    assert np.all(back[~resolved] <= exact.max(axis=1, keepdims=True).repeat(1001, 1)[~resolved] - 16 + 1e-4)
    assert np.all(rows[:, 4 + 1001:] == 0)  # padding


def test_compact_of_a_flat_row():
    rows = quality.compact(np.zeros((1, 8), np.float32))
    assert np.allclose(quality.expand(rows, 8), math.log(1 / 8))


def test_floor_leaves_tiny_reference_probabilities_out():
    """A reference token at e^-20 does not count towards the KLD (llama.cpp sums over p_base > e^-16 only)."""
    ref = np.array([[0.0, -20.0]], np.float32)  # log-probs, near enough (p = 1 - 2e-9)
    model = np.array([[0.0, 0.0]], np.float32)
    pos = quality.positions(ref, model, [0])
    assert pos.kld[0] == pytest.approx(0.0 - math.log(0.5), rel=1e-6)


def test_same_top_accepts_a_tie_of_the_reference():
    """Two reference entries tied at the top (as the compact form can make them): a model whose top is
    either one has the same top token."""
    ref = np.array([[-1.0, -0.5, -0.5, -3.0]], np.float32)
    for top in (1, 2):
        model = np.zeros((1, 4), np.float32)
        model[0, top] = 1.0
        assert quality.positions(ref, model, [0]).same_top[0]
    assert not quality.positions(ref, np.array([[1.0, 0, 0, 0]], np.float32), [0]).same_top[0]


def test_compared_in_blocks_is_the_same_as_at_once():
    """Chunks are compared (and compacted) a block of rows at a time; the blocks join seamlessly."""
    rng = np.random.default_rng(3)
    n, v = 2500, 1000  # three blocks
    ref = rng.normal(0, 2, (n, v)).astype(np.float32)
    model = (ref + rng.normal(0, 0.2, (n, v))).astype(np.float32)
    targets = rng.integers(0, v, n)
    assert len(quality.blocks(n, v)) == 3
    rows = quality.compact(ref)
    assert np.array_equal(rows, np.concatenate([quality.compact(ref[:1000]), quality.compact(ref[1000:])]))
    a = quality.compared(rows, v, model, targets)
    b = quality.positions(quality.expand(rows, v), model, targets)
    for name in ("kld", "nll", "nll_ref", "same_top"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name

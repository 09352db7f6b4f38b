"""How far a model's next-token distributions drift from a reference's: the statistics llama.cpp's
perplexity tool reports in its KL-divergence mode (tools/perplexity/perplexity.cpp), computed the same
way, from the same compact form of the reference's log-probabilities. Pure numpy: no model, no file.

The compact form (llama.cpp's `--kl-divergence-base` file, one row per scored position): 2 float32
(scale, min_log_prob) then one uint16 per vocabulary entry, padded to an even count; a log-probability
is `scale * q + min_log_prob`, over the 16 nats below the top one (lower ones become the floor)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

RANGE = 16.0  # nats below the top log-probability the compact form resolves
FLOOR = -16.0  # reference log-probabilities at or below it are left out of the KLD sum (as llama.cpp does)
PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)  # the ones llama.cpp prints for KLD
BLOCK = 1 << 20  # values per block of rows: temporaries stay a few MiB (fresh 50 MiB ones cost page faults each chunk)


def blocks(n: int, n_vocab: int) -> list[slice]:
    step = max(1, BLOCK // max(n_vocab, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def row_width(n_vocab: int) -> int:
    """uint16 values per position in the compact form: 4 for the two float32, the vocabulary padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _log_sum_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest logit and log(sum(exp(logit - largest))), summed in double, kept in float
    (as llama.cpp does)."""
    top = logits.max(axis=1)
    e = logits - top[:, None]
    np.exp(e, out=e)
    return top, np.log(e.sum(axis=1, dtype=np.float64)).astype(np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Rows of logits to rows of log-probabilities (float32)."""
    logits = np.asarray(logits, dtype=np.float32)
    top, lse = _log_sum_exp(logits)
    return logits - (top + lse)[:, None]


def compact(logits: np.ndarray) -> np.ndarray:
    """Rows of logits [n, n_vocab] to llama.cpp's compact log-probabilities [n, row_width] uint16, as
    llama-perplexity writes them (float32 arithmetic, rounded to nearest, ties to even)."""
    logits = np.asarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    if n > (b := blocks(n, n_vocab))[0].stop:
        return np.concatenate([compact(logits[rows]) for rows in b])
    top, lse = _log_sum_exp(logits)
    low = np.maximum(logits.min(axis=1), top - np.float32(RANGE))
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    out = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    head = out[:, :4].view(np.float32)  # two float32 per row, in the row's first four uint16
    head[:, 0] = scale
    head[:, 1] = low - top - lse
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    q = logits - low[:, None]
    q *= inv[:, None]
    np.maximum(q, 0, out=q)  # at or below the floor: 0, as llama.cpp's `logit > min_logit ? ... : 0`
    np.rint(q, out=q)
    out[:, 4:4 + n_vocab] = q
    return out


def expand(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """The compact form back to log-probabilities [n, n_vocab] float32 (as llama.cpp decodes it)."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    return head[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]


@dataclass
class Positions:
    """Per scored position: KL(reference || model), both negative log-likelihoods of the actual next
    token, and whether both put the same token on top."""

    kld: np.ndarray  # float64
    nll: np.ndarray  # model, float64
    nll_ref: np.ndarray  # reference, float64
    same_top: np.ndarray  # bool

    @property
    def p_diff(self) -> np.ndarray:
        """Change of the actual token's probability, model minus reference."""
        return np.exp(-self.nll) - np.exp(-self.nll_ref)

    def __len__(self) -> int:
        return len(self.kld)


def positions(ref_logp: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> Positions:
    """The per-position statistics from the reference's log-probabilities [n, n_vocab] (`expand`ed, or
    exact), the model's logits (or log-probabilities) [n, n_vocab] and the actual next tokens [n].
    Reference probabilities at or below e^FLOOR do not count towards the KLD, as in llama.cpp."""
    ref_logp = np.asarray(ref_logp, dtype=np.float32)
    logp = log_softmax(logits)
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(targets))
    terms = ref_logp - logp
    p = np.exp(ref_logp)
    np.putmask(p, ref_logp <= FLOOR, 0)
    terms *= p
    return Positions(
        kld=terms.sum(axis=1, dtype=np.float64),
        nll=-logp[rows, targets].astype(np.float64),
        nll_ref=-ref_logp[rows, targets].astype(np.float64),
        # The model's top token is one the reference puts on top. (llama.cpp compares with the first of the
        # reference's top entries; at the compact form's resolution two can tie, and a model against itself
        # would then not agree with itself.)
        same_top=ref_logp[rows, np.argmax(logp, axis=1)] >= ref_logp.max(axis=1),
    )


def compared(ref_rows: np.ndarray, n_vocab: int, logits: np.ndarray, targets: np.ndarray) -> Positions:
    """`positions` against the reference's compact rows [n, row_width], a block of rows at a time."""
    targets = np.asarray(targets)
    return joined([positions(expand(ref_rows[b], n_vocab), logits[b], targets[b]) for b in blocks(len(targets), n_vocab)])


def joined(parts: list[Positions]) -> Positions:
    return Positions(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Positions)))


# -- summary ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    value: float
    uncertainty: float  # one standard error


def mean(x: np.ndarray) -> Estimate:
    """Mean and its standard error, as llama.cpp's mean_and_uncertainty (none for 10 values or fewer)."""
    n = len(x)
    if n < 1:
        return Estimate(0.0, 0.0)
    m = float(np.mean(x))
    var = float(np.mean(np.square(x))) - m * m
    return Estimate(m, float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """Covariance of the two means, as llama.cpp's (0 below 10 values)."""
    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(np.mean(a)) * float(np.mean(b))) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's: linear between the two nearest ranks."""
    return float(np.percentile(sorted_values, 100 * fraction)) if len(sorted_values) else 0.0


@dataclass(frozen=True)
class Summary:
    count: int
    kld: Estimate
    kld_median: float
    kld_max: float
    kld_percentiles: dict[str, float]  # "99.9", "99.0", ... -> KLD
    same_top: Estimate  # share of positions, 0..1
    rms_p_diff: Estimate  # RMS of the change of the actual token's probability, 0..1
    mean_p_diff: Estimate
    ppl: Estimate  # the model's perplexity
    ppl_ref: Estimate  # the reference's
    ln_ppl_ratio: Estimate  # ln(PPL(model) / PPL(reference))
    ppl_correlation: float  # of ln PPL(model) and ln PPL(reference)

    @property
    def kld_p99(self) -> float:
        return self.kld_percentiles["99.0"]


def summarize(p: Positions) -> Summary:
    """llama.cpp's closing statistics over all scored positions."""
    n = len(p)
    kld_sorted = np.sort(p.kld)
    log_ppl, log_ppl_ref = mean(p.nll), mean(p.nll_ref)
    cov = covariance(p.nll, p.nll_ref)
    ppl, ppl_ref = float(np.exp(log_ppl.value)), float(np.exp(log_ppl_ref.value))
    ratio_var = log_ppl.uncertainty**2 + log_ppl_ref.uncertainty**2 - 2 * cov
    unc_product = log_ppl.uncertainty * log_ppl_ref.uncertainty
    mse = mean(np.square(p.p_diff))
    rms = float(np.sqrt(mse.value))
    same = float(np.mean(p.same_top)) if n else 0.0
    return Summary(
        count=n,
        kld=mean(p.kld),
        kld_median=float(np.median(kld_sorted)) if n else 0.0,
        kld_max=float(kld_sorted[-1]) if n else 0.0,
        kld_percentiles={f"{q:.1f}": percentile(kld_sorted, q / 100) for q in PERCENTILES},
        same_top=Estimate(same, float(np.sqrt(same * (1 - same) / (n - 1))) if n > 1 else 0.0),
        rms_p_diff=Estimate(rms, 0.5 / rms * mse.uncertainty if rms > 0 else 0.0),
        mean_p_diff=mean(p.p_diff),
        ppl=Estimate(ppl, ppl * log_ppl.uncertainty),
        ppl_ref=Estimate(ppl_ref, ppl_ref * log_ppl_ref.uncertainty),
        ln_ppl_ratio=Estimate(log_ppl.value - log_ppl_ref.value, float(np.sqrt(max(ratio_var, 0.0)))),
        ppl_correlation=cov / unc_product if unc_product > 0 else 0.0,
    )


def as_dict(s: Summary) -> dict:
    """All of it as plain JSON values, grouped as llama-perplexity prints them."""
    return {
        "positions": s.count,
        "kld": {"mean": s.kld.value, "uncertainty": s.kld.uncertainty, "median": s.kld_median, "p99": s.kld_p99,
                "max": s.kld_max, "percentiles": s.kld_percentiles},
        "same_top1": s.same_top.value, "same_top1_uncertainty": s.same_top.uncertainty,
        "delta_p": {"rms": s.rms_p_diff.value, "rms_uncertainty": s.rms_p_diff.uncertainty,
                    "mean": s.mean_p_diff.value, "mean_uncertainty": s.mean_p_diff.uncertainty},
        "ppl": {"model": s.ppl.value, "model_uncertainty": s.ppl.uncertainty,
                "reference": s.ppl_ref.value, "reference_uncertainty": s.ppl_ref.uncertainty,
                "ln_ratio": s.ln_ppl_ratio.value, "ln_ratio_uncertainty": s.ln_ppl_ratio.uncertainty,
                "correlation": s.ppl_correlation},
    }

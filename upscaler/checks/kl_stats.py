"""llama-perplexity's statistics over per-token values: perplexity, KL divergence, "same top p".

Transcribed from llama.cpp tools/perplexity/perplexity.cpp (kl_divergence()), so the figures
read exactly as `llama-perplexity --kl-divergence` prints them for the same per-token values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import SmokeError

__all__ = ["KLStatistics", "covariance", "kl_statistics", "mean_and_uncertainty", "median", "percentile",
           "perplexity_of"]


def perplexity_of(mean_nll: float, what: str) -> float:
    try:
        return math.exp(mean_nll)
    except OverflowError:
        raise SmokeError(f"{what} perplexity overflows (mean negative log-likelihood {mean_nll:.1f} nats)") from None



def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error; 0 uncertainty for 10 values or fewer (llama.cpp's rule)."""
    count = len(values)
    if count < 1:
        return 0.0, 0.0
    v = np.asarray(values, dtype=np.float64)
    f = float(v.sum()) / count
    df = float((v * v).sum()) / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """Covariance of the two means (not of the values): 0 below 10 values, as llama.cpp."""
    count = len(a)
    if count < 10:
        return 0.0
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (float((a64 * b64).sum()) / count - float(a64.sum()) / count * (float(b64.sum()) / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's interpolated percentile of float values sorted ascending (float32 arithmetic)."""
    v = np.asarray(sorted_values, dtype=np.float32)
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(len(v) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v = np.asarray(sorted_values, dtype=np.float32)
    n = len(v)
    return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


@dataclass
class KLStatistics:
    """What `llama-perplexity --kl-divergence` reports, from per-token values (Q = model, base = reference)."""

    perplexity: float
    perplexity_uncertainty: float
    reference_perplexity: float
    reference_perplexity_uncertainty: float
    perplexity_ratio: float
    perplexity_ratio_uncertainty: float
    kl_divergence: float
    kl_divergence_uncertainty: float
    kl_divergence_median: float
    kl_divergence_p99: float
    kl_divergence_max: float
    top1_agreement: float
    top1_agreement_uncertainty: float


def kl_statistics(nll_q: np.ndarray, nll_base: np.ndarray, kl: np.ndarray, same_top: np.ndarray) -> KLStatistics:
    """llama.cpp's formulas: PPL = exp(mean NLL) ± PPL·σ(mean NLL); the ratio's uncertainty
    accounts for the covariance of the two NLLs; "same top p" ± sqrt(p(1-p)/(n-1))."""
    n = len(kl)
    log_ppl = mean_and_uncertainty(nll_q)
    log_ppl_base = mean_and_uncertainty(nll_base)
    cov = covariance(nll_q, nll_base)
    ratio_log = log_ppl[0] - log_ppl_base[0]
    ratio_log_unc = math.sqrt(max(0.0, log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2.0 * cov))
    ppl = perplexity_of(log_ppl[0], "model")
    ppl_base = perplexity_of(log_ppl_base[0], "reference")
    ratio = math.exp(ratio_log)
    kld = mean_and_uncertainty(kl)
    ordered = np.sort(np.asarray(kl, dtype=np.float32))
    same = float(np.count_nonzero(same_top)) / n
    same_unc = math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0
    return KLStatistics(
        perplexity=ppl, perplexity_uncertainty=ppl * log_ppl[1],
        reference_perplexity=ppl_base, reference_perplexity_uncertainty=ppl_base * log_ppl_base[1],
        perplexity_ratio=ratio, perplexity_ratio_uncertainty=ratio * ratio_log_unc,
        kl_divergence=kld[0], kl_divergence_uncertainty=kld[1],
        kl_divergence_median=median(ordered), kl_divergence_p99=percentile(ordered, 0.99),
        kl_divergence_max=float(ordered[-1]),
        top1_agreement=same, top1_agreement_uncertainty=same_unc,
    )

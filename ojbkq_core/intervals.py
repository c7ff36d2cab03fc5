"""How sure a perplexity is: bootstrap intervals over evaluation windows and paired verdicts.

A perplexity is `exp(mean nll)` over `W` windows, where `nll_w` is window `w`'s mean negative
log-likelihood per predicted token (`perplexity.perplexity` returns them as `window_nll`). Tokens inside a
window depend on each other, so the unit resampled is the window. A draw takes `W` windows with
replacement. Fixed indices (`resample`) make the same draws reach every row of a table.

    interval(nll)           95% percentile interval of exp(mean nll) over the draws
    paired(nll_a, nll_b)    the difference d = mean(nll_a − nll_b) on the same windows (a's log perplexity
                            ratio to b), its 95% interval over the same draws, and the verdict on "a is
                            better than b": holds (the interval lies below 0), misses (above 0), or
                            within noise (it contains 0)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError

DRAWS = 2000
LEVEL = 0.95
SEED = 0
VERDICTS = ("holds", "misses", "within noise")


def resample(windows: int, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """`(draws, windows)` window indices drawn with replacement, the same for a given size and seed."""
    if windows < 1:
        raise InputError("a bootstrap needs at least one evaluation window")
    return np.random.default_rng([seed, windows]).integers(0, windows, size=(draws, windows))


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval(window_nll: Sequence[float], level: float = LEVEL, draws: int = DRAWS,
             seed: int = SEED) -> list[float]:
    """`[lo, hi]`: the `level` percentile bootstrap interval of the perplexity `exp(mean window_nll)`."""
    nll = np.asarray(window_nll, dtype=np.float64)
    means = nll[resample(nll.size, draws, seed)].mean(axis=1)
    lo, hi = _bounds(means, level)
    return [float(np.exp(lo)), float(np.exp(hi))]


def paired(nll_a: Sequence[float], nll_b: Sequence[float], level: float = LEVEL, draws: int = DRAWS,
           seed: int = SEED) -> dict:
    """The paired comparison of rows `a` and `b` scored on the same windows: `diff` = mean(nll_a − nll_b),
    its `interval` and `verdict` on "a's perplexity is below b's" (`VERDICTS`), and `ratio`, the
    perplexity ratio exp(diff) with its interval `ratio_interval`."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"paired windows: {a.shape} and {b.shape} are not the same windows")
    d = a - b
    lo, hi = _bounds(d[resample(d.size, draws, seed)].mean(axis=1), level)
    verdict = "holds" if hi < 0 else "misses" if lo > 0 else "within noise"
    return {"diff": float(d.mean()), "interval": [lo, hi], "verdict": verdict,
            "ratio": float(np.exp(d.mean())), "ratio_interval": [float(np.exp(lo)), float(np.exp(hi))]}

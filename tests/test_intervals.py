"""Bootstrap intervals of perplexities and paired verdicts (ojbkq_core/intervals.py), and how the
comparison's report states them."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ojbkq_core import results
from ojbkq_core.errors import InputError
from ojbkq_core.intervals import interval, paired


def test_the_interval_contains_the_true_perplexity_about_95_times_in_100():
    """Window log-likelihoods drawn around a known mean: the true perplexity exp(μ) lies inside the
    interval in close to 95% of 300 simulated evaluations of 64 windows."""
    mu, covered, trials = 3.2, 0, 300
    for t in range(trials):
        nll = np.random.default_rng(t).normal(mu, 0.4, size=64)
        lo, hi = interval(nll)
        covered += lo <= math.exp(mu) <= hi
    assert 0.90 * trials <= covered <= 0.99 * trials, covered


def test_the_interval_narrows_with_more_windows_and_holds_the_estimate():
    rng = np.random.default_rng(1)
    nll = rng.normal(3.0, 0.3, size=256)
    lo8, hi8 = interval(nll[:8])
    lo256, hi256 = interval(nll)
    assert lo8 <= math.exp(nll[:8].mean()) <= hi8 and lo256 <= math.exp(nll.mean()) <= hi256
    assert (hi256 - lo256) < 0.4 * (hi8 - lo8)


def test_paired_windows_tell_apart_what_separate_intervals_cannot():
    """Two recipes 1% apart on windows of very different difficulty: their own intervals overlap, the
    paired difference does not contain 0."""
    rng = np.random.default_rng(2)
    difficulty = rng.normal(3.5, 0.5, size=64)                # shared by both recipes
    better = difficulty + rng.normal(0, 0.002, size=64)
    worse = difficulty + math.log(1.01) + rng.normal(0, 0.002, size=64)
    (la, ha), (lb, hb) = interval(better), interval(worse)
    assert la < hb and lb < ha                                 # the separate intervals overlap
    p = paired(better, worse)
    assert p["verdict"] == "holds" and p["ratio_interval"][1] < 1
    assert p["ratio"] == pytest.approx(1 / 1.01, abs=1e-3)
    assert paired(worse, better)["verdict"] == "misses"
    noisy = difficulty + rng.normal(0, 0.05, size=64)         # no real difference, noisy windows
    assert paired(noisy, difficulty)["verdict"] == "within noise"


def test_paired_needs_the_same_windows():
    with pytest.raises(InputError, match="not the same windows"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])


def test_the_same_draws_make_the_same_interval():
    nll = np.random.default_rng(3).normal(2.0, 0.2, size=40)
    assert interval(nll) == interval(list(nll))


def _row(recipe, bits, nll):
    return {"recipe": recipe, "bits": bits, "group_size": 64, "seconds": 1.0, "objective_sum": 1.0,
            "sym_loss_sum": 1.0, "perplexity": {"d": float(np.exp(np.mean(nll)))},
            "perplexity_interval": {"d": interval(nll)}, "window_nll": {"d": list(map(float, nll))}}


def test_ordering_and_baseline_carry_the_three_verdicts_into_the_report():
    rng = np.random.default_rng(4)
    base = rng.normal(3.0, 0.5, size=32)
    noise = lambda s: rng.normal(0, s, size=32)  # noqa: E731
    rows = [_row("fp", 16, base - 0.2), _row("ojbkq", 3, base + noise(0.001)),           # ojbkq ≈ beam
            _row("regularized-beam", 3, base + noise(0.001)), _row("gptaq", 3, base + 0.05 + noise(0.001)),
            _row("gptq", 3, base + 0.02 + noise(0.001)), _row("rtn", 3, base + 0.5 + noise(0.01)),
            _row(results.BASELINE, 3, base + 0.03 + noise(0.001))]
    order = {(o["better"], o["worse"]): o["verdict"] for o in results.ordering(rows, ["d"])}
    assert order == {("ojbkq", "regularized-beam"): "within noise", ("regularized-beam", "gptaq"): "holds",
                     ("gptaq", "gptq"): "misses", ("gptq", "rtn"): "holds"}
    against = {o["recipe"]: o["verdict"] for o in results.against_baseline(rows, ["d"])}
    assert against == {"ojbkq": "holds", "regularized-beam": "holds", "gptaq": "misses", "gptq": "holds"}
    result = {"model": "m", "device": "cpu", "dtype": "float32", "torch_threads": 1, "seconds": 1.0, "rows": rows,
              "group_size": 64, "overrides": [], "calibration": {"samples": 1, "seqlen": 8, "seed": 0, "dataset": "x"},
              "evaluation": {"d": {"dataset": "x", "windows": 32, "seqlen": 8, "text_tokens": 300}},
              "ordering": results.ordering(rows, ["d"]), "against_baseline": results.against_baseline(rows, ["d"])}
    md = results.report_markdown(result, None)
    assert "Verdicts: 2 holds, 1 misses, 1 within noise." in md
    assert "Verdicts: 3 holds, 1 misses, 0 within noise." in md
    assert "(the text has 300 tokens)" in md and "**within noise** (ratio" in md

"""`ojbkq verify`: decoders against the exact optimum on random BILS instances."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .problem import BILSProblem
from .solve import solve

CONDITIONING = ("well", "ill", "mixed")


def random_problem(rng: np.random.Generator, n: int, lower: int, upper: int, rhs: int, cond: str) -> BILSProblem:
    """A random instance: `A` `(n + 2, n)`, Gaussian (`well`) or with singular values spread over
    four decades (`ill`); `y = A z* + noise` with `z*` drawn from a box twice as wide as the problem's,
    so some optima lie on the box faces."""
    m = n + 2
    A = rng.normal(size=(m, n))
    if cond == "ill":
        Uq, _, Vt = np.linalg.svd(A, full_matrices=False)
        A = (Uq * np.logspace(0, -4, n)) @ Vt
    width = upper - lower
    zs = rng.integers(lower - width // 2, upper + width // 2 + 1, size=(n, rhs))
    scale = np.linalg.norm(A, axis=0).mean()
    y = A @ zs + rng.normal(scale=0.5 * scale, size=(m, rhs))
    return BILSProblem.create(y, lower, upper, A=A)


@dataclass
class Row:
    decoder: str
    trials: int
    optimal_rate: float
    mean_gap: float
    max_gap: float
    seconds: float
    rhs: int
    worse_than_babai: int


def run(decoders: dict, n: int, box: tuple[int, int], rhs: int, trials: int, cond: str, seed: int) -> list[Row]:
    """Solve `trials` instances with every decoder in `decoders` (name → instance) and with `exact`."""
    if cond not in CONDITIONING:
        raise InputError(f"--cond {cond!r}: choose one of {', '.join(CONDITIONING)}")
    if n < 1 or rhs < 1 or trials < 1:
        raise InputError("--n, --rhs and --trials must be positive")
    lo, hi = box
    if lo > hi:
        raise InputError(f"--box {lo}:{hi}: lower bound above upper bound")
    from .decoders import Babai, Exact
    rng = np.random.default_rng(seed)
    names = list(decoders)
    gaps = {k: [] for k in names}
    secs = {k: 0.0 for k in names}
    worse = {k: 0 for k in names}
    for trial in range(trials):
        c = cond if cond != "mixed" else ("well", "ill")[trial % 2]
        P = random_problem(rng, n, lo, hi, rhs, c)
        opt = np.atleast_1d(solve(P, Exact()).residual)
        babai = np.atleast_1d(solve(P, Babai()).residual)
        for k, dec in decoders.items():
            t0 = time.perf_counter()
            r = np.atleast_1d(solve(P, dec, seed=seed + trial).residual)
            secs[k] += time.perf_counter() - t0
            gaps[k].extend(((r - opt) / np.maximum(opt, 1e-12)).tolist())
            worse[k] += int(np.sum(r > babai * (1 + 1e-9) + 1e-12))
    rows = []
    for k in names:
        g = np.maximum(np.array(gaps[k]), 0.0)
        rows.append(Row(k, trials, float(np.mean(g <= 1e-9)), float(g.mean()), float(g.max()), secs[k],
                        trials * rhs, worse[k]))
    return rows


def table(rows: list[Row]) -> str:
    head = f"{'decoder':<24} {'trials':>6} {'rhs':>6} {'optimal':>8} {'mean gap':>10} {'max gap':>10} {'>babai':>6} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.decoder:<24} {r.trials:>6} {r.rhs:>6} {r.optimal_rate:>8.1%} {r.mean_gap:>10.4g} "
                     f"{r.max_gap:>10.4g} {r.worse_than_babai:>6} {r.seconds:>8.3f}")
    return "\n".join(lines)

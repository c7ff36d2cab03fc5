"""Exact references: Schnorr–Euchner sphere decoding and brute force (docs/formulation.md §5).

Both work per row on the lower-triangular lattice form of the working problem: with `Rl = U⁻ᵀ`,
`H = Rlᵀ Rl`, a row's objective is `‖y − B a(c)‖²` with `B = Rl · diag(s)`, `y = Rl (t + s ∘ z0)` and `a`
the grid's alphabet (`a(c) = c` on the integers), and coordinate `k` of `B` involves only the codes
`c_0..c_k`. Both need a static grid.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..problem import WorkingProblem
from .babai import Babai
from .base import DecodeResult, Decoder


def _lattice_rows(problem: WorkingProblem, who: str):
    if problem.grid.dynamic:
        raise InputError(f"decoder '{who}' needs a static grid: set quant.static_groups=true or quant.group_size=-1")
    Rl = problem.lattice().double().cpu().numpy()
    T = problem.T.double().cpu().numpy()
    S = problem.grid.scale.double().cpu().numpy()
    Z = problem.grid.zero.double().cpu().numpy()
    lo = problem.grid.lower.cpu().numpy().astype(np.int64)
    hi = problem.grid.upper.cpu().numpy().astype(np.int64)
    if problem.grid.alphabet.size is not None and (lo.min() < 0 or hi.max() >= problem.grid.alphabet.size):
        raise InputError(f"decoder '{who}': the box [{lo.min()}, {hi.max()}] reaches past the alphabet's "
                         f"{problem.grid.alphabet.size} codes")
    for i in range(T.shape[0]):
        yield Rl * S[i][None, :], Rl @ (T[i] + S[i] * Z[i]), lo, hi


def _values(problem: WorkingProblem) -> Optional[np.ndarray]:
    """The alphabet's values `(K,)` float64, None on the integers."""
    values = problem.grid.alphabet.values
    return None if values is None else np.asarray(values, dtype=np.float64)


def _result(problem, codes: np.ndarray, obj: np.ndarray, info=None):
    tt = lambda a: torch.as_tensor(a, dtype=problem.T.dtype, device=problem.T.device)  # noqa: E731
    return DecodeResult(tt(codes), problem.grid.scale, problem.grid.zero, tt(obj), info or {})


def sphere_decode(L: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, start: np.ndarray,
                  max_nodes: int = 50_000_000, values: Optional[np.ndarray] = None):
    """Minimise `‖y − L a(c)‖²` over integer codes `lo ≤ c ≤ hi`; `L` `(n, n)` lower triangular, `a(c) =
    values[c]` (sorted; None: `a(c) = c`).

    Depth-first Schnorr–Euchner enumeration (candidates at each level in order of distance from the
    level's centre) with the radius shrinking to each better leaf; `start` (e.g. the Babai point) sets
    the initial radius. Returns the optimum codes, its value and the number of nodes visited.
    """
    a = (lambda c: c) if values is None else (lambda c: values[c])  # noqa: E731
    n = len(y)
    best = start.astype(np.int64).copy()
    best_r = float(((y - L @ a(best)) ** 2).sum())
    c = np.zeros(n, dtype=np.int64)
    dist = np.zeros(n + 1)
    center = np.zeros(n)
    cand: list[list[int]] = [[] for _ in range(n)]
    pos = [0] * n
    diag = np.diag(L)
    visited = 0

    def enter(k):
        center[k] = (y[k] - L[k, :k] @ a(c[:k])) / diag[k]
        cand[k] = sorted(range(int(lo[k]), int(hi[k]) + 1), key=lambda v: abs(a(v) - center[k]))
        pos[k] = 0

    k = 0
    enter(0)
    while True:
        if pos[k] < len(cand[k]):
            ck = cand[k][pos[k]]
            pos[k] += 1
            visited += 1
            if visited > max_nodes:
                raise InputError(f"decoder 'exact': search passed max_nodes={max_nodes} (n={n}); the problem "
                                 f"is too large or too ill-conditioned to solve exactly; raise max_nodes or use beam")
            d = dist[k] + (diag[k] * (a(ck) - center[k])) ** 2
            if d < best_r:
                c[k] = ck
                if k == n - 1:
                    best_r, best = d, c.copy()
                else:
                    dist[k + 1] = d
                    k += 1
                    enter(k)
            else:
                pos[k] = len(cand[k])                       # the rest of this level is farther still
        elif k == 0:
            break
        else:
            k -= 1
    return best, float(((y - L @ a(best)) ** 2).sum()), visited


class Exact(Decoder):
    name = "exact"
    params = {"max_nodes": 50_000_000}
    description = "box-constrained Schnorr-Euchner sphere decoding (the true optimum)"

    def check(self, options):
        self._positive_int("max_nodes")

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        start = Babai().decode(problem).codes.double().cpu().numpy().astype(np.int64)
        codes, obj, nodes = [], [], 0
        values = _values(problem)
        for i, (L, y, lo, hi) in enumerate(_lattice_rows(problem, self.name)):
            c, r, v = sphere_decode(L, y, lo, hi, start[i], self.options["max_nodes"], values)
            codes.append(c)
            obj.append(r)
            nodes += v
        return _result(problem, np.array(codes).reshape(problem.m, problem.n), np.array(obj), {"nodes": nodes})


class Exhaustive(Decoder):
    name = "exhaustive"
    params = {"max_points": 1 << 20, "chunk": 1 << 16}
    description = "brute force over the box (tests only)"

    def check(self, options):
        self._positive_int("max_points")
        self._positive_int("chunk")

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        lo = problem.grid.lower.cpu().numpy().astype(np.int64)
        hi = problem.grid.upper.cpu().numpy().astype(np.int64)
        size = math.prod(int(h - l + 1) for l, h in zip(lo, hi))
        if size > self.options["max_points"]:
            raise InputError(f"decoder 'exhaustive': the box has {size} points, over max_points="
                             f"{self.options['max_points']}; use 'exact' or raise max_points")
        points = itertools.product(*[range(int(l), int(h) + 1) for l, h in zip(lo, hi)])
        chunks = []
        while True:
            block = list(itertools.islice(points, self.options["chunk"]))
            if not block:
                break
            chunks.append(np.array(block, dtype=np.float64))
        codes, obj = [], []
        values = _values(problem)
        for L, y, _, _ in _lattice_rows(problem, self.name):
            best_r, best = math.inf, None
            for Zc in chunks:
                Vc = Zc if values is None else values[Zc.astype(np.int64)]
                r = ((y[None, :] - Vc @ L.T) ** 2).sum(1)
                i = int(r.argmin())
                if r[i] < best_r:
                    best_r, best = float(r[i]), Zc[i]
            codes.append(best)
            obj.append(best_r)
        return _result(problem, np.array(codes).reshape(problem.m, problem.n), np.array(obj), {"points": size})

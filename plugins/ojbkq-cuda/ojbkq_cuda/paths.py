"""The candidate paths a walk or a beam leaves (`Paths`, path-major) and the choice among them per row, one
candidate at a time (memory: a few `(m, n)` buffers).

The rule is the reference's (`ojbkq_core.decoders.select.select`): per row the candidate with the least
score, where the score is the problem's scoring objective when it has one and the path objective
`Σ e²` otherwise, and a candidate whose path objective is not finite never wins.

For the project's `RowScore` `J(q) = const − 2 (W M)·q + q H qᵀ` the candidates are compared through their
difference to candidate 0: with `δ = q_p − q_0` and `g_0 = q_0 H − W M`,

    J(q_p) − J(q_0) = 2 g_0·δ + δ H δᵀ

which avoids subtracting two numbers of the size of `const` (the reference's form) for every candidate.
`g_0` is computed with full float32 matrix products whatever torch's TF32 setting; the `δ H` products
follow it. The layer's own objective comes as a `PathScore` (the loss accumulated along each walk, with
its damping correction), computed one candidate at a time by the same call as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ojbkq_core.decoders.result import DecodeResult
from ojbkq_core.objectives import RowScore
from ojbkq_core.problem import WorkingProblem

from . import runtime

BACKEND = "ojbkq-cuda"


@dataclass
class Paths:
    """What a walk leaves behind, path-major: row `p·m + i` is path `p` of row `i`.

    `codes` `(P·m, n)` integer; `scale`, `zero`: `(P·m, n_groups)` per fitted group (dynamic grid) or
    `None` (static grid: the problem's grid); `score` `(P·m,)` the path objective `Σ e²`.
    """

    codes: torch.Tensor
    scale: Optional[torch.Tensor]
    zero: Optional[torch.Tensor]
    score: torch.Tensor
    group_size: int

    def best(self, problem: WorkingProblem):
        """Per row the candidate with the least score (`select`)."""
        res = select(problem, self, self.codes.shape[0] // problem.m)
        res.info["backend"] = BACKEND
        return res

    def single(self, problem: WorkingProblem, info=None):
        """The one path of a one-path walk (`single`)."""
        return single(problem, self, {**(info or {}), "backend": BACKEND})

    def then(self, other: "Paths") -> "Paths":
        """These candidates followed by `other`'s (same problem, same grid kind)."""
        cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
        return Paths(torch.cat([self.codes, other.codes.to(self.codes.dtype)]), cat(self.scale, other.scale),
                     cat(self.zero, other.zero), torch.cat([self.score, other.score]), self.group_size)

    def grid_of(self, problem: WorkingProblem, rows: torch.Tensor):
        """Scale and zero `(len(rows), n)` per column for the given path-rows."""
        n = self.codes.shape[1]
        if self.scale is None:
            m = problem.m
            return problem.grid.scale[rows % m], problem.grid.zero[rows % m]
        g = self.group_size
        col_group = torch.arange(n, device=rows.device) // g
        return self.scale[rows][:, col_group], self.zero[rows][:, col_group]


def values(problem: WorkingProblem, paths: Paths, p: int):
    """Codes, scale, zero `(m, n)` of candidate `p`."""
    m = problem.m
    rows = torch.arange(m, device=paths.codes.device) + p * m
    s, z = paths.grid_of(problem, rows)
    return paths.codes[rows].to(s.dtype), s, z


def rank(problem: WorkingProblem, paths: Paths, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rank, key)`, both `(P, m)`: the score of every candidate (as the reference reports it) and the
    quantity that is minimised (the score, or its difference to candidate 0)."""
    m = problem.m
    score = paths.score.view(P, m)
    sc = problem.score
    if sc is None:
        return score, score
    if isinstance(sc, RowScore):
        c, s, z = values(problem, paths, 0)
        q0 = problem.grid.dequantize(c, s, z)
        J0 = sc(q0)
        with runtime.tf32(False):
            g0 = q0 @ sc.H - sc.WM
        key = torch.zeros(P, m, dtype=J0.dtype, device=J0.device)
        for p in range(1, P):
            c, s, z = values(problem, paths, p)
            delta = problem.grid.dequantize(c, s, z) - q0
            key[p] = 2 * (g0 * delta).sum(-1) + ((delta @ sc.H) * delta).sum(-1)
        return J0 + key, key
    ranks = []
    for p in range(P):
        c, s, z = values(problem, paths, p)
        ranks.append(sc(problem.grid.dequantize(c, s, z), score[p]))
    r = torch.stack(ranks)
    return r, r


def select(problem: WorkingProblem, paths: Paths, P: int) -> DecodeResult:
    m = problem.m
    score = paths.score.view(P, m).to(problem.T.dtype)
    ranked, key = rank(problem, paths, P)
    bad = ~torch.isfinite(score)
    ranked = ranked.masked_fill(bad, float("inf"))
    best = key.masked_fill(bad, float("inf")).argmin(0)                # (m,)
    rows = best * m + torch.arange(m, device=best.device)
    s, z = paths.grid_of(problem, rows)
    return DecodeResult(paths.codes[rows].to(s.dtype), s, z, score.gather(0, best.view(1, -1))[0],
                        {"candidate": best, "candidate_scores": ranked})


def single(problem: WorkingProblem, paths: Paths, info=None) -> DecodeResult:
    """The one path of a walk with `P = 1` as a result."""
    rows = torch.arange(problem.m, device=paths.codes.device)
    s, z = paths.grid_of(problem, rows)
    return DecodeResult(paths.codes.to(s.dtype), s, z, paths.score.to(s.dtype), info or {})

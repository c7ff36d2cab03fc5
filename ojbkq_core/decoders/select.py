"""Choosing among candidate paths per row: the least score wins (the problem's scoring objective when it
has one, the path objective `Σ e²` otherwise)."""
from __future__ import annotations

import torch

from ..problem import WorkingProblem
from .result import DecodeResult


def select(problem: WorkingProblem, codes, scale, zero, score):
    """Per-row best candidate. `codes`, `scale`, `zero` `(P, m, n)`, `score` `(P, m)`."""
    if problem.score is not None:
        rank = problem.score(problem.grid.dequantize(codes, scale, zero), score).masked_fill(~torch.isfinite(score), float("inf"))
    else:
        rank = score
    best = rank.argmin(0)                                     # (m,)
    idx = best.view(1, -1, 1).expand(1, *codes.shape[1:])
    pick = lambda x: x.gather(0, idx)[0]                      # noqa: E731
    return DecodeResult(pick(codes), pick(scale), pick(zero),
                        score.gather(0, best.view(1, -1))[0],
                        {"candidate": best, "candidate_scores": rank})

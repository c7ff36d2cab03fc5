"""Successive rounding for the regularized (α) objective.

Column-by-column rounding that starts from the weights `W` themselves and lets the error feedback carry
the asymmetric correction one column at a time: with `T = W + D H⁻¹ = W + (D Uᵀ) U`, the injection
`G = D Uᵀ` adds `G_j U_jj` to column `j` as it is decoded and `G_j U_{j,j+1:}` to the later columns. `T`
is never formed. With a static grid this is, up to floating-point rounding, babai on `T`; with a
dynamic grid the groups are fitted on the progressively corrected weights. At α = 0 (`G = 0`) it is
exactly babai/GPTQ. Without an injection (a lattice-form problem) it is babai.
"""
from __future__ import annotations

from ..problem import WorkingProblem
from .base import DecodeResult, Decoder
from .walk import nearest, walk


class Successive(Decoder):
    name = "successive"
    progressive = True
    description = "successive rounding carrying the asymmetric correction progressively"

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        inject = problem.base is not None and problem.inject is not None
        codes, scale, zero, score = walk(problem, 1, lambda t, s, z, lo, hi, d, j: nearest(t, s, z, lo, hi),
                                         inject=inject)
        return DecodeResult(codes[0], scale[0], zero[0], score[0], {"progressive": inject})

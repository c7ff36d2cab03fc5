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


class Successive(Decoder):
    name = "successive"
    stackable = True
    progressive = True
    description = "successive rounding carrying the asymmetric correction progressively"

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        inject = problem.base is not None and problem.inject is not None
        return self.by_rows(problem, 1, row0, lambda pr, r0: self.primitives.walk(pr, 1, inject=inject)
                            .single(pr, {"progressive": inject}))

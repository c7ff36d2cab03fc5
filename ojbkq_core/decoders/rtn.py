"""Round to nearest, no error feedback: the baseline."""
from __future__ import annotations

import torch

from ..problem import WorkingProblem
from .base import DecodeResult, Decoder


class RTN(Decoder):
    name = "rtn"
    description = "round to nearest without error feedback"

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        T, U = problem.T, problem.U
        scale, zero = problem.grid.initial(T)
        codes = problem.grid.alphabet.nearest(T, scale, zero, problem.grid.lower, problem.grid.upper)
        R = T - problem.grid.dequantize(codes, scale, zero)
        # Σ e² = ‖Rl r‖² with Rl = U⁻ᵀ: solve Uᵀ x = r for each row.
        x = torch.linalg.solve_triangular(U.T, R.T, upper=False)
        return DecodeResult(codes, scale, zero, (x * x).sum(0))

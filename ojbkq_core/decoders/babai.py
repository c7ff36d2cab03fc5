"""Extended Babai nearest plane: round to the nearest grid point with error feedback.

On a layer this is GPTQ; on a lattice-form problem it is the box-constrained Babai point.
"""
from __future__ import annotations

from ..problem import WorkingProblem
from .base import DecodeResult, Decoder


class Babai(Decoder):
    name = "babai"
    stackable = True
    description = "nearest plane with error feedback (GPTQ on a layer)"

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        return self.by_rows(problem, 1, row0, lambda pr, r0: self.primitives.walk(pr, 1).single(pr))

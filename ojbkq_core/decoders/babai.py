"""Extended Babai nearest plane: round to the nearest grid point with error feedback.

On a layer this is GPTQ; on a lattice-form problem it is the box-constrained Babai point.
"""
from __future__ import annotations

from ..problem import WorkingProblem
from .base import DecodeResult, Decoder
from .walk import nearest, walk


class Babai(Decoder):
    name = "babai"
    description = "nearest plane with error feedback (GPTQ on a layer)"

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        codes, scale, zero, score = walk(problem, 1, lambda t, s, z, lo, hi, d, j: nearest(t, s, z, lo, hi))
        return DecodeResult(codes[0], scale[0], zero[0], score[0])

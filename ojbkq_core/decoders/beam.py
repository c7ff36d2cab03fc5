"""Bounded search: a beam of `width` partial paths per row (regularized-calibration paper).

At each column every beam expands to its `expand` nearest grid codes; the `width` best partial paths by
accumulated `Σ e²` survive (`search.beams`, the `beam` primitive). `width = 1` is babai; a beam that never
prunes is exhaustive search. The Babai path is always one of the final candidates, so per row the result
is never worse than babai under the selecting score.
"""
from __future__ import annotations

from ..problem import WorkingProblem
from .base import DecodeResult, Decoder


class Beam(Decoder):
    name = "beam"
    params = {"width": 4, "expand": 2}
    description = "beam search over partial paths (width B, expansions E)"

    def check(self, options):
        self._positive_int("width")
        self._positive_int("expand")

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0, block: int = 128) -> DecodeResult:
        B, E = self.options["width"], self.options["expand"]
        # the Babai path joins the survivors as a candidate, so the result is never worse than babai
        return self.by_rows(problem, B + 1, row0,
                            lambda pr, r0: self.primitives.beam(pr, B, E, block=block).best(pr))

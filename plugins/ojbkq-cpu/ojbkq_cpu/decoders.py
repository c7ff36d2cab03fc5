"""The CPU decoders: subclasses of the reference decoders (same names, parameters, checks and results) whose
`decode` runs the numba kernels. Problems the kernels do not take (not float32, not on the CPU) go to the
reference implementation unchanged."""
from __future__ import annotations

import torch

from ojbkq_core.decoders import Babai, Beam, Klein, Successive
from ojbkq_core.decoders.base import DecodeResult
from ojbkq_core.decoders.klein import select
from ojbkq_core.problem import WorkingProblem

from .beam import beam
from .walk import walk


class _Cpu:
    """Mixin: use the kernels where they apply, the reference otherwise."""

    backend = "ojbkq-cpu"

    def _usable(self, problem: WorkingProblem) -> bool:
        return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32)
                   for t in (problem.T, problem.U, problem.base, problem.inject))


def _single(codes, scale, zero, score, info=None) -> DecodeResult:
    """The one path of a single-path walk."""
    return DecodeResult(codes[0], scale[0], zero[0], score[0], info or {})


class CpuBabai(_Cpu, Babai):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0)
        return _single(*walk(problem, 1))


class CpuSuccessive(_Cpu, Successive):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0)
        inject = problem.base is not None and problem.inject is not None
        return _single(*walk(problem, 1, inject=inject), {"progressive": inject})


class CpuKlein(_Cpu, Klein):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0)
        K, w = self.options["k"], self.options["window"]
        codes, scale, zero, score = walk(problem, K, beta=self.beta(problem), window=w, seed=seed, row0=row0)
        return select(problem, codes, scale, zero, score)


class CpuBeam(_Cpu, Beam):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0, block: int = 128) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0, block)
        codes, scale, zero, score = beam(problem, self.options["width"], self.options["expand"], block)
        # the Babai path joins the survivors as a candidate, so the result is never worse than babai
        b_codes, b_scale, b_zero, b_score = walk(problem, 1, block=block)
        return select(problem, torch.cat([codes, b_codes]), torch.cat([scale, b_scale]),
                      torch.cat([zero, b_zero]), torch.cat([score, b_score]))


CPU_DECODERS = (CpuBabai, CpuKlein, CpuSuccessive, CpuBeam)

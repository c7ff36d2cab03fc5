"""The device decoders: subclasses of the reference decoders (same names, parameters and checks) whose
`decode` runs the Triton walk. Problems the kernels do not take (not float32, no Triton, a CPU tensor
outside the interpreter) go to the reference implementation unchanged.

Rows are independent problems sharing `U`: a decoder decodes them in chunks small enough that its paths fit
in `runtime.memory_budget` (half the free device memory unless `OJBKQ_CUDA_MAX_BYTES` says otherwise).
"""
from __future__ import annotations

import torch

from ojbkq_core.decoders import Babai, Beam, Klein, Successive
from ojbkq_core.decoders.base import DecodeResult
from ojbkq_core.decoders.klein import column_reach
from ojbkq_core.problem import WorkingProblem

from . import runtime
from .beam import beam
from .select import select, single
from .walk import walk


def _cat(parts: list[DecodeResult]) -> DecodeResult:
    info = {}
    if parts[0].info:
        for k, v in parts[0].info.items():
            if isinstance(v, torch.Tensor):
                info[k] = torch.cat([p.info[k] for p in parts], dim=v.dim() - 1)
            else:
                info[k] = v
    return DecodeResult(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                        torch.cat([p.zero for p in parts]), torch.cat([p.objective for p in parts]), info)


def chunked(problem: WorkingProblem, row0: int, paths: int, run) -> DecodeResult:
    """`run(problem_rows, row0)` over row chunks that keep `paths` candidate paths per row in budget."""
    m, n = problem.m, problem.n
    budget = runtime.memory_budget(problem.T.device)
    per_row = paths * (n * 13 + 4608) + 24 * n   # targets ×2, codes, grids, klein's noise of a block; selection
    step = m if budget is None else max(1, min(m, budget // per_row))
    if step >= m:
        return run(problem, row0)
    return _cat([run(problem.rows(slice(i, i + step)), row0 + i) for i in range(0, m, step)])


class _Device:
    """Mixin: use the kernels where they apply, the reference otherwise."""

    backend = "ojbkq-cuda"

    def _usable(self, problem: WorkingProblem) -> bool:
        return runtime.usable(problem.T) and problem.U.dtype == torch.float32


class CudaBabai(_Device, Babai):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0)
        return chunked(problem, row0, 1, lambda pr, r0: single(pr, walk(pr, 1)))


class CudaSuccessive(_Device, Successive):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0)
        inject = problem.base is not None and problem.inject is not None
        return chunked(problem, row0, 1,
                       lambda pr, r0: single(pr, walk(pr, 1, inject=inject), {"progressive": inject}))


class CudaKlein(_Device, Klein):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0)
        K, w = self.options["k"], self.options["window"]

        def run(pr, r0):
            beta = self.beta(pr)
            paths = walk(pr, K, beta=beta, window=w, seed=seed, row0=r0, reach=column_reach(pr, beta, w))
            return select(pr, paths, K)
        return chunked(problem, row0, K, run)


class CudaBeam(_Device, Beam):
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0, block: int = 128) -> DecodeResult:
        if not self._usable(problem):
            return super().decode(problem, seed, row0, block)
        B, E = self.options["width"], self.options["expand"]

        def run(pr, r0):
            beams = beam(pr, B, E, block)
            babai = walk(pr, 1, block=block)      # the Babai path joins the survivors as a candidate
            return select(pr, _join(beams, babai), B + 1)
        return chunked(problem, row0, B + 1, run)


def _join(a, b):
    from .walk import Paths
    cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
    return Paths(torch.cat([a.codes, b.codes.to(a.codes.dtype)]), cat(a.scale, b.scale), cat(a.zero, b.zero),
                 torch.cat([a.score, b.score]), a.group_size)


DEVICE_DECODERS = (CudaBabai, CudaKlein, CudaSuccessive, CudaBeam)

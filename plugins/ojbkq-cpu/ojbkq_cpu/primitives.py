"""The CPU primitives (ojbkq_core.decoders.primitives): the column walk and the beam search run by the numba
kernels, for problems whose tensors are float32 on the CPU. The decoders call them under `backend: auto`
on the CPU and take the reference's decisions bit for bit (`tests/test_cpu_plugin.py`); other problems
go to the reference implementation."""
from __future__ import annotations

from typing import Optional

import torch

from ojbkq_core.decoders.primitives import Dense, Sampling
from ojbkq_core.problem import WorkingProblem

from .beam import beam
from .walk import walk

BACKEND = "ojbkq-cpu"


def usable(problem: WorkingProblem) -> bool:
    """Float32 CPU problems (a stack of problems too: the walk takes one `U` per problem)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32)
               for t in (problem.T, problem.U, problem.base, problem.inject))


def walk_paths(problem: WorkingProblem, paths: int = 1, inject: bool = False,
               sampling: Optional[Sampling] = None, block: int = 128) -> Dense:
    if sampling is not None and paths > 1:
        out = walk(problem, paths, beta=sampling.beta, window=sampling.window, seed=sampling.seed,
                   row0=sampling.row0, block=block)
    else:
        out = walk(problem, paths, inject=inject, block=block)
    return Dense(*out, backend=BACKEND)


def beam_paths(problem: WorkingProblem, width: int, expand: int, block: int = 128) -> Dense:
    return Dense(*beam(problem, width, expand, block), backend=BACKEND).then(walk_paths(problem, 1, block=block))

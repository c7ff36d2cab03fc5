"""The device primitives (ojbkq_core.decoders.primitives): the column walk and the beam search run by the
Triton kernels, for float32 problems on a CUDA device (or CPU tensors under Triton's interpreter), on the
integers or an alphabet (FP4) given to the kernels as a table; other problems go to the reference
implementation.

Rows are independent problems sharing `U`: `rows` tells the decoders how many rows one call may take so
that its paths fit in `runtime.memory_budget` (half the free device memory, at most 4 GiB, unless
`OJBKQ_CUDA_MAX_BYTES` says otherwise).
"""
from __future__ import annotations

from typing import Optional

import torch

from ojbkq_core.decoders.sampling import column_reach
from ojbkq_core.decoders.primitives import Sampling
from ojbkq_core.problem import WorkingProblem

from . import runtime
from .beam import beam
from .paths import Paths
from .walk import walk


def usable(problem: WorkingProblem) -> bool:
    """Float32 problems where the kernels run (a stack of problems too: the walk takes one `U` per problem)."""
    return runtime.usable(problem.T) and problem.U.dtype == torch.float32


def walk_paths(problem: WorkingProblem, paths: int = 1, inject: bool = False,
               sampling: Optional[Sampling] = None, block: int = 128) -> Paths:
    if sampling is not None and paths > 1:
        return walk(problem, paths, beta=sampling.beta, window=sampling.window, seed=sampling.seed,
                    row0=sampling.row0, block=block, reach=column_reach(problem, sampling.beta, sampling.window))
    return walk(problem, paths, inject=inject, block=block)


def beam_paths(problem: WorkingProblem, width: int, expand: int, block: int = 128) -> Paths:
    return beam(problem, width, expand, block).then(walk(problem, 1, block=block))


def rows(problem: WorkingProblem, paths: int) -> int:
    """Rows whose `paths` candidate paths each fit the memory budget: targets ×2, codes, grids, klein's
    noise of a block per path, and the selection's buffers per row."""
    budget = runtime.memory_budget(problem.T.device)
    if budget is None:
        return problem.m
    per_row = paths * (problem.n * 13 + 4608) + 24 * problem.n
    return max(1, budget // per_row)

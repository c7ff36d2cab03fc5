"""The column walk on the CPU: the reference walk (ojbkq_core.decoders.walk) with the columns of each lazy
block walked by the numba kernel, one row after another on every core, and the trailing columns updated by
the reference's matrix product.

Per block `[i1, i2)`: (dynamic grid) at every group start fit the group on the current targets with the
grid's own `fit`, then the kernel walks up to the next group start; after the block one in-place product
`T[:, i2:] −= Err @ U[block, i2:]`, the same call as the reference's. Returns what the reference walk
returns: `codes`, `scale`, `zero` `(P, m, n)` and `score` `(P, m)`.
"""
from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch

from ojbkq_core.decoders.sampling import gumbel_spread
from ojbkq_core.decoders.walk import subtract_stacked
from ojbkq_core.grid import Alphabet, block_size_for
from ojbkq_core.problem import WorkingProblem
from ojbkq_core.rng import path_row_state, stack_state

from .kernels import gumbel_bucket_bounds, walk_stretch


def alphabet_table(alphabet: Alphabet) -> tuple:
    """The kernels' arguments for the grid's alphabet: `values` `(K,)` float32 (empty for the integers), the
    tie parity, the least gap and the largest gap over it."""
    values = np.zeros(0, np.float32) if alphabet.values is None else np.asarray(alphabet.values, np.float32)
    gap, widest = alphabet.gaps
    return values, alphabet.tie_parity, np.float32(gap), widest / gap


def threads() -> None:
    """Run the kernels on as many threads as torch uses (at most numba's pool). numba's OpenMP layer shares
    torch's OpenMP runtime and sets its thread count when it starts: torch's is set back."""
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def walk(problem: WorkingProblem, paths: int = 1, inject: bool = False, beta: Optional[torch.Tensor] = None,
         window: int = 4, seed: int = 0, row0: int = 0, block: int = 128):
    """Run `paths` candidate paths per row: path 0 rounds to nearest (babai); with `beta` `(m,)` the paths
    `p ≥ 1` sample each code (klein). `inject` runs successive rounding from `problem.base` with
    `problem.inject`. A stack of problems (`WorkingProblem.stack`): each row with its problem's `U`, its own
    seed and row index. Float32 CPU tensors."""
    threads()
    U, grid = problem.U, problem.grid            # U itself for the block products, as the reference
    start = problem.base if inject else problem.T
    m, n = start.shape
    P, R = paths, paths * m
    dt = start.dtype
    T = start.unsqueeze(0).expand(P, m, n).clone()
    codes = torch.empty(P, m, n, dtype=dt)
    score = torch.zeros(P, m, dtype=dt)
    if grid.dynamic:
        scale = torch.empty(P, m, n, dtype=dt)
        zero = torch.empty(P, m, n, dtype=dt)
        S, Z, s_rows = scale.view(R, n), zero.view(R, n), R
    else:
        scale = grid.scale.unsqueeze(0).expand(P, m, n)
        zero = grid.zero.unsqueeze(0).expand(P, m, n)
        S, Z, s_rows = grid.scale.to(dt).contiguous(), grid.zero.to(dt).contiguous(), m
    lower = grid.lower.to(dt).contiguous().numpy()
    upper = grid.upper.to(dt).contiguous().numpy()
    G = problem.inject.to(dt).contiguous() if inject else T.view(R, n)[:1]
    sample = beta is not None and P > 1
    if sample:
        beta_a = beta.to(dt).contiguous().numpy()
        hstate = (path_row_state(seed, P, m, row0) if problem.draws is None else stack_state(*problem.draws, P)).numpy()
        spread = gumbel_spread(dt)
    else:
        beta_a = torch.ones(m, dtype=dt).numpy()
        hstate = torch.zeros(1, dtype=torch.int64).numpy()
        spread = 0.0
    gmin, gmax = gumbel_bucket_bounds()
    table = alphabet_table(grid.alphabet)
    E = problem.problems                         # a stack: E problems of `per` rows, each with its U
    per = m // E
    Tr, Ua = T.view(R, n), U.contiguous().view(E, n, n).numpy()
    Ta, Sa, Za, Ga = Tr.numpy(), S.numpy(), Z.numpy(), G.numpy()
    codes_a, score_a = codes.view(R, n).numpy(), score.view(R).numpy()
    bs = block_size_for(grid.group_size if grid.dynamic else -1, block)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        Err = torch.empty(R, i2 - i1, dtype=dt)
        Err_a = Err.numpy()
        cuts = [i1] + [j for j in range(i1 + 1, i2) if grid.dynamic and j % grid.group_size == 0] + [i2]
        for j0, j1 in zip(cuts[:-1], cuts[1:]):
            if grid.dynamic and j0 % grid.group_size == 0:
                g = grid.group_size
                s, z = grid.fit(T[:, :, j0:j0 + g])
                scale[:, :, j0:j0 + g] = s.unsqueeze(-1)
                zero[:, :, j0:j0 + g] = z.unsqueeze(-1)
            walk_stretch(Ta, Ua, per, lower, upper, Sa, Za, s_rows, Ga, inject, beta_a, hstate, sample, window,
                         spread, gmin, gmax, codes_a, Err_a, score_a, m, i1, i2, j0, j1, *table)
        if i2 < n and E > 1:                      # one batched product, as the reference's
            subtract_stacked(Tr[:, i2:], Err, U[:, i1:i2, i2:], P)
        elif i2 < n:
            Tr[:, i2:].addmm_(Err, U[i1:i2, i2:], alpha=-1.0)
    return codes, scale, zero, score

"""Beam search on the CPU: the reference beam (ojbkq_core.decoders.beam) with the columns of each lazy block
searched by the numba kernel, one weight row (all its `B` beams) after another on every core.

Per block: each beam's targets and errors in the block `(B, m, bs)`; (dynamic grid) at every group start
the group is fitted on the beams' current targets with the grid's own `fit`; the kernel walks up to the
next group start; after the block every beam's trailing columns are its ancestor's minus `Err @ U[block,
rest]`, the reference's expression. Codes are recovered by following the back-pointers (`kernels.backtrack`).
"""
from __future__ import annotations

import math

import torch

from ojbkq_core.grid import block_size_for
from ojbkq_core.problem import WorkingProblem

from .kernels import backtrack, beam_stretch
from .walk import alphabet_table, threads


def beam(problem: WorkingProblem, width: int, expand: int, block: int = 128):
    """The `width` surviving beams of every row: `codes`, `scale`, `zero` `(B, m, n)`, `score` `(B, m)`."""
    threads()
    B, E = width, expand
    U, grid, T0 = problem.U, problem.grid, problem.T    # U itself for the block products, as the reference
    m, n = T0.shape
    dt = T0.dtype
    T = T0.unsqueeze(0).expand(B, m, n).clone()
    score = torch.zeros(B, m, dtype=dt)
    score[1:] = math.inf                                   # start from one path
    hist_code = torch.empty(m, n, B, dtype=dt)                # per row, column and beam
    hist_parent = torch.empty(m, n, B, dtype=torch.long)
    hist_scale = torch.empty(m, n, B, dtype=dt)
    hist_zero = torch.empty(m, n, B, dtype=dt)
    lower = grid.lower.to(dt).contiguous().numpy()
    upper = grid.upper.to(dt).contiguous().numpy()
    g = grid.group_size
    if grid.dynamic:
        sc = torch.empty(B, m, dtype=dt)
        zc = torch.empty(B, m, dtype=dt)
    else:
        sc, zc = grid.scale.to(dt).contiguous(), grid.zero.to(dt).contiguous()
    Ua = U.contiguous().numpy()
    table = alphabet_table(grid.alphabet)
    hists = (hist_code.numpy(), hist_parent.numpy(), hist_scale.numpy(), hist_zero.numpy())
    bs = block_size_for(g if grid.dynamic else -1, block)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        Tb = T[:, :, i1:i2].clone()
        Err = torch.zeros(B, m, i2 - i1, dtype=dt)
        anc = torch.arange(B).view(B, 1).expand(B, m).clone()
        cuts = [i1] + [j for j in range(i1 + 1, i2) if grid.dynamic and j % g == 0] + [i2]
        for j0, j1 in zip(cuts[:-1], cuts[1:]):
            if grid.dynamic and j0 % g == 0:
                src = T[:, :, j0:j0 + g] if j0 == i1 else Tb[:, :, j0 - i1:j0 - i1 + g]
                s, z = grid.fit(src)
                sc.copy_(s)
                zc.copy_(z)
            beam_stretch(Tb.numpy(), Err.numpy(), score.numpy(), anc.numpy(), sc.numpy(), zc.numpy(),
                         grid.dynamic, Ua, lower, upper, E, *hists, i1, j0, j1, *table[:2])
        if i2 < n:
            rest = T[:, :, i2:].gather(0, anc.unsqueeze(-1).expand(B, m, n - i2))
            T[:, :, i2:] = rest - Err @ U[i1:i2, i2:]
    # back-track every surviving beam
    codes = torch.empty(B, m, n, dtype=dt)
    scale = torch.empty_like(codes)
    zero = torch.empty_like(codes)
    backtrack(*hists, codes.numpy(), scale.numpy(), zero.numpy())
    return codes, scale, zero, score

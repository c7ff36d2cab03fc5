"""Beam search on the device: the reference beam (ojbkq_core.decoders.beam) with each lazy block run by
one Triton program per few rows, all `B` beams of those rows together.

Per block: (dynamic grid) fit each beam's group on its targets, or carry the fitted grid to the beams'
descendants; one kernel launch walks the block and returns, for the beams alive at its end, their codes
and errors in the block and their ancestor at the block start; the trailing columns of every beam are
its ancestor's, minus one matrix product `Err @ U[block, rest]`. Codes across blocks are recovered by
following the ancestors from the last block back (one gather per block, on the device).

Memory: two copies of the beams' targets `2·(B·m, n)` float32 (the gather needs a source and a
destination), the codes `(B·m, n)`, the per-block ancestors `(n/bs, B·m)` and fitted grids.
"""
from __future__ import annotations

import math

import torch

from ojbkq_core.grid import block_size_for
from ojbkq_core.problem import WorkingProblem

from . import runtime
from .paths import Paths
from .trailing import Trailing
from .walk import code_dtype, triton_cdiv, triton_next_pow2


def beam(problem: WorkingProblem, width: int, expand: int, block: int = 128) -> Paths:
    """The `width` surviving beams of every row as `Paths` with `P = width` (beam-major rows)."""
    U, grid, T0 = problem.U, problem.grid, problem.T
    m, n = T0.shape
    B, E = width, expand
    R = B * m
    dev = T0.device
    f32 = torch.float32
    U = U.to(f32).contiguous()
    trailing = Trailing(U)
    lower = grid.lower.to(device=dev, dtype=f32).contiguous()
    upper = grid.upper.to(device=dev, dtype=f32).contiguous()
    T = T0.to(f32).repeat(B, 1).contiguous()                          # (B·m, n)
    T_next = torch.empty_like(T)
    score = torch.zeros(B, m, dtype=f32, device=dev)
    score[1:] = math.inf                                               # start from one path
    score = score.view(R)
    codes_blk = torch.empty(R, n, dtype=code_dtype(lower, upper), device=dev)
    bs = block_size_for(grid.group_size if grid.dynamic else -1, block)
    if grid.dynamic:
        g = grid.group_size
        bs = min(bs, g)
    starts = list(range(0, n, bs))
    anc = torch.empty(len(starts), R, dtype=torch.int32, device=dev)
    if grid.dynamic:
        fit_s = torch.empty(len(starts), R, dtype=f32, device=dev)     # each beam's grid at the block start
        fit_z = torch.empty(len(starts), R, dtype=f32, device=dev)
    else:
        S = grid.scale.to(f32).contiguous()
        Z = grid.zero.to(f32).contiguous()
    BS = max(16, triton_next_pow2(bs))
    Err = torch.empty(R, BS, dtype=f32, device=dev)
    BP = triton_next_pow2(B)
    EP = triton_next_pow2(2 * E + 1)
    EP2 = triton_next_pow2(E)
    ROWS = max(1, (64 if runtime.interpreted() else 16) // BP)
    kernel = runtime.kernels().beam_block_kernel
    alphabet = runtime.alphabet_args(grid.alphabet, dev)
    rows_idx = torch.arange(m, device=dev, dtype=torch.int64).repeat(B)     # r of each beam-row
    for k, i1 in enumerate(starts):
        i2 = min(i1 + bs, n)
        if grid.dynamic:
            if i1 % g == 0:
                s, z = grid.fit(T.view(B, m, n)[:, :, i1:i1 + g])
                fit_s[k], fit_z[k] = s.reshape(R), z.reshape(R)
            else:                                   # the group continues: each beam keeps its ancestor's grid
                src = anc[k - 1].to(torch.int64) * m + rows_idx
                fit_s[k], fit_z[k] = fit_s[k - 1][src], fit_z[k - 1][src]
            S, Z, stride_sb, stride_sr = fit_s[k], fit_z[k], m, 1
        else:
            stride_sb, stride_sr = 0, S.stride(0)
        kernel[(triton_cdiv(m, ROWS),)](
            T, T.stride(0), U, U.stride(0), lower, upper,
            S, Z, stride_sb, stride_sr, score,
            codes_blk, codes_blk.stride(0), Err, Err.stride(0), anc[k],
            m, i1,
            bs=i2 - i1, B=B, BP=BP, E=E, EP=EP, EP2=EP2, ROWS=ROWS, BS=BS, DYNAMIC=grid.dynamic,
            EXACT=runtime.exact(), num_warps=4, **alphabet,
        )
        if i2 < n:
            src = anc[k].to(torch.int64) * m + rows_idx                 # ancestor's row, (B·m,)
            torch.index_select(T[:, i2:], 0, src, out=T_next[:, i2:])
            trailing.update(T_next[:, i2:], Err[:, :i2 - i1], i1, i2)
            T, T_next = T_next, T
    # follow the ancestors back: codes (and grids) of each final beam
    codes = torch.empty_like(codes_blk)
    cur = torch.arange(R, device=dev, dtype=torch.int64)               # beam-row at the end of block k
    if grid.dynamic:
        n_groups = (n + g - 1) // g
        gscale = torch.empty(R, n_groups, dtype=f32, device=dev)
        gzero = torch.empty(R, n_groups, dtype=f32, device=dev)
    for k in range(len(starts) - 1, -1, -1):
        i1, i2 = starts[k], min(starts[k] + bs, n)
        codes[:, i1:i2] = codes_blk[cur, i1:i2]
        start = anc[k][cur].to(torch.int64) * m + rows_idx              # the beam-row at the block start
        if grid.dynamic and i1 % g == 0:
            gscale[:, i1 // g] = fit_s[k][start]
            gzero[:, i1 // g] = fit_z[k][start]
        cur = start
    if grid.dynamic:
        return Paths(codes, gscale, gzero, score, g)
    return Paths(codes, None, None, score, -1)

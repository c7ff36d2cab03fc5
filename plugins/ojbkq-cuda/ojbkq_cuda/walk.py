"""The column walk on the device: the reference walk (ojbkq_core.decoders.walk) with its lazy blocks run by
one Triton program per `BLOCK_M` rows, all candidate paths of all rows in one launch per block.

Per block of `bs` columns: (dynamic grid) fit the block's group on the current targets with the grid's own
`fit`, one kernel launch for the in-block walk, one in-place matrix product `T[:, rest] −= Err @ U[block,
rest]` for the trailing columns. Nothing is read back to the host inside the loop.

Memory: the targets of every path `(P·m, n)` float32, the codes `(P·m, n)` in the narrowest integer type
that holds the box, the fitted grids `(P·m, n/g)`, one block of errors `(P·m, bs)` and, for klein, one
block of Gumbel noise `((P − 1)·m, bs, 2·window + 1)`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ojbkq_core.grid import block_size_for
from ojbkq_core.problem import WorkingProblem
from ojbkq_core.rng import path_row_state, stack_state

from . import runtime
from .paths import Paths
from .trailing import Trailing


def code_dtype(lower: torch.Tensor, upper: torch.Tensor) -> torch.dtype:
    lo, hi = float(lower.min()), float(upper.max())
    if lo >= 0 and hi <= 255:
        return torch.uint8
    if lo >= -(2**15) and hi < 2**15:
        return torch.int16
    return torch.int32


def walk(problem: WorkingProblem, paths: int = 1, inject: bool = False, beta: Optional[torch.Tensor] = None,
         window: int = 4, seed: int = 0, row0: int = 0, block: int = 128,
         reach: Optional[Sequence[int]] = None) -> Paths:
    """Run `paths` candidate paths per row. Path 0 rounds to nearest (babai); with `beta` `(m,)` the paths
    `p ≥ 1` sample each code (klein). `inject` runs successive rounding from `problem.base` with
    `problem.inject`. `reach` (klein, `n` ints `≤ window`, `ojbkq_core.decoders.sampling.column_reach`):
    how far from the nearest code a draw can land in each column; a block draws and weighs only the codes
    within its columns' largest reach (the same winners, fewer draws). A stack of problems
    (`WorkingProblem.stack`): each program's rows in one problem, reading its `U`; one batched trailing
    product; each row draws with its own seed and row index. All tensors float32 on one device."""
    U, grid = problem.U, problem.grid
    start = problem.base if inject else problem.T
    m, n = start.shape
    P, R = paths, paths * m
    dev = start.device
    f32 = torch.float32
    T = start.to(f32).repeat(P, 1).contiguous()                      # (R, n)
    U = U.to(f32).contiguous()
    E = problem.problems                                             # a stack: E problems of `per` rows
    per = m // E
    trailing = Trailing(U, per=per)
    lower = grid.lower.to(device=dev, dtype=f32).contiguous()
    upper = grid.upper.to(device=dev, dtype=f32).contiguous()
    codes = torch.empty(R, n, dtype=code_dtype(lower, upper), device=dev)
    score = torch.zeros(R, dtype=f32, device=dev)
    bs = block_size_for(grid.group_size if grid.dynamic else -1, block)
    if grid.dynamic:
        g = grid.group_size
        bs = min(bs, g)                          # every group starts a block: fit on fully updated targets
        n_groups = (n + g - 1) // g
        gscale = torch.empty(R, n_groups, dtype=f32, device=dev)
        gzero = torch.empty(R, n_groups, dtype=f32, device=dev)
    else:
        g = -1
        S = grid.scale.to(f32).contiguous()
        Z = grid.zero.to(f32).contiguous()
    G = problem.inject.to(f32).contiguous() if inject else T       # placeholder pointer when unused
    sample = beta is not None and P > 1
    slots = 2 * window + 1
    if sample:
        beta_t = beta.to(f32).contiguous()
        hstate = (path_row_state(seed, P, m, row0, dev) if problem.draws is None
                  else stack_state(*problem.draws, P))
        noise = torch.empty((R - m) * bs * slots, dtype=f32, device=dev)
    else:
        beta_t, noise = score, score                                 # unused pointers
    BS = max(16, triton_next_pow2(bs))
    Err = torch.empty(R, BS, dtype=f32, device=dev)
    BLOCK_M = runtime.block_rows(R, BS, sample)
    while E > 1 and per % BLOCK_M:                                   # a program's rows in one problem
        BLOCK_M //= 2
    stack = {} if E == 1 else {"stride_ue": U.stride(0), "per": per}
    kernel = runtime.kernels().walk_block_kernel
    alphabet = runtime.alphabet_args(grid.alphabet, dev)
    launch = (triton_cdiv(R, BLOCK_M),)
    NOISE_BLOCK = 1024 if not runtime.interpreted() else 4096
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        if grid.dynamic:
            if i1 % g == 0:
                s, z = grid.fit(T.view(P, m, n)[:, :, i1:i1 + g])
                gscale[:, i1 // g] = s.reshape(R)
                gzero[:, i1 // g] = z.reshape(R)
            S, Z = gscale[:, i1 // g], gzero[:, i1 // g]
            srow_mod, stride_sr, stride_sc = R, gscale.stride(0), 0
        else:
            srow_mod, stride_sr, stride_sc = m, S.stride(0), 1
        W = window if reach is None else max(reach[i1:i2])
        if sample:
            items = (R - m) * (i2 - i1)
            runtime.kernels().gumbel_kernel[(triton_cdiv(items, NOISE_BLOCK),)](
                hstate, noise, R, m, i1, i2 - i1, window - W,
                SLOTS=2 * W + 1, BLOCK=NOISE_BLOCK, EXACT=runtime.exact())
        kernel[launch](
            T, T.stride(0), U, U.stride(-2), lower, upper,
            S, Z, stride_sr, stride_sc, srow_mod,
            G, G.stride(0), beta_t, noise,
            codes, codes.stride(0), Err, Err.stride(0), score,
            R, m, i1,
            bs=i2 - i1, BLOCK_M=BLOCK_M, BS=BS, HAS_INJECT=inject, SAMPLE=sample, WINDOW=W,
            EXACT=runtime.exact(), num_warps=runtime.warps(BLOCK_M, BS), **alphabet, **stack,
        )
        if i2 < n:
            trailing.update(T[:, i2:], Err[:, :i2 - i1], i1, i2)
    if grid.dynamic:
        return Paths(codes, gscale, gzero, score, g)
    return Paths(codes, None, None, score, g)


def triton_next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

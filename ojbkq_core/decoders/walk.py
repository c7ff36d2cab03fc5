"""The column walk shared by babai, klein and successive rounding (docs/formulation.md §4–§5).

For every path `p` and row `i` at once, column by column in decoding order:

    t = T[p, i, j]                           (+ G[i, j] · U_jj with successive rounding's injection)
    c = choose(t, scale, zero, lower_j, upper_j, U_jj)
    q = scale · (a(c) − zero);   e = (t − q) / U_jj;   score += e²      (a: the grid's alphabet)
    T[p, i, j+1:] −= (e − G[i, j]) · U[j, j+1:]

with GPTQ's lazy block updates: inside a block only the block's columns are updated, the columns after
it get one matrix product `T[:, rest] −= Err @ U[block, rest]` (one in-place `addmm`) when the block ends.
A stacked problem (`WorkingProblem.stack`) walks every problem's rows at once, each with its own `U`: the
same steps with `U_jj` per row and one batched product per block.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..grid import block_size_for
from ..problem import WorkingProblem

# choose(t, scale, zero, lower_j, upper_j, U_jj, j) -> codes, all (P, m) except the scalars
Chooser = Callable[..., torch.Tensor]


def walk(problem: WorkingProblem, paths: int, choose: Chooser, inject: bool = False, block: int = 128):
    """Run `paths` candidate paths per row, each with its own error state and (dynamic) grid.

    Returns `codes`, `scale`, `zero` `(P, m, n)` and `score` `(P, m)` (the path objective `Σ e²`).
    """
    U, grid = problem.U, problem.grid
    start = problem.base if inject else problem.T
    G = problem.inject if inject else None
    m, n = start.shape
    P = paths
    dev, dt = start.device, start.dtype
    T = start.unsqueeze(0).expand(P, m, n).clone()
    codes = torch.empty(P, m, n, dtype=dt, device=dev)
    score = torch.zeros(P, m, dtype=dt, device=dev)
    if grid.dynamic:
        scale = torch.empty(P, m, n, dtype=dt, device=dev)
        zero = torch.empty(P, m, n, dtype=dt, device=dev)
    else:
        scale = grid.scale.unsqueeze(0).expand(P, m, n)
        zero = grid.zero.unsqueeze(0).expand(P, m, n)
    lower, upper = grid.lower.tolist(), grid.upper.tolist()
    value = grid.alphabet.value
    # 0-d tensors, not Python floats: on CUDA torch turns division by a Python float into a
    # multiplication by its reciprocal, which can tip a rounding tie away from the CPU result
    stacked = U.dim() == 3
    if stacked:                             # U_jj per row; rows of problem e use U[e]
        E = U.shape[0]
        d = problem.diagonal().T.contiguous().unbind()
    else:
        d = U.diagonal().unbind()
    bs = block_size_for(grid.group_size if grid.dynamic else -1, block)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        Tb = T[:, :, i1:i2]                     # a view: updates land in T
        Err = torch.empty(P, m, i2 - i1, dtype=dt, device=dev)
        for j in range(i1, i2):
            jj = j - i1
            if grid.dynamic and j % grid.group_size == 0:
                s, z = grid.fit(T[:, :, j:j + grid.group_size])
                scale[:, :, j:j + grid.group_size] = s.unsqueeze(-1)
                zero[:, :, j:j + grid.group_size] = z.unsqueeze(-1)
            t = Tb[:, :, jj]
            if G is not None:
                t = t + G[:, j] * d[j]
            s, z = scale[:, :, j], zero[:, :, j]
            c = choose(t, s, z, lower[j], upper[j], d[j], j)
            codes[:, :, j] = c
            e = (t - s * (value(c) - z)) / d[j]
            score += e * e
            fb = e if G is None else e - G[:, j]
            Err[:, :, jj] = fb
            if jj + 1 < i2 - i1:
                if stacked:
                    Tb.view(P, E, m // E, -1)[..., jj + 1:] -= fb.view(P, E, -1, 1) * U[:, j, j + 1:i2].unsqueeze(1)
                else:
                    Tb[:, :, jj + 1:] -= fb.unsqueeze(-1) * U[j, j + 1:i2]
        if i2 < n and stacked:                  # one batched product: each problem's rows with its U
            subtract_stacked(T.view(P * m, n)[:, i2:], Err.view(P * m, i2 - i1), U[:, i1:i2, i2:], P)
        elif i2 < n:                            # one in-place product over all paths' rows
            T.view(P * m, n)[:, i2:].addmm_(Err.view(P * m, i2 - i1), U[i1:i2, i2:], alpha=-1.0)
    return codes, scale, zero, score


def subtract_stacked(T_rest: torch.Tensor, Err: torch.Tensor, U: torch.Tensor, paths: int) -> None:
    """`T_rest −= Err @ U[e]` for the rows of each problem `e` of a stack, in place, by one batched product
    (`torch.bmm`, `U` never broadcast over the paths). `T_rest` `(R, r)` and `Err` `(R, b)`: rows path-major,
    `R = paths·E·per`, each problem's `per` rows together; `U` `(E, b, r)`."""
    E, b, r = U.shape
    per = T_rest.shape[0] // (paths * E)
    A = Err.reshape(paths, E, per, b).transpose(0, 1).reshape(E, paths * per, b)
    T_rest.view(paths, E, per, r).sub_(torch.bmm(A, U).view(E, paths, per, r).transpose(0, 1))

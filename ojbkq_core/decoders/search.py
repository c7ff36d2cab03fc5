"""Bounded search: a beam of `width` partial paths per row (regularized-calibration paper), the reference
of the `beam` primitive (ojbkq_core.decoders.primitives).

At each column every beam expands to its `expand` nearest grid codes (neighbouring codes of the alphabet); the `width` best partial paths by
accumulated `Σ e²` survive. Ties keep the lower index first (a stable sort, not `topk`, whose order among
equal values is unspecified), so the device kernels take the same decisions. Lazy block updates as in the
walk: within a block the beams' block columns are reordered with them, the columns after the block get
one matrix product per block. Codes are recovered by back-pointers.
"""
from __future__ import annotations

import math

import torch

from ..grid import block_size_for
from ..problem import WorkingProblem


def smallest(x: torch.Tensor, k: int, dim: int):
    """The `k` smallest values of `x` along `dim` and their indices, ascending; equal values in index order."""
    values, idx = torch.sort(x, dim=dim, stable=True)
    return values.narrow(dim, 0, k), idx.narrow(dim, 0, k)


def beams(problem: WorkingProblem, width: int, expand: int, block: int = 128):
    """The `width` surviving beams of every row: `codes`, `scale`, `zero` `(B, m, n)`, `score` `(B, m)`."""
    B, E = width, expand
    U, grid, T0 = problem.U, problem.grid, problem.T
    m, n = T0.shape
    dev, dt = T0.device, T0.dtype
    T = T0.unsqueeze(0).expand(B, m, n).clone()
    score = torch.zeros(B, m, dtype=dt, device=dev)
    score[1:] = math.inf                                   # start from one path
    hist_code = torch.empty(n, B, m, dtype=dt, device=dev)
    hist_parent = torch.empty(n, B, m, dtype=torch.long, device=dev)
    hist_scale = torch.empty(n, B, m, dtype=dt, device=dev)
    hist_zero = torch.empty(n, B, m, dtype=dt, device=dev)
    offs = torch.arange(-E, E + 1, device=dev, dtype=dt)
    d = U.diagonal().unbind()                              # 0-d tensors: true division on CUDA too
    lower, upper = grid.lower.tolist(), grid.upper.tolist()
    alphabet = grid.alphabet
    sc = zc = None
    g = grid.group_size
    bs = block_size_for(g if grid.dynamic else -1, block)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        Tb = T[:, :, i1:i2].clone()
        Err = torch.zeros(B, m, i2 - i1, dtype=dt, device=dev)
        anc = torch.arange(B, device=dev).view(B, 1).expand(B, m).clone()
        for j in range(i1, i2):
            jj = j - i1
            if grid.dynamic:
                if j % g == 0:
                    src = T[:, :, j:j + g] if j == i1 else Tb[:, :, jj:jj + g]
                    sc, zc = grid.fit(src)
                s, z = sc, zc
            else:
                s, z = grid.scale[:, j].expand(B, m), grid.zero[:, j].expand(B, m)
            t = Tb[:, :, jj]
            c0 = alphabet.nearest(t, s, z, lower[j], upper[j])
            cc = c0.unsqueeze(-1) + offs                     # (B, m, 2E+1)
            err = (t.unsqueeze(-1) - s.unsqueeze(-1) * (alphabet.value(cc) - z.unsqueeze(-1))) / d[j]
            cost = (err * err).masked_fill((cc < lower[j]) | (cc > upper[j]), math.inf)
            cost, k = smallest(cost, min(E, cost.shape[-1]), -1)   # (B, m, E)
            cc, err = cc.gather(-1, k), err.gather(-1, k)
            total = (score.unsqueeze(-1) + cost).permute(0, 2, 1).reshape(-1, m)  # (B*E', m)
            score, idx = smallest(total, B, 0)
            Ek = cc.shape[-1]
            parent = idx // Ek
            c = cc.permute(0, 2, 1).reshape(-1, m).gather(0, idx)
            e = err.permute(0, 2, 1).reshape(-1, m).gather(0, idx)
            follow = parent.unsqueeze(-1).expand(B, m, i2 - i1)
            Tb = Tb.gather(0, follow)
            Err = Err.gather(0, follow)
            anc = anc.gather(0, parent)
            s, z = s.gather(0, parent), z.gather(0, parent)
            if grid.dynamic:
                sc, zc = s, z
            hist_code[j], hist_parent[j], hist_scale[j], hist_zero[j] = c, parent, s, z
            Err[:, :, jj] = e
            if jj + 1 < i2 - i1:
                Tb[:, :, jj + 1:] -= e.unsqueeze(-1) * U[j, j + 1:i2]
        T[:, :, i1:i2] = Tb
        if i2 < n:
            rest = T[:, :, i2:].gather(0, anc.unsqueeze(-1).expand(B, m, n - i2))
            T[:, :, i2:] = rest - Err @ U[i1:i2, i2:]
    # back-track every surviving beam
    codes = torch.empty(B, m, n, dtype=dt, device=dev)
    scale = torch.empty_like(codes)
    zero = torch.empty_like(codes)
    cur = torch.arange(B, device=dev).view(B, 1).expand(B, m)
    for j in range(n - 1, -1, -1):
        codes[:, :, j] = hist_code[j].gather(0, cur)
        scale[:, :, j] = hist_scale[j].gather(0, cur)
        zero[:, :, j] = hist_zero[j].gather(0, cur)
        cur = hist_parent[j].gather(0, cur)
    return codes, scale, zero, score

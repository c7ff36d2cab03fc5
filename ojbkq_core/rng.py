"""Counter-based uniforms: `uniform(seed, path, row, column, slot)` is a pure function.

Every random decoder draws through here, so a seed gives the same numbers on CPU and CUDA, however the
rows are chunked, and candidate `p` draws the same numbers whatever the number of candidates (more
candidates never change the earlier ones). The hash is a 32-bit integer mix computed in int64 without
overflow (every product stays below 2⁶³).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1, _C2, _C3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39
_PATH, _ROW, _COLUMN, _SLOT = 0x3504F333, 0x19E3779B, 0x2545F491, 0x0B5AD4EC   # what each counter is scaled by


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 16)
    x = (x * _C3) & _M32
    return x ^ (x >> 15)


def uniform(seed: int, path: torch.Tensor, row: torch.Tensor, column: int, slot: torch.Tensor,
            dtype=torch.float32) -> torch.Tensor:
    """Uniforms in (0, 1), broadcast over the int64 tensors `path`, `row`, `slot`."""
    x = _prefix(seed, path, row)
    x = _mix(x + (column * _COLUMN & _M32))
    x = _mix(x + slot * _SLOT)
    return to_unit(x, dtype)


def path_row_state(seed: int, paths: int, m: int, row0: int = 0, device="cpu") -> torch.Tensor:
    """`(paths·m,)` int64: the hash of (seed, path, row) that `uniform` builds before it mixes in the column
    and the slot; element `p·m + i` is path `p` of row `row0 + i`. Kernels that draw column by column
    start from it."""
    path = torch.arange(paths, device=device, dtype=torch.int64).view(-1, 1)
    row = (torch.arange(m, device=device, dtype=torch.int64) + row0).view(1, -1)
    return _prefix(seed, path, row).reshape(-1).contiguous()


def stack_state(seeds: torch.Tensor, rows: torch.Tensor, paths: int) -> torch.Tensor:
    """`path_row_state` of a stack of problems (`WorkingProblem.draws`): row `i` draws with seed `seeds[i]`
    as row `rows[i]` of its own problem; `(paths·m,)` int64, element `p·m + i` path `p` of row `i`."""
    path = torch.arange(paths, device=seeds.device, dtype=torch.int64).view(-1, 1)
    return _prefix(seeds.view(1, -1), path, rows.view(1, -1)).reshape(-1).contiguous()


def _prefix(seed: int, path: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The hash of (seed, path, row), broadcast over `path` and `row`."""
    x = _mix(path * _PATH + _mix(torch.as_tensor(seed & _M32, device=path.device)))
    return _mix(x + row * _ROW)


def to_unit(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """32-bit hashes `x` (int64) → uniforms `((x >> 8) + ½) / 2²⁴` in (0, 1). In float32 the largest,
    1 − 2⁻²⁵, would round to 1 (and a Gumbel draw −log(−log u) to +∞), so it is kept at the float just
    below 1."""
    u = ((x >> 8).to(dtype) + 0.5) / float(1 << 24)
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
    return torch.minimum(u, below_one.to(u.device))

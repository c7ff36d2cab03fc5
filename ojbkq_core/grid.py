"""The quantization grid (docs/formulation.md §3), and the `quant` section of a run (`QuantSpec`).

A code `c` in the box `[lower_j, upper_j]` dequantizes to `q = s · (c − z0)`. For a layer the box is
`[0, maxq]` and `(s, z0)` come per (row, group) from a min-max rule or a clipping search; for a
lattice-form BILS problem `s = 1`, `z0 = 0` and the box is the problem's.

Shapes: `w` is `(..., m, g)` (rows by the group's columns); `fit` returns `scale`, `zero` of shape
`(..., m)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import InputError

SCALE_METHODS = ("minmax", "clip")


@dataclass(frozen=True)
class GridSpec:
    """What the user asks for: bits, group size (`-1`: one group per row), symmetry, order and scale
    rule. The defaults are the run defaults (`QuantSpec` adds to them)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    scale_method: str = "minmax"
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise InputError(f"quant.bits={self.bits!r}: bits must be an integer from 2 to 8")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise InputError(f"quant.group_size={self.group_size!r}: use -1 (one group per row) or a positive integer")
        if self.scale_method not in SCALE_METHODS:
            raise InputError(f"quant.scale_method={self.scale_method!r}: choose one of {', '.join(SCALE_METHODS)}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def grid(self) -> "GridSpec":
        """The grid alone (a `QuantSpec` carries more)."""
        return GridSpec(self.bits, self.group_size, self.sym, self.act_order, self.static_groups, self.scale_method,
                        self.clip_grid, self.clip_max_shrink, self.clip_norm)

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of each row of `w` `(..., m, g)` → `(..., m)`, `(..., m)`."""
        if self.scale_method == "clip":
            return clip_search(w, self.maxq, self.sym, self.clip_grid, self.clip_max_shrink, self.clip_norm)
        return minmax(w, self.maxq, self.sym)


@dataclass(frozen=True)
class QuantSpec(GridSpec):
    """The `quant` section of a run: the grid, the damping of `H` (a fraction of its mean diagonal),
    the calibration order (true-sequential groups, or a block's modules all at once), the module-name
    patterns left in full precision (`skip`, fnmatch on full or block-relative names), and what an
    expert of a mixture-of-experts block routed fewer than `moe_min_tokens` calibration tokens is
    quantized with (`moe_fallback`: `rtn`, or `all_tokens` sent through it)."""

    damp: float = 0.01
    true_sequential: bool = True
    skip: tuple[str, ...] = ()
    moe_min_tokens: int = 32
    moe_fallback: str = "rtn"

    KEYS = ("bits", "group_size", "sym", "act_order", "static_groups", "damp", "scale_method", "true_sequential",
            "skip", "moe_min_tokens", "moe_fallback")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not self.damp >= 0:
            raise InputError(f"quant.damp={self.damp!r}: must be a number ≥ 0 (fraction of mean diag H, e.g. 0.01)")
        if isinstance(self.skip, str) or not all(isinstance(p, str) and p for p in self.skip):
            raise InputError(f"quant.skip={self.skip!r}: must be a list of module-name patterns")
        if isinstance(self.moe_min_tokens, bool) or not isinstance(self.moe_min_tokens, int) or self.moe_min_tokens < 0:
            raise InputError(f"quant.moe_min_tokens={self.moe_min_tokens!r}: must be an integer ≥ 0 (experts with "
                             f"fewer routed calibration tokens fall back to quant.moe_fallback)")
        if self.moe_fallback not in ("rtn", "all_tokens"):
            raise InputError(f"quant.moe_fallback={self.moe_fallback!r}: choose rtn (round to nearest) or all_tokens "
                             f"(calibrate the expert on every calibration token)")
        object.__setattr__(self, "damp", float(self.damp))
        object.__setattr__(self, "skip", tuple(self.skip))

    def to_dict(self) -> dict:
        """The section as a recipe writes it (keys in `KEYS` order)."""
        return {k: (list(self.skip) if k == "skip" else getattr(self, k)) for k in self.KEYS}


def _params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def minmax(w: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max rule: `xmin = min(min w, 0)`, `xmax = max(max w, 0)` over the last axis."""
    zero_ = torch.zeros((), dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.amin(-1), zero_)
    xmax = torch.maximum(w.amax(-1), zero_)
    return _params(xmin, xmax, maxq, sym)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round-to-nearest codes of `w` on the grid `(scale, zero)` (broadcast), clamped to `[0, maxq]`."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def clip_search(w, maxq, sym, grid=100, max_shrink=0.8, norm=2.4):
    """Shrink the min-max range by `p ∈ (1 − max_shrink, 1]` and keep, per row, the `p` whose grid
    reproduces `w` with the least `Σ |q − w|^norm` (GPTQ's `mse` option)."""
    zero_ = torch.zeros((), dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.amin(-1), zero_)
    xmax = torch.maximum(w.amax(-1), zero_)
    best_scale, best_zero = _params(xmin, xmax, maxq, sym)
    best = torch.full_like(best_scale, float("inf"))
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = _params(p * xmin, p * xmax, maxq, sym)
        c = quantize(w, scale[..., None], zero[..., None], maxq)
        err = ((scale[..., None] * (c - zero[..., None]) - w).abs() ** norm).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@dataclass
class Grid:
    """The grid a decoder walks on, in decoding order.

    `lower`, `upper`: `(n,)` code bounds (float tensors holding integers).
    Static grid: `scale`, `zero` `(m, n)`. Dynamic grid: `fit` maps the current targets of a group
    `(..., m, g)` to `(scale, zero)` `(..., m)`, called when decoding enters column `j` with
    `j % group_size == 0`; each candidate path fits its own.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    group_size: int = -1
    fit: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def dynamic(self) -> bool:
        return self.fit is not None

    def rows(self, sl: slice) -> "Grid":
        """The same grid restricted to rows `sl`."""
        return Grid(
            self.lower, self.upper,
            None if self.scale is None else self.scale[sl],
            None if self.zero is None else self.zero[sl],
            self.group_size, self.fit,
        )

    def initial(self, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero `(m, n)` before decoding: the static grid, or a dynamic grid fitted to `T`."""
        if not self.dynamic:
            return self.scale, self.zero
        m, n = T.shape
        g = self.group_size
        scale = torch.empty_like(T)
        zero = torch.empty_like(T)
        for j in range(0, n, g):
            s, z = self.fit(T[:, j:j + g])
            scale[:, j:j + g] = s[:, None]
            zero[:, j:j + g] = z[:, None]
        return scale, zero


def block_size_for(group_size: int, preferred: int = 128) -> int:
    """A lazy-update block size whose block starts include every group start (so a dynamic grid is
    fitted on fully updated targets)."""
    if group_size <= 0 or preferred % group_size == 0 or group_size % preferred == 0:
        return preferred
    return group_size

"""The quantization grid (docs/formulation.md §3), and the `quant` section of a run (`QuantSpec`).

A code `c` in the box `[lower_j, upper_j]` indexes a value `a(c)` of the grid's alphabet and dequantizes to
`q = s · (a(c) − z0)`. The alphabet of an integer grid is the integers themselves (`a(c) = c`); an FP4
grid's is the 15 values of E2M1, sorted, `a(0) = −6 … a(7) = 0 … a(14) = 6`. For a layer the box is
`[0, maxq]` and `(s, z0)` come per (row, group) from a min-max rule, a clipping search or the FP4 formats'
scale rules (`z0 = 0`); for a lattice-form BILS problem `s = 1`, `z0 = 0` and the box is the problem's.

Shapes: `w` is `(..., m, g)` (rows by the group's columns); `fit` returns `scale`, `zero` of shape
`(..., m)`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import InputError

SCALE_METHODS = ("minmax", "clip")
GRIDS = ("int", "nvfp4", "mxfp4")
FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Alphabet:
    """The values codes index: code `c` ↦ `values[c]`, sorted ascending; `values=None` is the integers
    (`c ↦ c`, any box). Rounding to nearest breaks a tie between two values toward the code of parity
    `tie_parity` (FP4: the value with an even mantissa, as the formats' casts do); the integers round
    half to even (`torch.round`)."""

    values: Optional[tuple] = None
    name: str = "int"
    tie_parity: int = 0

    @property
    def uniform(self) -> bool:
        return self.values is None

    @property
    def size(self) -> Optional[int]:
        return None if self.values is None else len(self.values)

    def table(self, like: torch.Tensor) -> torch.Tensor:
        """`values` `(K,)` in `like`'s dtype and device (made once per dtype and device: the walk asks every
        column)."""
        return _table(self.values, like.dtype, like.device)

    def value(self, c: torch.Tensor) -> torch.Tensor:
        """`a(c)` of codes `c` (a float tensor holding integers), same shape and dtype; codes outside
        `[0, K)` read the nearest end (callers mask them)."""
        if self.values is None:
            return c
        return self.table(c)[c.long().clamp(0, len(self.values) - 1)]

    def nearest(self, t, scale, zero, lo, hi):
        """The code of the value nearest `t / scale + zero`, clamped to the box `[lo, hi]` (broadcast)."""
        if self.values is None:
            return torch.clamp(torch.round(t / scale) + zero, lo, hi)
        x = (t / scale + zero).contiguous()
        v = self.table(x)
        i = torch.searchsorted(v, x).clamp(1, len(self.values) - 1)   # v[i-1] < x <= v[i]
        below, above = x - v[i - 1], v[i] - x
        odd = i - (i % 2 != self.tie_parity).long()                  # of i-1, i the one of the tie parity
        c = torch.where(above < below, i, torch.where(above > below, i - 1, odd))
        return torch.clamp(c.to(x.dtype), lo, hi)

    @property
    def gaps(self) -> tuple[float, float]:
        """The least and the largest distance between neighbouring values (1, 1 for the integers)."""
        if self.values is None:
            return 1.0, 1.0
        d = [b - a for a, b in zip(self.values, self.values[1:])]
        return min(d), max(d)


@functools.lru_cache(maxsize=None)
def _table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


INTEGERS = Alphabet()
E2M1 = Alphabet(tuple(sorted({-v for v in E2M1_MAGNITUDES if v} | set(E2M1_MAGNITUDES))), "fp4_e2m1", tie_parity=1)


@dataclass(frozen=True)
class GridSpec:
    """What the user asks for: bits, group size (`-1`: one group per row), symmetry, order and scale
    rule, and the grid (`int`: `2^bits` integer codes with a scale and zero point; `nvfp4`: FP4 E2M1 values
    in groups of 16 with an FP8 E4M3 scale under a per-tensor FP32 scale; `mxfp4`: FP4 E2M1 values in
    groups of 32 with a power-of-two scale; the FP4 grids have no zero point and ignore `sym`). The
    defaults are the run defaults (`QuantSpec` adds to them)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    scale_method: str = "minmax"
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    grid: str = "int"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise InputError(f"quant.bits={self.bits!r}: bits must be an integer from 2 to 8")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise InputError(f"quant.group_size={self.group_size!r}: use -1 (one group per row) or a positive integer")
        if self.scale_method not in SCALE_METHODS:
            raise InputError(f"quant.scale_method={self.scale_method!r}: choose one of {', '.join(SCALE_METHODS)}")
        if self.grid not in GRIDS:
            raise InputError(f"quant.grid={self.grid!r}: choose one of {', '.join(GRIDS)}")
        if self.grid != "int":
            if self.bits != 4:
                raise InputError(f"quant.grid={self.grid} stores 4-bit codes (FP4 E2M1): set quant.bits=4")
            if self.group_size != FP4_GROUP[self.grid]:
                raise InputError(f"quant.grid={self.grid} scales groups of {FP4_GROUP[self.grid]} inputs: set "
                                 f"quant.group_size={FP4_GROUP[self.grid]} (got {self.group_size})")

    @property
    def alphabet(self) -> Alphabet:
        return INTEGERS if self.grid == "int" else E2M1

    @property
    def maxq(self) -> int:
        """The largest code (codes are `0 … maxq`)."""
        return 2**self.bits - 1 if self.grid == "int" else E2M1.size - 1

    @property
    def grid_spec(self) -> "GridSpec":
        """The grid alone (a `QuantSpec` carries more)."""
        return GridSpec(self.bits, self.group_size, self.sym, self.act_order, self.static_groups, self.scale_method,
                        self.clip_grid, self.clip_max_shrink, self.clip_norm, self.grid)

    def fit(self, w: torch.Tensor, global_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of each row of `w` `(..., m, g)` → `(..., m)`, `(..., m)`. `nvfp4` needs the
        tensor's `global_scale` (`global_scale_of`)."""
        if self.grid != "int":
            return fp4_fit(w, self.grid, global_scale, self.scale_method == "clip", self.clip_grid,
                           self.clip_max_shrink, self.clip_norm)
        if self.scale_method == "clip":
            return clip_search(w, self.maxq, self.sym, self.clip_grid, self.clip_max_shrink, self.clip_norm)
        return minmax(w, self.maxq, self.sym)

    def global_scale_of(self, W: torch.Tensor) -> Optional[float]:
        """The per-tensor FP32 scale of an `nvfp4` layer `W` `(m, n)`, `448 · 6 / max |W|` (1 for a zero
        tensor); None for other grids."""
        if self.grid != "nvfp4":
            return None
        amax = float(W.abs().max()) if W.numel() else 0.0
        g = torch.tensor(E4M3_MAX * 6.0, dtype=torch.float32) / torch.tensor(amax, dtype=torch.float32)
        return float(g) if amax > 0 and torch.isfinite(g) else 1.0


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
            "skip", "moe_min_tokens", "moe_fallback", "grid")

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


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to FP8 E4M3 (saturating at ±448), back in `x`'s dtype."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def mx_scale(amax: torch.Tensor) -> torch.Tensor:
    """MXFP4's power-of-two scale of a group with largest magnitude `amax`: `2^(e − 2)`, `e` the exponent of
    `amax` rounded up when its mantissa is at least 1.75 (the OCP reference as compressed-tensors computes
    it; 2 = ⌊log2 6⌋), at least 2^−127."""
    a = amax.float().clamp_min(torch.finfo(torch.float32).tiny)
    mant, exp = torch.frexp(a)                         # a = mant · 2^exp, mant in [0.5, 1)
    e = (exp - 1) + (mant >= 0.875).int()
    return torch.pow(2.0, (e - 2).clamp(-127, 127).float()).to(amax.dtype)


def fp4_fit(w: torch.Tensor, grid: str, global_scale: Optional[float] = None, search: bool = False,
            steps: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale `(..., m)` (zero point 0) of each row of the group `w` `(..., m, g)` on an FP4 grid.

    `nvfp4`: `e4m3(max|w| / 6 · global) / global`, the scale dequantizing to the FP8 value stored under the
    tensor's `global_scale`; `mxfp4`: `mx_scale(max|w|)`. With `search`, each row keeps, of the reference scale
    and the others tried, the one whose grid reproduces `w` with the least `Σ |q − w|^norm`: `nvfp4` tries the
    scale of every shrink `p ∈ (1 − max_shrink, 1]` of `max|w|`, `mxfp4` the reference scale times 1/4, 1/2
    and 2. A row of zeros gets the smallest positive scale of its format.
    """
    amax = w.abs().amax(-1)
    zero = torch.zeros_like(amax)

    def scale_for(a):
        if grid == "mxfp4":
            return mx_scale(a)
        if global_scale is None:
            raise ValueError("nvfp4 needs the tensor's global scale")
        gs = torch.tensor(global_scale, dtype=a.dtype, device=a.device)
        s = e4m3(a / 6.0 * gs) / gs
        return torch.where(s > 0, s, 0.125 / gs)          # FP8's epsilon, as compressed-tensors stores it

    best = scale_for(amax)
    if not search:
        return best, zero
    err_of = lambda s: ((s[..., None] * E2M1.value(E2M1.nearest(w, s[..., None], 0.0, 0, E2M1.size - 1))  # noqa: E731
                         - w).abs() ** norm).sum(-1)
    best_err = err_of(best)
    if grid == "mxfp4":             # the representable scales near the reference one: 2^k times it
        tries = [best * 2.0 ** k for k in (-2, -1, 1)]
    else:
        tries = (scale_for(amax * (1 - i / steps)) for i in range(1, int(max_shrink * steps)))
    for s in tries:
        e = err_of(s)
        better = e < best_err
        best_err, best = torch.where(better, e, best_err), torch.where(better, s, best)
    return best, zero


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
    `j % group_size == 0`; each candidate path fits its own. `alphabet`: the values the codes index
    (the integers unless an FP4 grid); a code `c` dequantizes to `scale · (alphabet.value(c) − zero)`.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    group_size: int = -1
    fit: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None
    alphabet: Alphabet = INTEGERS

    @property
    def dynamic(self) -> bool:
        return self.fit is not None

    def rows(self, sl: slice) -> "Grid":
        """The same grid restricted to rows `sl`."""
        return Grid(
            self.lower, self.upper,
            None if self.scale is None else self.scale[sl],
            None if self.zero is None else self.zero[sl],
            self.group_size, self.fit, self.alphabet,
        )

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """`scale · (a(codes) − zero)` (broadcast)."""
        return scale * (self.alphabet.value(codes) - zero)

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

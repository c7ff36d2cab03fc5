"""Problems a decoder solves (docs/formulation.md §4).

`BILSProblem` is the lattice form: `min_z ‖y − A z‖²` with `lower ≤ z ≤ upper`, one column of `y` per
right-hand side, `A` `(m, n)` of full column rank or upper-triangular `R` `(n, n)`.

`WorkingProblem` is the layer form every decoder walks, already in decoding order: the upper Cholesky
factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ U`), targets `T` `(rows, n)` (one row per right-hand side), a `Grid`,
and optionally the base weights and injection of successive rounding (`T_j = W_j + Σ_{k≤j} G_k U_kj`).
The objective of a row is `(t − q)ᵀ H (t − q) = Σ_j e_j²` with `e_j = (t_j − q_j) / U_jj` along the walk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .errors import InputError
from .grid import Grid


@dataclass
class WorkingProblem:
    """Decoder input, in decoding order. `U` `(n, n)` upper triangular, `T` `(m, n)`, float32/64.

    `base` `(m, n)` and `inject` `(m, n)`: successive rounding's form of the same target (optional).
    `score`: an object mapping candidates' dequantized values `(..., m, n)` to a per-row score
    `(..., m)` used to choose among candidates, with `.rows(slice)`; `None` means the path
    objective `Σ e_j²`.

    Stacked (`stack`): `E` problems of `m/E` rows each, decoded together, `U` `(E, n, n)` (problem `e` owns
    rows `e·m/E … (e+1)·m/E − 1`); `draws` `(seeds, rows)` `(m,)` int64: the seed and the row index each
    row draws its random numbers with, as its own problem's call would.
    """

    U: torch.Tensor
    T: torch.Tensor
    grid: Grid
    base: Optional[torch.Tensor] = None
    inject: Optional[torch.Tensor] = None
    score: Optional[Any] = None
    draws: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def problems(self) -> int:
        """How many problems are stacked (1 for a plain problem)."""
        return 1 if self.U.dim() == 2 else self.U.shape[0]

    def diagonal(self) -> torch.Tensor:
        """`U_jj`: `(n,)`, or `(m, n)` per row of a stacked problem."""
        d = self.U.diagonal(dim1=-2, dim2=-1)
        return d if self.U.dim() == 2 else d.repeat_interleave(self.m // self.problems, 0)

    @property
    def m(self) -> int:
        return self.T.shape[0]

    @property
    def n(self) -> int:
        return self.T.shape[1]

    def rows(self, sl: slice) -> "WorkingProblem":
        """Rows `sl` (of a stacked problem: whole problems, `sl` starting and ending on their boundaries)."""
        score = None if self.score is None else self.score.rows(sl)
        U = self.U
        if U.dim() == 3:
            per = self.m // self.problems
            start, stop, _ = sl.indices(self.m)
            if start % per or stop % per:
                raise ValueError(f"rows {start}:{stop} of a stack of problems of {per} rows split a problem")
            U = U[start // per:stop // per]
        return WorkingProblem(
            U, self.T[sl], self.grid.rows(sl),
            None if self.base is None else self.base[sl],
            None if self.inject is None else self.inject[sl],
            score, None if self.draws is None else (self.draws[0][sl], self.draws[1][sl]),
        )

    @classmethod
    def stack(cls, problems: list["WorkingProblem"], seeds: list[int]) -> "WorkingProblem":
        """Problems of one shape and grid kind, each with its own `U`, as one stacked problem; problem `e`'s
        rows draw with seed `seeds[e]` and their own row indices. Scores are stacked by their `stack`."""
        first = problems[0]
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        g = first.grid
        grid = type(g)(g.lower, g.upper, cat([p.grid.scale for p in problems]), cat([p.grid.zero for p in problems]),
                       g.group_size, g.fit, g.alphabet)
        m = first.m
        dev = first.T.device
        seed = torch.tensor(seeds, dtype=torch.int64, device=dev).repeat_interleave(m)
        row = torch.arange(m, dtype=torch.int64, device=dev).repeat(len(problems))
        score = None if first.score is None else type(first.score).stack([p.score for p in problems])
        return cls(torch.stack([p.U for p in problems]), torch.cat([p.T for p in problems]), grid,
                   cat([p.base for p in problems]), cat([p.inject for p in problems]), score, (seed, row))

    def lattice(self):
        """Per-row lower-triangular lattice form: `Rl = U⁻ᵀ` `(n, n)` with `H = Rlᵀ Rl`, so a row's
        objective is `‖Rl (t − q)‖²` and coordinate `k` of `Rl` involves only codes `≤ k`."""
        n = self.n
        eye = torch.eye(n, dtype=self.U.dtype, device=self.U.device)
        return torch.linalg.solve_triangular(self.U, eye, upper=True).T.contiguous()


def _as_float(name, x, path):
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{path}: '{name}' must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{path}: '{name}' contains NaN or inf")
    return arr


def _as_bound(name, x, n, path):
    arr = np.asarray(x)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"{path}: '{name}' must hold integers")
    elif arr.dtype.kind not in "iu":
        raise InputError(f"{path}: '{name}' must be an integer scalar or an integer array of shape ({n},)")
    if arr.ndim == 0:
        arr = np.full(n, int(arr))
    if arr.shape != (n,):
        raise InputError(f"{path}: '{name}' has shape {arr.shape}; expected a scalar or ({n},)")
    return arr.astype(np.int64)


@dataclass
class BILSProblem:
    """`min ‖y − A z‖²`, `lower ≤ z ≤ upper`, z integer; `y` `(m,)` or `(m, p)`.

    Exactly one of `A` `(m, n)` and `R` `(n, n)` upper triangular is given. Arrays are float64 numpy.
    """

    y: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    A: Optional[np.ndarray] = None
    R: Optional[np.ndarray] = None
    source: str = field(default="problem", repr=False)

    @classmethod
    def create(cls, y, lower, upper, A=None, R=None, source="problem") -> "BILSProblem":
        """Validate and build; errors name `source` and the array at fault."""
        if (A is None) == (R is None):
            raise InputError(f"{source}: give exactly one of 'A' (m, n) and 'R' (n, n)")
        if A is not None:
            A = _as_float("A", A, source)
            if A.ndim != 2:
                raise InputError(f"{source}: 'A' must be 2-D (m, n), got shape {A.shape}")
            m, n = A.shape
            if m < n or np.linalg.matrix_rank(A) < n:
                raise InputError(f"{source}: 'A' {A.shape} must have full column rank (rank {np.linalg.matrix_rank(A)} < n={n})")
        else:
            R = _as_float("R", R, source)
            if R.ndim != 2 or R.shape[0] != R.shape[1]:
                raise InputError(f"{source}: 'R' must be square (n, n), got shape {R.shape}")
            if not np.allclose(R, np.triu(R)):
                raise InputError(f"{source}: 'R' must be upper triangular (entries below the diagonal are non-zero)")
            if np.any(np.diag(R) == 0):
                raise InputError(f"{source}: 'R' is singular: its diagonal has a zero at index {int(np.flatnonzero(np.diag(R) == 0)[0])}")
            m = n = R.shape[0]
        y = _as_float("y", y, source)
        if y.ndim not in (1, 2) or y.shape[0] != m:
            raise InputError(f"{source}: 'y' has shape {y.shape}; expected ({m},) or ({m}, p)")
        lower = _as_bound("lower", lower, n, source)
        upper = _as_bound("upper", upper, n, source)
        bad = np.flatnonzero(lower > upper)
        if bad.size:
            j = int(bad[0])
            raise InputError(f"{source}: box is empty at coordinate {j}: lower={lower[j]} > upper={upper[j]}")
        return cls(y=y, lower=lower, upper=upper, A=A, R=R, source=source)

    @classmethod
    def load(cls, path) -> "BILSProblem":
        """Read an `.npz` with `A` or `R`, `y`, `lower`, `upper` (docs/interfaces.md)."""
        import os
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file")
        try:
            data = np.load(path)
        except Exception as exc:  # not an npz, truncated, ...
            raise InputError(f"{path}: cannot read as .npz ({exc})") from None
        keys = set(data.files)
        missing = {"y", "lower", "upper"} - keys
        if missing:
            raise InputError(f"{path}: missing array(s) {', '.join(sorted(missing))}")
        unknown = keys - {"A", "R", "y", "lower", "upper"}
        if unknown:
            raise InputError(f"{path}: unknown array(s) {', '.join(sorted(unknown))}; expected A or R, y, lower, upper")
        return cls.create(data["y"], data["lower"], data["upper"], A=data.get("A"), R=data.get("R"), source=str(path))

    @property
    def n(self) -> int:
        return (self.A if self.A is not None else self.R).shape[1]

    @property
    def basis(self) -> np.ndarray:
        return self.A if self.A is not None else self.R

    @property
    def Y(self) -> np.ndarray:
        """`y` as `(m, p)`."""
        return self.y if self.y.ndim == 2 else self.y[:, None]

    def residual(self, Z: np.ndarray) -> np.ndarray:
        """`‖y − A z‖²` per right-hand side; `Z` `(n,)` or `(n, p)` → `()` or `(p,)`."""
        Z2 = Z if Z.ndim == 2 else Z[:, None]
        r = ((self.Y - self.basis @ Z2.astype(np.float64)) ** 2).sum(0)
        return r if Z.ndim == 2 else r[0]

    def working(self, device="cpu", dtype=torch.float64) -> tuple[WorkingProblem, np.ndarray, np.ndarray]:
        """The layer form: `H = AᵀA`, one row per right-hand side with target `t = A⁺ y`, scale 1.

        Decoding order is `n−1, …, 0` so that babai is the textbook back substitution on `R`.
        Returns the working problem, the decoding order `perm` `(n,)` and the constant `(p,)` with
        `‖y − A z‖² = (t − z)ᵀ H (t − z) + const`.
        """
        B = self.basis
        Q, R = np.linalg.qr(B)
        qy = Q.T @ self.Y                                    # (n, p)
        t = np.linalg.solve(R, qy)                           # (n, p): A⁺ y
        const = (self.Y**2).sum(0) - (qy**2).sum(0)
        perm = np.arange(self.n)[::-1].copy()
        Rp = R[:, perm]
        # H in decoding order = Rpᵀ Rp; H⁻¹ = Uᵀ U with U upper triangular.
        _, Rq = np.linalg.qr(Rp)                             # Rp = Q' Rq, Rq upper: H = Rqᵀ Rq
        Rinv = np.linalg.solve(Rq, np.eye(self.n))           # H⁻¹ = Rinv Rinvᵀ
        U = _upper_cholesky_of_inverse(Rinv)
        T = t[perm, :].T                                     # (p, n)
        lower = self.lower[perm].astype(np.float64)
        upper = self.upper[perm].astype(np.float64)
        m = T.shape[0]
        tt = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
        grid = Grid(tt(lower), tt(upper), torch.ones(m, self.n, dtype=dtype, device=device),
                    torch.zeros(m, self.n, dtype=dtype, device=device))
        return WorkingProblem(tt(U), tt(T), grid), perm, np.maximum(const, 0.0)


def _upper_cholesky_of_inverse(Rinv: np.ndarray) -> np.ndarray:
    """Given `H⁻¹ = Rinv Rinvᵀ` (Rinv upper), return upper `U` with `H⁻¹ = Uᵀ U`."""
    # Rinv Rinvᵀ = (Rinvᵀ)ᵀ Rinvᵀ with Rinvᵀ lower; an RQ step turns it upper: Rinvᵀ = Q U.
    _, U = np.linalg.qr(Rinv.T)
    sign = np.sign(np.diag(U))
    sign[sign == 0] = 1
    return U * sign[:, None]

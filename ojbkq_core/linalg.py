"""Damped factorisation of `H` with a clear error (docs/formulation.md §1, §4)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .errors import FactorizationError

log = logging.getLogger("ojbkq")


def _why_not(L: torch.Tensor, info: torch.Tensor) -> Optional[str]:
    """Why a Cholesky factor `L` is unusable (None when it is usable): a non-positive pivot, a non-finite
    entry, or pivots so spread that the matrix is singular at working precision,
    `(max L_jj / min L_jj)² > 1/eps` (a lower bound of its condition number)."""
    if int(info) != 0:
        return "not positive definite"
    if not torch.isfinite(L).all():
        return "non-finite factor"
    d = L.diagonal().abs()
    if float((d.max() / d.min()) ** 2) > 1 / torch.finfo(L.dtype).eps:
        return "singular at working precision"
    return None


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, retries: int = 6,
                     steps: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`U` upper triangular with `(H + δ·mean(diag H)·I)⁻¹ = Uᵀ U`.

    When the factorisation of the damped `H` or of its inverse fails (`_why_not`: not positive
    definite, non-finite, or singular at working precision) the damping is multiplied by 10 (from 0:
    set to 1e-6), up to `retries` times, each step logged. Every damping tried is appended to `steps`
    when given (the last one is the one used). Returns `U`, the damped `H` and the damping used.
    `H` `(n, n)` float32/64.
    """
    n = H.shape[0]
    mean_diag = H.diagonal().mean()

    def attempt(delta):
        Hd = H.clone()
        Hd.diagonal().add_(delta * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        why = _why_not(L, info)
        if why is not None:
            return None, why
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
        why = _why_not(U.T, info)
        return (U, Hd), None if why is None else f"its inverse is {why}"
    (U, Hd), delta = _raising_damping(attempt, n, damp, retries, steps)
    return U, Hd, delta


def _raising_damping(attempt, n: int, damp: float, retries: int, steps: Optional[list]):
    """`attempt(δ) → (result, why it failed or None)` for `δ = damp`, then ×10 (from 0: 1e-6) up to `retries`
    times, each failure logged and each `δ` appended to `steps`; returns the first result and its `δ`, or
    raises `FactorizationError` (`n`: the matrix's size, for the messages)."""
    delta = damp
    for i in range(retries + 1):
        if steps is not None:
            steps.append(delta)
        out, why = attempt(delta)
        if why is None:
            if i:
                log.warning("Cholesky succeeded after raising damping to %g", delta)
            return out, delta
        nxt = delta * 10 if delta > 0 else 1e-6
        log.warning("Cholesky of the damped H (n=%d) failed at damping %g (%s); retrying with %g", n, delta, why, nxt)
        delta = nxt
    raise FactorizationError(
        f"Cholesky of H (n={n}) failed even at damping {delta / 10:g}: H is not positive definite; "
        f"check the calibration inputs for NaN/inf or raise quant.damp")


def inverse_cholesky_blocked(build, damp: float = 0.01, block: int = 4096, retries: int = 6,
                             steps: Optional[list] = None) -> tuple[torch.Tensor, float, float]:
    """`inverse_cholesky` for a matrix too large to copy: `U` upper with `(H + δ·mean(diag H)·I)⁻¹ = Uᵀ U`,
    computed in place in column blocks of `block`, so that the working set is `H` itself plus a few
    `(n, block)` tensors (the whole-matrix form holds about five `(n, n)` tensors at once).

    `build()` returns a fresh `H` `(n, n)` float32/64 (symmetric), which is overwritten by `U`; it is called
    again for each damping tried. With `H = V Vᵀ` (`V` upper, `_reverse_cholesky_`), `U = V⁻¹`
    (`_invert_upper_`): the same factor as `inverse_cholesky`'s up to rounding, since the upper factor of
    `H⁻¹` with a positive diagonal is unique. Returns `U`, the damping used and `mean(diag H)`.
    """
    fresh = [build()]                                   # the first attempt's H (its size for the messages)
    n = fresh[0].shape[0]

    def attempt(delta):
        A = fresh.pop() if fresh else build()
        mean_diag = float(A.diagonal().mean())
        A.diagonal().add_(delta * mean_diag)
        why = _reverse_cholesky_(A, block)
        if why is not None:
            return None, why
        _invert_upper_(A, block)
        if not all(bool(torch.isfinite(A[:, c:c + block]).all()) for c in range(0, A.shape[0], block)):
            return None, "its inverse is non-finite"
        return (A, mean_diag), None
    (U, mean_diag), delta = _raising_damping(attempt, n, damp, retries, steps)
    return U, delta, mean_diag


def _reverse_cholesky_(A: torch.Tensor, bs: int) -> Optional[str]:
    """In place: `A = V Vᵀ` with `V` upper triangular (positive diagonal), `V` left in `A` (zeros below the
    diagonal); the Cholesky factorisation run from the last column block to the first. Reads only the upper
    triangle and the diagonal blocks of `A`. Returns why it failed (`_why_not`), or None."""
    n = A.shape[0]
    starts = list(range(0, n, bs))
    for a in reversed(starts):
        b = min(a + bs, n)
        L, info = torch.linalg.cholesky_ex(A[a:b, a:b].flip(0, 1))     # J A_kk J = L Lᵀ → A_kk = (J L J)(J L J)ᵀ
        if int(info) != 0:
            return "not positive definite"
        V = L.flip(0, 1)
        if not bool(torch.isfinite(V).all()):
            return "non-finite factor"
        A[a:b, a:b] = V
        if a == 0:
            break
        P = torch.linalg.solve_triangular(V.T, A[:a, a:b], upper=False, left=False)   # P Vᵀ = A[:a, block]
        A[:a, a:b] = P
        for c0 in range(0, a, bs):                        # A[:a, :a] −= P Pᵀ, one column strip at a time
            c1 = min(c0 + bs, a)
            A[:c1, c0:c1].addmm_(P[:c1], P[c0:c1].T, alpha=-1.0)
        del P
    for c0 in starts:                                     # the lower triangle holds stale values
        A[c0 + bs:, c0:c0 + bs] = 0
    d = A.diagonal()
    if float((d.max() / d.min()) ** 2) > 1 / torch.finfo(A.dtype).eps:
        return "singular at working precision"
    return None


def _invert_upper_(A: torch.Tensor, bs: int) -> None:
    """In place: upper triangular `A` (zeros below the diagonal) → `A⁻¹`, by column blocks: with the leading
    block already inverted, `[[V₁₁, V₁₂], [0, V₂₂]]⁻¹ = [[V₁₁⁻¹, −V₁₁⁻¹ V₁₂ V₂₂⁻¹], [0, V₂₂⁻¹]]`."""
    n = A.shape[0]
    for j0 in range(0, n, bs):
        j1 = min(j0 + bs, n)
        eye = torch.eye(j1 - j0, dtype=A.dtype, device=A.device)
        inv = torch.linalg.solve_triangular(A[j0:j1, j0:j1], eye, upper=True)
        if j0:
            A[:j0, j0:j1] = -((A[:j0, :j0] @ A[:j0, j0:j1]) @ inv)
        A[j0:j1, j0:j1] = inv

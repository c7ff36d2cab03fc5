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
    delta = damp
    for attempt in range(retries + 1):
        if steps is not None:
            steps.append(delta)
        Hd = H.clone()
        Hd.diagonal().add_(delta * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        why = _why_not(L, info)
        if why is None:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            why = _why_not(U.T, info)
            if why is None:
                if attempt:
                    log.warning("Cholesky succeeded after raising damping to %g", delta)
                return U, Hd, delta
            why = f"its inverse is {why}"
        nxt = delta * 10 if delta > 0 else 1e-6
        log.warning("Cholesky of the damped H (n=%d) failed at damping %g (%s); retrying with %g", n, delta, why, nxt)
        delta = nxt
    raise FactorizationError(
        f"Cholesky of H (n={n}) failed even at damping {delta / 10:g}: H is not positive definite; "
        f"check the calibration inputs for NaN/inf or raise quant.damp")

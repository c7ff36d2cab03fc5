"""Damped factorisation of `H` with a clear error (MATH.md §1, §4)."""
from __future__ import annotations

import logging

import torch

from .errors import FactorizationError

log = logging.getLogger("ojbkq")


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, retries: int = 6) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`U` upper triangular with `(H + δ·mean(diag H)·I)⁻¹ = Uᵀ U`.

    When the factorisation fails the damping is multiplied by 10 (logged), up to `retries` times.
    Returns `U`, the damped `H` and the damping used. `H` `(n, n)` float32/64.
    """
    n = H.shape[0]
    mean_diag = H.diagonal().mean()
    delta = damp
    for attempt in range(retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(delta * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("Cholesky succeeded after raising damping to %g", delta)
                return U, Hd, delta
        log.warning("Cholesky of the damped H (n=%d) failed at damping %g; retrying with %g", n, delta, delta * 10)
        delta = delta * 10 if delta > 0 else 1e-6
    raise FactorizationError(
        f"Cholesky of H (n={n}) failed even at damping {delta / 10:g}: H is not positive definite; "
        f"check the calibration inputs for NaN/inf or raise quant.damp")

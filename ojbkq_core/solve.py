"""Solve a lattice-form BILS problem with any decoder (docs/formulation.md §4)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .decoders.base import Decoder
from .problem import BILSProblem


@dataclass
class Solution:
    """`z` int64 `(n,)` or `(n, p)` in the original coordinate order (matching `y`);
    `residual` float64 `()` or `(p,)`: `‖y − A z‖²` recomputed from `A`, `y` and `z`."""

    z: np.ndarray
    residual: np.ndarray
    info: dict


def solve(problem: BILSProblem, decoder: Decoder, seed: int = 0, device: str = "cpu") -> Solution:
    wp, perm, _ = problem.working(device=device, dtype=torch.float64)
    res = decoder.decode(wp, seed=seed)
    codes = np.rint(res.codes.cpu().numpy()).astype(np.int64)        # (p, n), decoding order
    Z = np.empty((problem.n, codes.shape[0]), dtype=np.int64)
    Z[perm, :] = codes.T
    if problem.y.ndim == 1:
        Z = Z[:, 0]
    return Solution(Z, np.asarray(problem.residual(Z), dtype=np.float64), res.info)

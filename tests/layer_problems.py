"""Synthetic layer problems for the decoder backends' tests: inputs with a decaying spectrum, their
full-precision twins and the statistics a layer quantizer reads."""
from __future__ import annotations

import torch

from ojbkq_core.stats import Statistics


def synthetic_layer(m: int, n: int, N: int = 200, seed: int = 0, device="cpu"):
    """`(W, stats)`: weights `(m, n)` and `Statistics` (H, C, G) of `N` inputs `X = Z A` (`A`'s columns
    decay over two decades) and `X̃ = X + 0.1 Z' A`."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)
    X = torch.randn(N, n, generator=g) @ A
    Xfp = X + 0.1 * torch.randn(N, n, generator=g) @ A
    W = torch.randn(m, n, generator=g)
    st = Statistics.from_inputs(X.to(device), Xfp.to(device), needs=("H", "C", "G"))
    return W.to(device), st

"""Streaming calibration statistics (docs/formulation.md §1).

`H = X Xᵀ / N`, `C = X̃ Xᵀ / N`, `G = X̃ X̃ᵀ / N` with inputs given as token rows: `X`, `X̃` `(N, n)`
(or `(..., n)`, flattened). Sums are accumulated by matrix products in float32 (float64 when asked) on
the inputs' device; only the statistics named in `needs` are computed. bf16/fp16 inputs on a CUDA device
are multiplied as they are, on the tensor cores, with float32 accumulation and a float32 result (the
product of two bf16 or fp16 numbers is exact in float32), instead of being converted first.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .errors import InputError


ADD_WHOLE_UP_TO = 16384     # inputs up to this width add each batch's product whole; wider ones by columns,
ADD_COLUMNS = 4096          # on these devices (a GPU's memory is the scarce one; the CPU keeps symmetric_gram)
ADD_BY_COLUMNS_ON = ("cuda",)


def product_bytes(n: int, itemsize: int = 4) -> int:
    """Bytes of the product being added to a sum of width `n` (`Statistics.add`)."""
    return n * (n if n <= ADD_WHOLE_UP_TO else ADD_COLUMNS) * itemsize


def gram(A: torch.Tensor, B: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """`Aᵀ B` `(n, n)` in `dtype` for token rows `A`, `B` `(N, n)`. `gram(X, X)` on the CPU computes the
    upper triangle and mirrors it (`symmetric_gram`)."""
    half = (torch.bfloat16, torch.float16)
    if A.is_cuda and dtype == torch.float32 and A.dtype in half and B.dtype == A.dtype:
        try:
            return torch.mm(A.T, B, out_dtype=torch.float32)
        except (RuntimeError, TypeError):      # a torch without float32 output for half inputs
            pass
    if B is A and not A.is_cuda:
        return symmetric_gram(A.to(dtype))
    return A.to(dtype).T @ B.to(dtype)


def symmetric_gram(A: torch.Tensor, band: int = 0) -> torch.Tensor:
    """`Aᵀ A` `(n, n)` for `A` `(N, n)` from its upper triangle: one product per band of `band` rows (default
    `max(128, n/4)`), `Aᵀ[band] A[:, band start:]`, mirrored below the diagonal. About a quarter fewer
    operations than the full product for n ≥ 512; equal to it to rounding."""
    n = A.shape[1]
    band = band or max(128, n // 4)
    if n <= band:
        return A.T @ A
    out = torch.empty(n, n, dtype=A.dtype, device=A.device)
    for i0 in range(0, n, band):
        i1 = min(i0 + band, n)
        rows = A[:, i0:i1].T @ A[:, i0:]
        out[i0:i1, i0:] = rows
        out[i1:, i0:i1] = rows[:, i1 - i0:].T
    return out


class Statistics:
    """Running sums of the statistics in `needs` over the batches `add`ed. `given`: sums already known
    for the same inputs (statistic → `(n, n)` sum over the batches to come, e.g. `G` of the full-precision
    stream from an earlier run, `fullprecision.py`); those are taken as they are and not accumulated."""

    def __init__(self, n: int, needs: Iterable[str] = ("H",), device=None, dtype=torch.float32,
                 given: Optional[dict[str, torch.Tensor]] = None):
        needs = frozenset(needs)
        bad = needs - {"H", "C", "G"}
        if bad:
            raise InputError(f"unknown statistic(s) {sorted(bad)}; known: H, C, G")
        given = {k: v for k, v in (given or {}).items() if k in needs}
        for k, v in given.items():
            if v.shape != (n, n) or v.dtype != dtype:
                raise InputError(f"given sum {k} is {tuple(v.shape)} {v.dtype}; the statistics are ({n}, {n}) {dtype}")
        self.n, self.needs, self.dtype, self.device = n, needs, dtype, device
        self.count = 0
        self.given = frozenset(given)
        self._sum: dict[str, torch.Tensor] = dict(given)

    def add(self, X: torch.Tensor, X_fp: Optional[torch.Tensor] = None) -> None:
        """Add a batch: runtime inputs `X` and full-precision inputs `X_fp`, both `(..., n)`."""
        if X.shape[-1] != self.n:
            raise InputError(f"inputs have {X.shape[-1]} features; the layer has n={self.n} input columns")
        X = X.reshape(-1, self.n)
        if ("C" in self.needs or "G" in self.needs):
            if X_fp is None:
                raise InputError("this objective needs the full-precision inputs X̃ (C or G); none were given")
            if X_fp.shape[-1] != self.n or X_fp.numel() != X.numel():
                raise InputError(f"full-precision inputs {tuple(X_fp.shape)} do not match runtime inputs {tuple(X.shape)}")
            X_fp = X_fp.reshape(-1, self.n)
        dev = self.device if self.device is not None else X.device
        X = self._operand(X, dev)
        if X_fp is not None:
            X_fp = self._operand(X_fp, dev)
        todo = self.needs - self.given
        for k, A, B in (("H", X, X), ("C", X_fp, X), ("G", X_fp, X_fp)):
            if k in todo:
                self._add(k, A, B)
        self.count += X.shape[0]

    def _add(self, key: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """`sums[key] += Aᵀ B`, one product at a time; for a layer wider than `ADD_WHOLE_UP_TO` on a device of
        `ADD_BY_COLUMNS_ON`, a block of `ADD_COLUMNS` columns at a time, so that no second `(n, n)` matrix is
        held beside the sums."""
        S = self._sum.get(key)
        if S is None:
            self._sum[key] = gram(A, B, self.dtype)
        elif self.n <= ADD_WHOLE_UP_TO or S.device.type not in ADD_BY_COLUMNS_ON:
            S += gram(A, B, self.dtype)
        else:
            for c0 in range(0, self.n, ADD_COLUMNS):
                S[:, c0:c0 + ADD_COLUMNS] += gram(A, B[:, c0:c0 + ADD_COLUMNS], self.dtype)

    def _operand(self, X: torch.Tensor, device) -> torch.Tensor:
        """`X` on `device`, converted to the statistics' dtype once for all its products, except bf16/fp16
        inputs on a CUDA device, which `gram` multiplies as they are."""
        X = X.to(device=device)
        return X if X.is_cuda and X.dtype in (torch.bfloat16, torch.float16) else X.to(self.dtype)

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """The running sums `Σ xᵀ x` `(n, n)` by statistic, not yet divided by `count` (summed over
        processes in place by a distributed run)."""
        return self._sum

    def bytes_on(self, device) -> int:
        """Bytes the sums hold on `device` (its type: `cuda` for any CUDA device)."""
        kind = torch.device(device).type
        return sum(v.numel() * v.element_size() for v in self._sum.values() if v.device.type == kind)

    def move(self, device) -> None:
        """Put the sums on `device` (e.g. the host, for a layer whose decoding needs the GPU's memory: the
        blocked form reads them back a block of columns at a time)."""
        self._sum = {k: v.to(device) for k, v in self._sum.items()}
        self.device = torch.device(device)

    def _mean(self, key):
        if key not in self.needs:
            return None
        if self.count == 0:
            raise InputError("no calibration inputs were added")
        return self._sum[key] / self.count

    @property
    def H(self):
        return self._mean("H")

    @property
    def C(self):
        return self._mean("C")

    @property
    def G(self):
        return self._mean("G")

    @classmethod
    def from_inputs(cls, X, X_fp=None, needs=("H",), dtype=torch.float32, batch: int = 4096) -> "Statistics":
        """Statistics of whole input matrices `(N, n)`, added in batches of tokens."""
        st = cls(X.shape[-1], needs, dtype=dtype)
        for i in range(0, X.shape[0], batch):
            st.add(X[i:i + batch], None if X_fp is None else X_fp[i:i + batch])
        return st

"""The trailing update of a lazy block, `T[:, rest] −= Err @ U[block, rest]`, the walk's largest product.

Two ways (`OJBKQ_CUDA_PRODUCTS`):

- `fp32` (default): one product as torch's float32 setting says (`torch.backends.cuda.matmul.allow_tf32`;
  full float32 unless it is switched on).
- `tf32x3`: float32 accuracy from TF32 tensor cores. Each factor is split into a TF32 part and the rest,
  `x = x_hi + x_lo` (`x_hi` rounded to TF32's 10 mantissa bits, `x_lo = x − x_hi` exact), and

      Err @ U ≈ Err_hi @ U_hi + Err_hi @ U_lo + Err_lo @ U_hi

  (the dropped `Err_lo @ U_lo` is below 2⁻²⁰ of the product), summed in float32 by one TF32 product
  `[Err_hi | Err_hi | Err_lo] @ [U_hi; U_lo; U_hi]` with three times the inner dimension. `U` is split
  one block of rows at a time, as the walk reaches it (two more `(n, n)` tensors would not fit beside the
  `U` of the widest layers). Off the GPU the same three products run in float32. The codes can differ from `fp32` where two codes are nearly tied, as they can between
  two float32 summation orders.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from ojbkq_core.decoders.walk import subtract_stacked

from . import runtime

MODES = ("fp32", "tf32x3")


def mode() -> str:
    m = os.environ.get("OJBKQ_CUDA_PRODUCTS", "fp32")
    if m not in MODES:
        raise ValueError(f"OJBKQ_CUDA_PRODUCTS={m!r}: one of {', '.join(MODES)}")
    return m


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(hi, lo)` of float32 `x`: `hi` rounded to nearest TF32 (10 mantissa bits), `lo = x − hi`."""
    bits = x.contiguous().view(torch.int32)
    hi = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return hi, x - hi


class Trailing:
    """`update(T_rest, Err, i1, i2)`: `T_rest −= Err @ U[i1:i2, i2:]` for `T_rest` `(R, n − i2)`, `Err`
    `(R, i2 − i1)`, all float32 on one device. A stack (`U` `(E, n, n)`, `R = P·E·per` rows path-major, each
    problem's `per` rows together): one batched product, problem `e`'s rows with `U[e]`."""

    def __init__(self, U: torch.Tensor, how: Optional[str] = None, per: int = 0):
        self.U, self.mode, self.per = U, how or mode(), per

    def update(self, T_rest: torch.Tensor, Err: torch.Tensor, i1: int, i2: int) -> None:
        U = self.U[..., i1:i2, i2:]
        if self.mode == "tf32x3":
            e_hi, e_lo = tf32_split(Err)
            u_hi, u_lo = tf32_split(U)
            Err, U = torch.cat([e_hi, e_hi, e_lo], -1), torch.cat([u_hi, u_lo, u_hi], -2)
        with runtime.tf32(True) if self.mode == "tf32x3" else contextlib.nullcontext():
            if U.dim() == 2:
                T_rest.addmm_(Err, U, alpha=-1.0)
            else:
                subtract_stacked(T_rest, Err, U, T_rest.shape[0] // (U.shape[0] * self.per))

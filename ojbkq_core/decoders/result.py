"""What a decoder returns: codes and their grid in decoding order, with the path objective."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodeResult:
    """Codes and the grid they were decoded on, in decoding order.

    `codes`: `(m, n)` float tensor holding integers; `scale`, `zero`: `(m, n)`;
    `objective`: `(m,)` the path objective `Σ e_j² = (t − q)ᵀ H (t − q)` of the chosen codes;
    `info`: decoder-specific facts (e.g. the chosen candidate per row).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    objective: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def values(self) -> torch.Tensor:
        """Dequantized values `scale · (codes − zero)` `(m, n)` on the integer grid (on any alphabet:
        `problem.grid.dequantize(codes, scale, zero)`)."""
        return self.scale * (self.codes - self.zero)


def joined(parts: list[DecodeResult]) -> DecodeResult:
    """Results of consecutive row chunks as one: tensors concatenated along the rows (the last dimension
    of an `info` tensor, e.g. `candidate_scores` `(P, m)`), other `info` values taken from the first."""
    info = {}
    for k, v in parts[0].info.items():
        info[k] = torch.cat([p.info[k] for p in parts], dim=v.dim() - 1) if isinstance(v, torch.Tensor) else v
    return DecodeResult(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                        torch.cat([p.zero for p in parts]), torch.cat([p.objective for p in parts]), info)

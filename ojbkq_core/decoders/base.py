"""The decoder interface.

A decoder turns a `WorkingProblem` (docs/formulation.md §4, decoding order) into integer codes, one row per
right-hand side. Every decoder is vectorised over rows in torch and runs on whatever device the
problem's tensors live on.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import InputError
from ..problem import WorkingProblem


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
        """Dequantized values `scale · (codes − zero)` `(m, n)`."""
        return self.scale * (self.codes - self.zero)


class Decoder(ABC):
    """Base class: subclasses set `name`, `params` (name → default) and implement `decode`.

    Parameters are checked where they enter: an unknown name or a value of the wrong kind raises
    `InputError` naming it.
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    randomized: ClassVar[bool] = False
    progressive: ClassVar[bool] = False   # reads WorkingProblem.base / .inject (successive rounding)
    description: ClassVar[str] = ""

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise InputError(f"decoder '{self.name}': unknown parameter(s) {', '.join(unknown)} (allowed: {allowed})")
        self.options = {**self.params, **params}
        self.check(self.options)

    def check(self, options: dict) -> None:
        """Validate `options`; raise `InputError` naming the bad one."""

    def _positive_int(self, key: str) -> int:
        v = self.options[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"decoder '{self.name}': parameter {key}={v!r} must be a positive integer")
        return v

    @abstractmethod
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        """Decode all rows. `row0` is the index of the first row in the whole problem (so that a
        seeded decoder draws the same numbers for a row however the rows are chunked)."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({args})"

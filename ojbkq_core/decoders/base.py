"""The decoder interface.

A decoder turns a `WorkingProblem` (docs/formulation.md §4, decoding order) into integer codes, one row per
right-hand side. Every decoder is vectorised over rows in torch and runs on whatever device the
problem's tensors live on; the built-in ones are made of the primitives of `primitives.py` (the walk, the
beam, the row budget), which a backend plugin may replace for its device.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..errors import InputError
from ..problem import WorkingProblem
from .primitives import REFERENCE, Primitives
from .result import DecodeResult, joined


class Decoder(ABC):
    """Base class: subclasses set `name`, `params` (name → default) and implement `decode`.

    Parameters are checked where they enter: an unknown name or a value of the wrong kind raises
    `InputError` naming it.
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    randomized: ClassVar[bool] = False
    progressive: ClassVar[bool] = False   # reads WorkingProblem.base / .inject (successive rounding)
    stackable: ClassVar[bool] = False     # decodes a stack of problems (`WorkingProblem.stack`) in one call
    description: ClassVar[str] = ""

    primitives: Primitives = REFERENCE   # the walk, beam and row budget it calls (`use` sets a backend's)

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

    def use(self, primitives: Primitives) -> "Decoder":
        """Call `primitives` (a backend's walk, beam, row budget) from now on; returns the decoder."""
        self.primitives = primitives
        return self

    def by_rows(self, problem: WorkingProblem, paths: int, row0: int, run) -> DecodeResult:
        """`run(rows, row0)` on chunks of rows small enough for `paths` candidate paths each
        (`primitives.rows`), the results joined in row order. Rows are independent problems sharing `U`."""
        m = problem.m
        step = max(1, min(m, self.primitives.rows(problem, paths)))
        if problem.problems > 1:                 # whole problems of a stack
            per = m // problem.problems
            step = max(per, step // per * per)
        if step >= m:
            return run(problem, row0)
        return joined([run(problem.rows(slice(i, i + step)), row0 + i) for i in range(0, m, step)])

    @abstractmethod
    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        """Decode all rows. `row0` is the index of the first row in the whole problem (so that a
        seeded decoder draws the same numbers for a row however the rows are chunked)."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({args})"

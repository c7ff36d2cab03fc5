"""The operations the built-in decoders are made of, and the backends that accelerate them.

    walk(problem, paths, inject=False, sampling=None, block=128) -> Candidates
        `paths` candidate paths per row through the columns in decoding order (docs/formulation.md §4–§5).
        Path 0 rounds to nearest (babai); with `sampling` the paths `p ≥ 1` draw each code (klein);
        `inject` walks from `problem.base` with `problem.inject` (successive rounding).
    beam(problem, width, expand, block=128) -> Candidates
        the `width` surviving beams of every row, then the Babai path as one more candidate.
    Candidates.best(problem) -> DecodeResult
        per row the candidate with the least score (the problem's scoring objective, else `Σ e²`).
    Candidates.single(problem, info) -> DecodeResult
        the one path of a one-path walk.
    rows(problem, paths) -> int
        how many rows one call may take (a device's memory); decoders split larger problems.

A decoder calls them through its `primitives` (a `Primitives`, chosen for the run's device and `backend`
by `choose`): for each call the implementation of highest priority whose `accepts(problem)` holds (e.g.
float32 tensors where its kernels run), else the reference below. A backend plugin registers
implementations with the `register_primitives` hook; a third-party decoder that calls
`self.primitives.walk(...)` runs on every backend the built-ins run on. What `walk` and `beam` return is
the backend's own layout of the candidates (`Dense` here), which chooses among them itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..budget import budget
from ..problem import WorkingProblem
from .result import DecodeResult
from .sampling import Sampling, sampler
from .search import beams
from .select import select
from .walk import walk

NAMES = ("walk", "beam", "rows")


@dataclass
class Dense:
    """Candidates as full tensors: `codes`, `scale`, `zero` `(P, m, n)`, `score` `(P, m)` (the path objective)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    score: torch.Tensor
    backend: str = "reference"

    def best(self, problem: WorkingProblem) -> DecodeResult:
        res = select(problem, self.codes, self.scale, self.zero, self.score)
        res.info["backend"] = self.backend
        return res

    def single(self, problem: WorkingProblem, info: Optional[dict] = None) -> DecodeResult:
        return DecodeResult(self.codes[0], self.scale[0], self.zero[0], self.score[0],
                            {**(info or {}), "backend": self.backend})

    def then(self, other: "Dense") -> "Dense":
        """These candidates followed by `other`'s."""
        return Dense(torch.cat([self.codes, other.codes]), torch.cat([self.scale, other.scale]),
                     torch.cat([self.zero, other.zero]), torch.cat([self.score, other.score]), self.backend)


def reference_walk(problem: WorkingProblem, paths: int = 1, inject: bool = False,
                   sampling: Optional[Sampling] = None, block: int = 128) -> Dense:
    choose = (sampler(problem, paths, sampling) if sampling is not None and paths > 1
              else lambda t, s, z, lo, hi, d, j: problem.grid.alphabet.nearest(t, s, z, lo, hi))
    return Dense(*walk(problem, paths, choose, inject=inject, block=block))


def reference_beam(problem: WorkingProblem, width: int, expand: int, block: int = 128) -> Dense:
    return Dense(*beams(problem, width, expand, block)).then(reference_walk(problem, 1, block=block))


def reference_rows(problem: WorkingProblem, paths: int) -> int:
    """All rows, unless a device budget is set (`budget.budget`: half of a CUDA device's memory less the open
    block's weights, so the same chunks every run): then as many rows as a quarter of it holds, about six
    `(paths, rows, n)` tensors."""
    limit = budget(problem.T.device)
    if limit is None:
        return problem.m
    return max(1, limit // 4 // (paths * problem.n * problem.T.element_size() * 6))


REFERENCE_IMPLS = {"walk": reference_walk, "beam": reference_beam, "rows": reference_rows}


@dataclass
class Impl:
    """One registered implementation: `fn` for device type `device` when `accepts(problem)`."""

    name: str
    device: str
    fn: Callable
    priority: int
    accepts: Callable[[WorkingProblem], bool]
    plugin: str = ""


@dataclass
class Primitives:
    """The implementations one decoder uses: per primitive, candidates in the order they are tried."""

    impls: dict[str, list[Impl]] = field(default_factory=dict)

    def _pick(self, name: str, problem: WorkingProblem) -> Callable:
        for impl in self.impls.get(name, ()):
            if impl.accepts(problem):
                return impl.fn
        return REFERENCE_IMPLS[name]

    def native(self, name: str, problem: WorkingProblem) -> bool:
        """Whether a registered implementation (not the reference) runs primitive `name` on `problem`."""
        return self._pick(name, problem) is not REFERENCE_IMPLS[name]

    def walk(self, problem: WorkingProblem, paths: int = 1, *, inject: bool = False,
             sampling: Optional[Sampling] = None, block: int = 128) -> Any:
        return self._pick("walk", problem)(problem, paths, inject=inject, sampling=sampling, block=block)

    def beam(self, problem: WorkingProblem, width: int, expand: int, block: int = 128) -> Any:
        return self._pick("beam", problem)(problem, width, expand, block=block)

    def rows(self, problem: WorkingProblem, paths: int) -> int:
        return self._pick("rows", problem)(problem, paths)

    @property
    def plugins(self) -> list[str]:
        return sorted({i.plugin for v in self.impls.values() for i in v})


REFERENCE = Primitives()


def choose(registered: list[Impl], device: str, backend: str = "auto") -> Primitives:
    """The `Primitives` for a device type: under `backend="auto"` every implementation registered for it
    (or for "any") with priority above 0, highest first; `"reference"` none; a plugin's name only its own."""
    dtype = str(device).split(":")[0]
    if backend == "reference":
        return REFERENCE
    mine = [i for i in registered if i.device in (dtype, "any")
            and (i.plugin == backend if backend != "auto" else i.priority > 0)]
    impls: dict[str, list[Impl]] = {}
    for i in sorted(mine, key=lambda i: -i.priority):
        impls.setdefault(i.name, []).append(i)
    return Primitives(impls) if impls else REFERENCE

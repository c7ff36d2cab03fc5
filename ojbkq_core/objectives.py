"""Objectives as data: weighted alignment terms (docs/formulation.md §2).

A term `(w, a, b)` is `w · ‖W (a X̃ + (1−a) X) − Q (b X̃ + (1−b) X)‖²_F / N`. An objective is a sum of
terms, a quadratic form in `Q` built from `H = X Xᵀ/N`, `C = X̃ Xᵀ/N`, `G = X̃ X̃ᵀ/N`:

    H_obj = Σ w B Bᵀ,  M = Σ w A Bᵀ,  T = W M H_obj⁻¹ = W + W (M − H_obj) H_obj⁻¹

The named presets live in `PRESETS` below and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch

from .errors import InputError


@dataclass(frozen=True)
class Term:
    w: float
    a: float
    b: float

    def __post_init__(self):
        for k in ("w", "a", "b"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"objective term {k}={v!r} must be a number")
        if self.w < 0:
            raise InputError(f"objective term w={self.w} must be ≥ 0")
        for k in ("a", "b"):
            if not 0 <= getattr(self, k) <= 1:
                raise InputError(f"objective term {k}={getattr(self, k)} must lie in [0, 1]")


def _AAt(stats, a):
    """`A Aᵀ` for `A = a X̃ + (1−a) X` (also `B Bᵀ`)."""
    out = (1 - a) ** 2 * stats.H
    if a:
        out = out + a * a * stats.G + a * (1 - a) * (stats.C + stats.C.T)
    return out


def _ABt(stats, a, b):
    """`A Bᵀ` for `A = a X̃ + (1−a) X`, `B = b X̃ + (1−b) X`."""
    out = (1 - a) * (1 - b) * stats.H
    if a * b:
        out = out + a * b * stats.G
    if a * (1 - b):
        out = out + a * (1 - b) * stats.C
    if (1 - a) * b:
        out = out + (1 - a) * b * stats.C.T
    return out


def _combo(stats, H=0.0, G=0.0, C=0.0, Ct=0.0):
    """`H·H + G·G + C·C + Ct·Cᵀ` `(n, n)` accumulated in place, one statistic read at a time (each
    read may be a fresh conversion: at most two `(n, n)` tensors are alive)."""
    out = None
    for key, c in (("H", H), ("G", G), ("C", C), ("Ct", Ct)):
        if c == 0:
            continue
        S = _read(stats, key)
        if out is None:
            out = S * c
        else:
            out.add_(S, alpha=c)
        del S
    return out


def _read(stats, key):
    """Statistic `key` of `stats`, `"Ct"` for `Cᵀ` (a column view of the statistics gives its own)."""
    if key == "Ct":
        return stats.Ct if hasattr(stats, "Ct") else stats.C.T
    return getattr(stats, key)


def _row_form(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`diag(A S Bᵀ)` `(m,)` for `A`, `B` `(m, n)`."""
    return ((A @ S.to(device=A.device, dtype=A.dtype)) * B).sum(1)


@dataclass(frozen=True)
class Objective:
    """A fixed list of terms. `name` and `params` say where it came from (for reports)."""

    terms: tuple[Term, ...]
    name: str = "custom"
    params: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.terms:
            raise InputError(f"objective '{self.name}' has no terms")
        if sum(t.w for t in self.terms) <= 0:
            raise InputError(f"objective '{self.name}': the term weights sum to 0")

    @property
    def needs(self) -> frozenset:
        """The statistics this objective reads: a subset of {'H', 'C', 'G'}."""
        need = set()
        for t in self.terms:
            if t.a < 1 or t.b < 1:
                need.add("H")
            if t.a > 0 or t.b > 0:
                need.add("G")
            if t.a * (1 - t.b) or (1 - t.a) * t.b or t.a * (1 - t.a) or t.b * (1 - t.b):
                need.add("C")
        return frozenset(need)

    def quadratic(self, stats) -> tuple[torch.Tensor, torch.Tensor]:
        """`H_obj = Σ w B Bᵀ` and `M = Σ w A Bᵀ`, both `(n, n)`, undamped."""
        H_obj = sum(t.w * _AAt(stats, t.b) for t in self.terms)
        M = sum(t.w * _ABt(stats, t.a, t.b) for t in self.terms)
        return H_obj, M

    def coefficients(self) -> tuple[dict, dict]:
        """`H_obj` and `M − H_obj` as combinations of the statistics, `{"H", "G", "C", "Ct"} → coefficient`
        (`Ct` for `Cᵀ`): what `quadratic` builds, for a caller that builds it a block of columns at a time."""
        h = dict.fromkeys(("H", "G", "C", "Ct"), 0.0)
        mh = dict(h)
        for t in self.terms:
            a, b = t.a, t.b
            for k, v in (("H", (1 - b) ** 2), ("G", b * b), ("C", b * (1 - b)), ("Ct", b * (1 - b))):
                h[k] += t.w * v
            for k, v in (("H", (1 - a) * (1 - b)), ("G", a * b), ("C", a * (1 - b)), ("Ct", (1 - a) * b)):
                mh[k] += t.w * v
        return h, {k: mh[k] - h[k] for k in h}

    def const(self, W: torch.Tensor, stats) -> torch.Tensor:
        """`Σ w ‖W A‖²_F / N` per row `(m,)`."""
        K = sum(t.w * _AAt(stats, t.a) for t in self.terms).to(device=W.device, dtype=W.dtype)
        return ((W @ K) * W).sum(1)

    def value(self, W: torch.Tensor, Q: torch.Tensor, stats, cols: Optional[int] = None) -> torch.Tensor:
        """The objective `Σ w ‖W A − Q B‖²_F / N` per row `(m,)` from the statistics (exact, undamped).

        With `E = W − Q` and `Δ = X̃ − X`, `W A − Q B = (a − b) W Δ + E B`, so each term is

            w [(a − b)² W ΔΔᵀ Wᵀ + 2 (a − b) W Δ Bᵀ Eᵀ + E B Bᵀ Eᵀ]

        (no difference of large numbers), built one `(n, n)` matrix at a time in `W`'s dtype. `cols`: read
        the statistics `cols` columns at a time (`stats.columns(slice)`, e.g. `layer._Double`), so that no
        `(n, n)` matrix is held whole."""
        if cols is None:
            return self.value_columns(W, Q, stats, slice(None))
        out = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
        for c in range(0, W.shape[1], cols):
            self.value_columns(W, Q, stats.columns(slice(c, c + cols)), slice(c, c + cols), out)
        return out

    def value_columns(self, W: torch.Tensor, Q: torch.Tensor, st, sl: slice,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The part of `value` `(m,)` that the statistics' columns `sl` give, added to `out` in place (zeros
        when None): `st` holds those columns (`H`, `C`, `G` `(n, k)` and `Ct`, e.g. `layer._Columns`), or is
        the statistics themselves for `slice(None)`."""
        E = W - Q
        if out is None:
            out = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
        for t in self.terms:
            b, d = t.b, t.a - t.b
            out += t.w * _row_form(E, _combo(st, H=(1 - b) ** 2, G=b * b, C=b * (1 - b), Ct=b * (1 - b)), E[:, sl])
            if d:
                out += t.w * d * d * _row_form(W, _combo(st, H=1.0, G=1.0, C=-1.0, Ct=-1.0), W[:, sl])
                out += 2 * t.w * d * _row_form(W, _combo(st, H=-(1 - b), G=b, C=1 - b, Ct=-b), E[:, sl])
        return out

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})" if args else self.name


# --- α and other sampled parameters -----------------------------------------------------------

@dataclass(frozen=True)
class Distribution:
    """A seeded distribution for a parameter sampled per layer: `uniform:a:b` or `beta:p:q`."""

    kind: str
    args: tuple[float, ...]

    @classmethod
    def parse(cls, text: str, key: str = "alpha") -> "Distribution":
        parts = str(text).split(":")
        kind = parts[0]
        try:
            args = tuple(float(x) for x in parts[1:])
        except ValueError:
            raise InputError(f"objective {key}={text!r}: arguments must be numbers (e.g. uniform:0.4:0.8)") from None
        if kind == "uniform" and len(args) == 2 and 0 <= args[0] <= args[1] <= 1:
            return cls(kind, args)
        if kind == "beta" and len(args) == 2 and min(args) > 0:
            return cls(kind, args)
        raise InputError(f"objective {key}={text!r}: expected a number in [0, 1], 'uniform:a:b' with "
                         f"0 ≤ a ≤ b ≤ 1, or 'beta:p:q' with p, q > 0")

    def sample(self, rng: np.random.Generator) -> float:
        if self.kind == "uniform":
            return float(rng.uniform(*self.args))
        return float(rng.beta(*self.args))

    def __str__(self):
        return ":".join([self.kind, *(f"{a:g}" for a in self.args)])


def _unit(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise InputError(f"objective parameter {key}={v!r} must be a number in [0, 1]")
    return float(v)


def _alpha(v) -> Union[float, Distribution]:
    if isinstance(v, str):
        return Distribution.parse(v)
    return _unit("alpha", v)


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective before its per-layer draw: `build(rng)` returns the concrete `Objective` and the
    values drawn (empty when nothing is sampled)."""

    name: str
    params: dict
    make: Callable[..., Objective]
    sampled: tuple[str, ...] = ()

    def build(self, rng: Optional[np.random.Generator] = None) -> tuple[Objective, dict]:
        values, draws = dict(self.params), {}
        for k in self.sampled:
            if rng is None:
                raise InputError(f"objective '{self.name}': {k}={self.params[k]} is sampled and needs a seed")
            draws[k] = values[k] = self.params[k].sample(rng)
        obj = self.make(**values)
        return Objective(obj.terms, self.name, {k: (str(v) if isinstance(v, Distribution) else v)
                                                for k, v in self.params.items()}), draws


def _symmetric():
    return Objective((Term(1, 0, 0),))


def _asymmetric():
    return Objective((Term(1, 1, 0),))


def _regularized(alpha=0.5):
    return Objective((Term(1, alpha, 0),))


def _jta(mu=0.6, lam=0.6):
    terms = [Term(mu, lam, 0), Term(1 - mu, 1, 1)]
    return Objective(tuple(t for t in terms if t.w > 0))


# name -> (factory, {param: (default, validator)})
PRESETS: dict[str, tuple[Callable[..., Objective], dict]] = {
    "symmetric": (_symmetric, {}),
    "asymmetric": (_asymmetric, {}),
    "regularized": (_regularized, {"alpha": (0.5, _alpha)}),
    "jta": (_jta, {"mu": (0.6, lambda v: _unit("mu", v)), "lam": (0.6, lambda v: _unit("lam", v))}),
}


def preset(name: str, factory, schema: dict, **params) -> ObjectiveSpec:
    unknown = sorted(set(params) - set(schema))
    if unknown:
        allowed = ", ".join(sorted(schema)) or "none"
        raise InputError(f"objective '{name}': unknown parameter(s) {', '.join(unknown)} (allowed: {allowed})")
    values = {k: check(params.get(k, default)) for k, (default, check) in schema.items()}
    sampled = tuple(k for k, v in values.items() if isinstance(v, Distribution))
    return ObjectiveSpec(name, values, factory, sampled)


def from_terms(terms) -> ObjectiveSpec:
    """A config's own `terms: [{w, a, b}, ...]`."""
    if not isinstance(terms, (list, tuple)) or not terms:
        raise InputError("objective.terms must be a non-empty list of {w, a, b}")
    parsed = []
    for i, t in enumerate(terms):
        if not isinstance(t, dict) or set(t) - {"w", "a", "b"} or not {"w", "a", "b"} <= set(t):
            raise InputError(f"objective.terms[{i}]={t!r}: each term needs exactly the keys w, a, b")
        parsed.append(Term(t["w"], t["a"], t["b"]))
    obj = Objective(tuple(parsed), "terms")
    return ObjectiveSpec("terms", {"terms": [dict(w=t.w, a=t.a, b=t.b) for t in parsed]}, lambda terms: obj)


# --- choosing among candidates ------------------------------------------------------------------

class RowScore:
    """Per-row objective value of candidates, `const − 2 (W M)·q + q H qᵀ`, in decoding order.

    `WM` `(m, n)`, `H` `(n, n)` and `const` `(m,)` of the scoring objective (undamped), so the score is
    exactly `Σ w ‖w_i A − q_i B‖² / N` for each row: the quantity klein and beam choose by.
    """

    def __init__(self, WM: torch.Tensor, H: torch.Tensor, const: torch.Tensor):
        self.WM, self.H, self.const = WM, H, const

    @classmethod
    def of(cls, objective: "Objective", W: torch.Tensor, stats, perm: torch.Tensor) -> "RowScore":
        H, M = (x.to(device=W.device, dtype=W.dtype) for x in objective.quadratic(stats))
        return cls((W @ M)[:, perm], H[perm][:, perm], objective.const(W, stats))

    def rows(self, sl: slice) -> "RowScore":
        return RowScore(self.WM[sl], self.H, self.const[sl])

    def __call__(self, Q: torch.Tensor, path: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`Q` `(..., m, n)` → `(..., m)`; the path objective `path` is not needed."""
        return self.const - 2 * (self.WM * Q).sum(-1) + ((Q @ self.H) * Q).sum(-1)


class PathScore:
    """Per-row objective of candidates from the loss accumulated along their walk, in decoding order.

    The walk decodes `T = W M H_d⁻¹` on the damped `H_d = H + λ I` (dead columns: `H_jj = 1`, `w_j = 0`),
    so `T H_d = W M + λ W` and a candidate's path objective `Σ_j e_j² = (t − q)ᵀ H_d (t − q)` is

        Σ e² = J(q) + λ ‖q − w‖² + Σ_dead q_j² + c,      c = t H_d tᵀ − λ ‖w‖² − const  (per row)

    with `J` the exact (undamped) objective. So `Σ e² − λ ‖q − w‖² − Σ_dead q_j² = J(q) − c` ranks the
    candidates of a row exactly as `J` does, at the cost of one pass over `q` instead of a product
    with `H`. `W` `(m, n)` in decoding order with dead columns zeroed; `lam` the absolute damping;
    `dead` `(k,)` the dead columns' indices in decoding order (of a stack, `stack`: `lam` `(m,)` per row and
    `dead` `(k, 2)` (row, column) pairs).
    """

    def __init__(self, W: torch.Tensor, lam, dead: torch.Tensor):
        self.W, self.lam, self.dead = W, lam, dead

    def rows(self, sl: slice) -> "PathScore":
        if not isinstance(self.lam, torch.Tensor):
            return PathScore(self.W[sl], self.lam, self.dead)
        start, stop, _ = sl.indices(self.W.shape[0])
        keep = (self.dead[:, 0] >= start) & (self.dead[:, 0] < stop)
        return PathScore(self.W[sl], self.lam[sl], self.dead[keep] - torch.tensor([start, 0], device=self.dead.device))

    @classmethod
    def stack(cls, scores: list["PathScore"]) -> "PathScore":
        """The scores of stacked problems (`WorkingProblem.stack`): `lam` `(m,)` per row, `dead` the `(k, 2)`
        (row, column) pairs of every row's dead columns."""
        W = torch.cat([s.W for s in scores])
        per = scores[0].W.shape[0]
        lam = torch.tensor([float(s.lam) for s in scores], dtype=W.dtype, device=W.device).repeat_interleave(per)
        rows = torch.arange(per, device=W.device)
        pairs = [torch.stack([(e * per + rows).repeat_interleave(len(s.dead)), s.dead.to(W.device).repeat(per)], 1)
                 for e, s in enumerate(scores)]
        return cls(W, lam, torch.cat(pairs).view(-1, 2))

    def __call__(self, Q: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """`Q` `(..., m, n)` dequantized candidates and their path objectives `path` `(..., m)` →
        `J(q) − c` `(..., m)`, one candidate at a time (the same operations whatever the batch)."""
        if Q.dim() > 2:
            return torch.stack([self(q, p) for q, p in zip(Q.reshape(-1, *Q.shape[-2:]), path.reshape(-1, path.shape[-1]))]
                               ).view(path.shape)
        E = Q - self.W
        out = path.to(Q.dtype) - self.lam * (E * E).sum(-1)
        if self.dead.dim() == 2:                      # stacked: each row's own dead columns
            if len(self.dead):
                q = Q[self.dead[:, 0], self.dead[:, 1]]
                out = out - torch.zeros_like(out).index_add_(0, self.dead[:, 0], q * q)
        elif self.dead.numel():
            Qd = Q[:, self.dead]
            out = out - (Qd * Qd).sum(-1)
        return out

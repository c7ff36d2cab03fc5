"""Extended Klein randomized nearest plane with Random-K candidates (OJBKQ).

K paths per row walk the columns with their own error state and grid ("path-isolated"). Path 0 is the
Babai path; path p > 0 samples each code from

    P(c) ∝ exp(−β (t_j − q(c))² / U_jj²)

over the grid codes within `window` steps of the nearest one (Gumbel-max with counter-based uniforms).
Per row the candidate with the best score wins: the path objective, or the problem's scoring objective.

Default β: with `r_j² = s_j² / U_jj²` the squared length of one grid step in objective units,
`β = rel_beta / min_j r_j²` per row (`rel_beta = 4`). This is Klein's form as analysed by Liu, Ling and
Stehlé, who take the constant `ln ρ` with `K = (eρ)^(2n/ρ)` (see `klein_rho`; about 7 for n = 384 and
K = 16); here the constant does not depend on K, so candidate p draws the same numbers whatever K and
more candidates never hurt. Measured (k = 16, 3 bits, symmetric objective): objective 10.6% below babai
on MiniLM block 3's intermediate.dense (1536×384) and 9.3% on its query (384×384), 1.5% on a synthetic
128×512 layer. A median in place of the min samples less on real layers (0.2% and 0.1% below babai there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import InputError
from ..problem import WorkingProblem
from ..rng import to_unit, uniform
from .base import DecodeResult, Decoder
from .walk import nearest, walk


def klein_rho(k: int, n: int) -> float:
    """The ρ > 1 with `k = (e ρ)^(2n/ρ)` (bisection); infinite for k ≤ 1."""
    if k <= 1:
        return math.inf
    target = math.log(k)
    f = lambda r: (2 * n / r) * (1 + math.log(r)) - target  # noqa: E731  decreasing for r > 1
    lo, hi = 1.0, 2.0
    while f(hi) > 0:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return hi


def gumbel_spread(dtype=torch.float32) -> float:
    """The largest minus the smallest Gumbel draw `−log(−log u)` over every uniform `rng.to_unit` can
    give (about 19.5 in float32)."""
    u = to_unit(torch.tensor([0, 0xFFFFFFFF]), dtype)
    g = -torch.log(-torch.log(u))
    return float(g[1] - g[0])


def reach(kappa_min: float, window: int, spread: float) -> int:
    """How many steps from the nearest code a draw can still land, `≤ window`.

    With `κ = β s² / U_jj²` (`s` the grid step), the nearest code's logit is at least `−κ/4` and the code
    `o` steps away has at most `−κ (|o| − ½)²` (both hold when the nearest code is clamped to the box,
    which only widens the gap), so it trails by at least `κ (o² − |o|)`. Once that exceeds the spread
    of the Gumbel draws it can never win the argmax. A 0.1% and one-unit margin covers float rounding;
    a NaN `kappa_min` keeps the whole window.
    """
    W = window
    while W > 1 and kappa_min * (W * W - W) * (1 - 1e-3) > spread + 1.0:
        W -= 1
    return W


def column_reach(problem: WorkingProblem, beta: torch.Tensor, window: int) -> Optional[list[int]]:
    """`reach` of every column for the draws of all rows, `n` ints `≤ window`, with `κ_j = min_i β_i s_ij² /
    U_jj²` (`beta` `(m,)`); None for a grid fitted during the walk, whose scales are not known beforehand.
    A kernel that weighs only the codes within a column's reach picks the winners of the whole window."""
    grid = problem.grid
    if grid.dynamic:
        return None
    kappa = (beta.view(-1, 1) * (grid.scale / problem.U.diagonal()) ** 2).amin(0)
    spread = gumbel_spread(problem.T.dtype)
    return [reach(k, window, spread) for k in kappa.tolist()]


def select(problem: WorkingProblem, codes, scale, zero, score):
    """Per-row best candidate. `codes`, `scale`, `zero` `(P, m, n)`, `score` `(P, m)`."""
    if problem.score is not None:
        rank = problem.score(scale * (codes - zero), score).masked_fill(~torch.isfinite(score), float("inf"))
    else:
        rank = score
    best = rank.argmin(0)                                     # (m,)
    idx = best.view(1, -1, 1).expand(1, *codes.shape[1:])
    pick = lambda x: x.gather(0, idx)[0]                      # noqa: E731
    return DecodeResult(pick(codes), pick(scale), pick(zero),
                        score.gather(0, best.view(1, -1))[0],
                        {"candidate": best, "candidate_scores": rank})


class Klein(Decoder):
    name = "klein"
    params = {"k": 16, "beta": None, "rel_beta": 4.0, "window": 4}
    randomized = True
    description = "Random-K Klein sampling, candidate 0 = Babai, best per row by score"

    def check(self, options):
        self._positive_int("k")
        self._positive_int("window")
        for key in ("beta", "rel_beta"):
            b = options[key]
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
                raise InputError(f"decoder 'klein': parameter {key}={b!r} must be a positive number")

    def beta(self, problem: WorkingProblem) -> torch.Tensor:
        """Inverse temperature per row `(m,)`."""
        T = problem.T if problem.base is None else problem.base
        if self.options["beta"] is not None:
            return torch.full((T.shape[0],), float(self.options["beta"]), dtype=T.dtype, device=T.device)
        scale, _ = problem.grid.initial(T)
        r2 = (scale / problem.U.diagonal()) ** 2              # (m, n)
        return float(self.options["rel_beta"]) / r2.amin(1)

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        K, w = self.options["k"], self.options["window"]
        T = problem.T
        m, dev = T.shape[0], T.device
        beta = self.beta(problem).unsqueeze(-1)                  # (m, 1)
        path = torch.arange(1, K, device=dev).view(-1, 1, 1)     # (K-1, 1, 1): path 0 is Babai
        row = (torch.arange(m, device=dev) + row0).view(1, -1, 1)
        offs = torch.arange(-w, w + 1, device=dev, dtype=T.dtype)  # (2w+1,)
        slot = torch.arange(2 * w + 1, device=dev).view(1, 1, -1)
        # on the CPU only the codes a draw can reach get noise (the same draws, the same winner); on a
        # GPU the bound would cost a device sync per column, so the whole window is drawn
        spread = gumbel_spread(T.dtype) if dev.type == "cpu" else None

        def choose(t, s, z, lo, hi, d, j):
            c0 = nearest(t, s, z, lo, hi)                        # (K, m)
            if K == 1:
                return c0
            W = w if spread is None else reach((beta.view(1, -1) * (s[1:] / d) ** 2).amin().item(), w, spread)
            offs_W, slot_W = offs[w - W:w + W + 1], slot[..., w - W:w + W + 1]
            cc = c0[1:].unsqueeze(-1) + offs_W                   # (K-1, m, 2W+1)
            dist = (t[1:].unsqueeze(-1) - s[1:].unsqueeze(-1) * (cc - z[1:].unsqueeze(-1))) / d
            logit = -beta * dist * dist
            logit = logit.masked_fill((cc < lo) | (cc > hi), -math.inf)
            u = uniform(seed, path, row, j, slot_W, dtype=T.dtype)
            g = -torch.log(-torch.log(u))
            pick = (logit + g).argmax(-1, keepdim=True)
            return torch.cat([c0[:1], cc.gather(-1, pick).squeeze(-1)], 0)

        codes, scale, zero, score = walk(problem, K, choose)
        return select(problem, codes, scale, zero, score)

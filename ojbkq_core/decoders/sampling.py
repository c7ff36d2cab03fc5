"""Klein's draws (docs/formulation.md, Klein sampling): the inverse temperature and window a walk samples
with, the bound on how far from the nearest code a draw can land, and the reference walk's sampler.

Path `p ≥ 1` of row `i` draws each code from `P(c) ∝ exp(−β_i (t_j − q(c))² / U_jj²)` over the codes within
`window` steps of the nearest one (neighbouring values of the grid's alphabet), by Gumbel-max with the
counter-based uniforms of `ojbkq_core.rng`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..problem import WorkingProblem
from ..rng import to_unit, uniform


@dataclass
class Sampling:
    """Klein's draws: inverse temperature `beta` `(m,)` per row, codes within `window` steps of the
    nearest, counter-based uniforms of `seed` with rows numbered from `row0`."""

    beta: torch.Tensor
    window: int
    seed: int = 0
    row0: int = 0


def gumbel_spread(dtype=torch.float32) -> float:
    """The largest minus the smallest Gumbel draw `−log(−log u)` over every uniform `rng.to_unit` can
    give (about 19.5 in float32)."""
    u = to_unit(torch.tensor([0, 0xFFFFFFFF]), dtype)
    g = -torch.log(-torch.log(u))
    return float(g[1] - g[0])


def reach(kappa_min: float, window: int, spread: float, ratio: float = 1.0) -> int:
    """How many steps from the nearest code a draw can still land, `≤ window`.

    With `κ = β (s δ)² / U_jj²` (`s` the scale, `δ` the alphabet's least gap between neighbouring values,
    `r = ratio` its largest gap over `δ`; `δ = r = 1` on the integers), the nearest code's logit is at least
    `−κ r²/4` and the code `o` steps away has at most `−κ (|o| − ½)²` (both hold when the nearest code is
    clamped to the box, which only widens the gap), so it trails by at least `κ ((|o| − ½)² − r²/4)`
    (`κ (o² − |o|)` on the integers). Once that exceeds the spread of the Gumbel draws it can never win
    the argmax. A 0.1% and one-unit margin covers float rounding; a NaN `kappa_min` keeps the whole window.
    """
    W = window
    q = ratio * ratio / 4
    while W > 1 and kappa_min * ((W - 0.5) * (W - 0.5) - q) * (1 - 1e-3) > spread + 1.0:
        W -= 1
    return W


def column_reach(problem: WorkingProblem, beta: torch.Tensor, window: int) -> Optional[list[int]]:
    """`reach` of every column for the draws of all rows, `n` ints `≤ window`, with `κ_j = min_i β_i s_ij² /
    U_jj²` (`beta` `(m,)`); None for a grid fitted during the walk, whose scales are not known beforehand.
    A kernel that weighs only the codes within a column's reach picks the winners of the whole window."""
    grid = problem.grid
    if grid.dynamic:
        return None
    gap, widest = grid.alphabet.gaps
    kappa = (beta.view(-1, 1) * (grid.scale * gap / problem.diagonal()) ** 2).amin(0)
    spread = gumbel_spread(problem.T.dtype)
    return [reach(k, window, spread, widest / gap) for k in kappa.tolist()]


def sampler(problem: WorkingProblem, paths: int, sampling: Sampling):
    """The reference walk's `choose` for `paths` candidates: path 0 rounds to nearest, the others draw
    by Gumbel-max among the codes within `sampling.window` steps (those a draw can reach, on the CPU)."""
    K, w, seed = paths, sampling.window, sampling.seed
    T = problem.T
    m, dev = T.shape[0], T.device
    beta = sampling.beta.unsqueeze(-1)                        # (m, 1)
    path = torch.arange(1, K, device=dev).view(-1, 1, 1)     # (K-1, 1, 1): path 0 is Babai
    if problem.draws is not None:                            # a stack: each row's own seed and row index
        seed, row = problem.draws[0].view(1, -1, 1), problem.draws[1].view(1, -1, 1)
    else:
        row = (torch.arange(m, device=dev) + sampling.row0).view(1, -1, 1)
    offs = torch.arange(-w, w + 1, device=dev, dtype=T.dtype)  # (2w+1,)
    slot = torch.arange(2 * w + 1, device=dev).view(1, 1, -1)
    # on the CPU only the codes a draw can reach get noise (the same draws, the same winner); on a
    # GPU the bound would cost a device sync per column, so the whole window is drawn
    spread = gumbel_spread(T.dtype) if dev.type == "cpu" else None
    alphabet = problem.grid.alphabet
    gap, widest = alphabet.gaps
    ratio = widest / gap

    def choose(t, s, z, lo, hi, d, j):
        c0 = alphabet.nearest(t, s, z, lo, hi)               # (K, m)
        d = d.unsqueeze(-1) if d.dim() else d                # per row (a stack): (m, 1)
        W = w if spread is None else reach((beta.view(1, -1) * (s[1:] * gap / d.view(-1)) ** 2).amin().item(), w, spread,
                                           ratio)
        offs_W, slot_W = offs[w - W:w + W + 1], slot[..., w - W:w + W + 1]
        cc = c0[1:].unsqueeze(-1) + offs_W                   # (K-1, m, 2W+1)
        dist = (t[1:].unsqueeze(-1) - s[1:].unsqueeze(-1) * (alphabet.value(cc) - z[1:].unsqueeze(-1))) / d
        logit = -beta * dist * dist
        logit = logit.masked_fill((cc < lo) | (cc > hi), -math.inf)
        u = uniform(seed, path, row, j, slot_W, dtype=T.dtype)
        g = -torch.log(-torch.log(u))
        pick = (logit + g).argmax(-1, keepdim=True)
        return torch.cat([c0[:1], cc.gather(-1, pick).squeeze(-1)], 0)
    return choose

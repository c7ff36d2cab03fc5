"""Babai nearest plane in a column order chosen per problem (`sorted-babai`).

The objective of a row, `(t − q)ᵀ H (t − q)`, does not depend on the order in which the columns are
decoded, but the Babai path does. This decoder picks an order from the problem, permutes the working
problem into it, runs the babai walk of the run's backend (`self.primitives`) and puts the codes back in the problem's order.

Orders (`order=`), computed from `P = H⁻¹ = Uᵀ U` and the grid steps `s_j` (mean of `s_ij²` over the rows,
all ones in lattice form):

- `vblast` (default): greedy successive-interference-cancellation order. Decoding column `j` first costs
  `e_j² = (t_j − q_j)² / P_jj`, so one grid step there is worth `r_j² = s_j² / P_jj`: take the column with
  the largest `r_j²` (the most reliable one), condition `P` on it (Schur complement
  `P ← P − P[:, j] P[j, :] / P_jj`) and repeat. This is a pivoted Cholesky factorisation of `P`, and the
  V-BLAST order of the lattice basis.
- `diag`: descending `diag H`, GPTQ's act-order.

The permuted problem's factor is recomputed, `U' = chol(P[π][:, π])` upper with `P[π][:, π] = U'ᵀ U'`; `T`,
the static grid's `scale` and `zero` and the box `lower`, `upper` are permuted with the columns.

With `keep_natural=true` (default) the natural-order Babai path is decoded too and, per row, the better of
the two is kept (by the problem's score when it has one, else by the path objective): the result is then
never worse than babai. A dynamic grid is refused: its groups are defined in decoding order, so reordering
the columns would change the quantization groups themselves.
"""
from __future__ import annotations

import torch

from ojbkq_core.decoders import DecodeResult, Decoder
from ojbkq_core.decoders.select import select
from ojbkq_core.errors import InputError
from ojbkq_core.grid import Grid
from ojbkq_core.problem import WorkingProblem

ORDERS = ("vblast", "diag")


def vblast_order(P: torch.Tensor, step2: torch.Tensor) -> torch.Tensor:
    """Greedy order `(n,)` long: repeatedly the remaining column with the largest `step2_j / P_jj`, then
    the Schur complement of `P` `(n, n)` (symmetric positive definite, float64) on the rest."""
    P = P.clone()
    n = P.shape[0]
    left = torch.ones(n, dtype=torch.bool, device=P.device)
    order = []
    for _ in range(n):
        gain = torch.where(left, step2 / P.diagonal(), torch.full_like(step2, -torch.inf))
        j = int(gain.argmax())
        order.append(j)
        left[j] = False
        P = P - torch.outer(P[:, j], P[j, :]) / P[j, j]
        P[j, j] = 1.0                       # keep the diagonal positive for the division above
    return torch.tensor(order, dtype=torch.long, device=P.device)


def diag_order(U: torch.Tensor) -> torch.Tensor:
    """Descending `diag H` `(n,)` with `H = (Uᵀ U)⁻¹ = Rlᵀ Rl`, `Rl = U⁻ᵀ`; stable for ties."""
    eye = torch.eye(U.shape[0], dtype=U.dtype, device=U.device)
    Rl = torch.linalg.solve_triangular(U, eye, upper=True).T
    return torch.argsort((Rl * Rl).sum(0), descending=True, stable=True)


def permute(problem: WorkingProblem, perm: torch.Tensor) -> WorkingProblem:
    """The same rows with columns in the order `perm` `(n,)`: `U` refactored, `T`, grid permuted."""
    U64 = problem.U.double()
    P = (U64.T @ U64)[perm][:, perm]
    U = torch.linalg.cholesky(P, upper=True).to(problem.U.dtype)
    g = problem.grid
    grid = Grid(g.lower[perm], g.upper[perm], g.scale[:, perm], g.zero[:, perm], alphabet=g.alphabet)
    return WorkingProblem(U, problem.T[:, perm], grid)


class SortedBabai(Decoder):
    name = "sorted-babai"
    params = {"order": "vblast", "keep_natural": True}
    description = "babai in a per-problem column order (V-BLAST or diag H), best of it and natural babai"

    def check(self, options):
        if options["order"] not in ORDERS:
            raise InputError(f"decoder 'sorted-babai': parameter order={options['order']!r}: "
                             f"choose one of {', '.join(ORDERS)}")
        if not isinstance(options["keep_natural"], bool):
            raise InputError(f"decoder 'sorted-babai': parameter keep_natural={options['keep_natural']!r} "
                             f"must be true or false")

    def order(self, problem: WorkingProblem) -> torch.Tensor:
        """The decoding order `(n,)` for this problem, as indices into its columns."""
        if self.options["order"] == "diag":
            return diag_order(problem.U.double())
        U = problem.U.double()
        step2 = (problem.grid.scale.double() ** 2).mean(0)
        return vblast_order(U.T @ U, step2)

    def decode(self, problem: WorkingProblem, seed: int = 0, row0: int = 0) -> DecodeResult:
        if problem.grid.dynamic:
            raise InputError("decoder 'sorted-babai' reorders columns and needs a static grid (a dynamic grid's "
                             "groups follow the decoding order): set quant.static_groups=true or "
                             "quant.group_size=-1, or use babai")
        perm = self.order(problem)
        inv = torch.argsort(perm)
        permuted = permute(problem, perm)            # the walk of the backend the run chose (`primitives`)
        res = self.primitives.walk(permuted, 1).single(permuted)
        codes, scale, zero = res.codes[:, inv], res.scale[:, inv], res.zero[:, inv]
        if not self.options["keep_natural"]:
            return DecodeResult(codes, scale, zero, res.objective, {"order": perm})
        nat = self.primitives.walk(problem, 1).single(problem)
        out = select(problem, torch.stack([codes, nat.codes]), torch.stack([scale, nat.scale]),
                     torch.stack([zero, nat.zero]), torch.stack([res.objective, nat.objective]))
        out.info["order"] = perm
        return out

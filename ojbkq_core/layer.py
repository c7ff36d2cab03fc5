"""The layer quantizer: objective + grid + decoder → codes (docs/formulation.md §1–§4).

    H, M   = objective.quadratic(stats)            # H_obj, Σ w A Bᵀ (undamped)
    dead   = diag(H) == 0  →  H_jj = 1, W[:, j] = 0
    perm   = act-order (descending diag H) or natural
    U      = chol((H + δ mean(diag H) I)⁻¹)ᵀ         # upper, decoding order
    T      = W + W (M − H) H_damped⁻¹              # = W for the symmetric (GPTQ) objective
    codes  = decoder(U, T, grid)
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from .decoders.base import Decoder
from .decoders.result import DecodeResult
from .errors import InputError
from .grid import INTEGERS, Alphabet, Grid, GridSpec, QuantSpec
from . import budget
from .linalg import inverse_cholesky, inverse_cholesky_blocked
from .objectives import Objective, ObjectiveSpec, PathScore, RowScore
from .problem import WorkingProblem
from .stats import Statistics

log = logging.getLogger("ojbkq")


@dataclass(init=False)
class LayerResult:
    """A quantized layer, in the layer's natural column order.

    `qweight` `(m, n)` dequantized float32 (kept in `stored_qweight`, or rebuilt from the codes when that
    was dropped to save memory); `codes` `(m, n)` integers in `[0, maxq]` (int64; the engine keeps the
    narrowest type); `scales`, `zeros` `(m, n_groups)`; `g_idx` `(n,)` int64 (each column's group);
    `perm` `(n,)` the decoding order; `row_loss` `(m,)` and `loss` the objective
    `Σ w ‖W A − Q B‖²_F / N` (float64, undamped). `alphabet`: the values the codes index (`qweight =
    scales · (alphabet.value(codes) − zeros)`); `global_scale`: an `nvfp4` layer's per-tensor scale (its
    `scales` are the stored FP8 scales divided by it), else None.
    """

    stored_qweight: Optional[torch.Tensor]
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor
    row_loss: torch.Tensor
    loss: float
    report: dict = field(default_factory=dict)
    alphabet: Alphabet = INTEGERS
    global_scale: Optional[float] = None

    def __init__(self, qweight: Optional[torch.Tensor], codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, g_idx: torch.Tensor, perm: torch.Tensor, row_loss: torch.Tensor,
                 loss: float, report: Optional[dict] = None, alphabet: Alphabet = INTEGERS,
                 global_scale: Optional[float] = None):
        self.stored_qweight, self.codes, self.scales, self.zeros = qweight, codes, scales, zeros
        self.g_idx, self.perm, self.row_loss, self.loss = g_idx, perm, row_loss, loss
        self.report = {} if report is None else report
        self.alphabet, self.global_scale = alphabet, global_scale

    @classmethod
    def weight_only(cls, Q: torch.Tensor) -> "LayerResult":
        """A result that carries the dequantized weight `Q` `(m, n)` alone: the layer was decoded by another
        process, which keeps its codes (`decoded_here` is False)."""
        empty = torch.empty(0)
        return cls(Q, None, empty, empty, empty, empty, empty, float("nan"), {"decoded_elsewhere": True})

    @property
    def decoded_here(self) -> bool:
        return self.codes is not None

    @property
    def qweight(self) -> torch.Tensor:
        if self.stored_qweight is not None:
            return self.stored_qweight
        g = self.g_idx.to(self.scales.device)
        return self.scales[:, g] * (self.alphabet.value(self.codes.float()) - self.zeros[:, g])

    @qweight.setter
    def qweight(self, Q: Optional[torch.Tensor]) -> None:
        self.stored_qweight = Q


def _static_grid(W: torch.Tensor, spec: GridSpec, fit):
    """Scale and zero `(m, n)` in natural order from the weights (`fit`: the grid's rule for a group), and `g_idx`."""
    m, n = W.shape
    if spec.group_size == -1:
        s, z = fit(W)
        return s[:, None].expand(m, n).contiguous(), z[:, None].expand(m, n).contiguous(), torch.zeros(n, dtype=torch.long)
    g = spec.group_size
    scale, zero = torch.empty_like(W), torch.empty_like(W)
    for i in range(0, n, g):
        s, z = fit(W[:, i:i + g])
        scale[:, i:i + g], zero[:, i:i + g] = s[:, None], z[:, None]
    return scale, zero, torch.arange(n) // g


@dataclass
class Factorization:
    """What the modules reading the same inputs share, for one objective: `dead` `(n,)` bool (columns
    with `diag H = 0`), the decoding order `perm` `(n,)`, `U` `(n, n)` upper with
    `(H_p + δ mean(diag H) I)⁻¹ = Uᵀ U` (decoding order), the relative damping `delta` and the absolute
    one `lam` (with `damp_steps`, every damping tried), and `MH = M − H_obj` `(n, n)` (natural order; a
    `Square` in the blocked form), `None` when `M = H_obj` (then `T = W`)."""

    dead: torch.Tensor
    perm: torch.Tensor
    U: torch.Tensor
    delta: float
    lam: float
    MH: Optional[Union[torch.Tensor, "Square"]]
    damp_steps: list


def factorize(stats: Statistics, objective: Objective, damp: float, act_order: bool, dtype, device,
              shared: Optional[dict] = None, plan: budget.Plan = budget.WHOLE) -> Factorization:
    """The `Factorization` of `objective` on `stats`; with `shared`, computed once per (statistics,
    objective terms, damping, order, dtype, device, plan) and reused. `plan.blocked`: built and factorised
    `plan.block` columns at a time (`factorize_blocked`)."""
    key = (stats, objective.terms, damp, act_order, dtype, str(device), plan.blocked, plan.block)
    if shared is not None and key in shared:
        return shared[key]
    if plan.blocked:
        f = factorize_blocked(stats, objective, damp, act_order, dtype, device, plan.block)
    else:
        f = factorize_whole(stats, objective, damp, act_order, dtype, device)
    if shared is not None:
        shared[key] = f
    return f


def factorize_whole(stats: Statistics, objective: Objective, damp: float, act_order: bool, dtype,
                    device) -> Factorization:
    """`factorize` holding the whole `(n, n)` matrices: `H_obj` and `M`, the permuted copy, the Cholesky factors."""
    Hraw, M = (x.to(device=device, dtype=dtype) for x in objective.quadratic(stats))
    MH = None if torch.equal(M, Hraw) else M - Hraw
    del M
    H = Hraw
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        Hp = H[perm][:, perm]
    else:
        perm = torch.arange(H.shape[0], device=device)
        Hp = H
    del H, Hraw
    damp_steps: list = []
    U, _, delta = inverse_cholesky(Hp, damp, steps=damp_steps)
    return Factorization(dead, perm, U, delta, delta * float(Hp.diagonal().mean()), MH, damp_steps)


def factorize_blocked(stats: Statistics, objective: Objective, damp: float, act_order: bool, dtype, device,
                      block: int) -> Factorization:
    """`factorize` for a layer too wide to hold the whole-matrix form: `H_obj` is built from the statistics'
    sums `block` columns at a time, already in decoding order, and factorised in place
    (`linalg.inverse_cholesky_blocked`); `M − H_obj` is a `Square`, multiplied a block of columns at a time.
    Holds one `(n, n)` tensor besides the statistics. Equal to `factorize` up to rounding."""
    h, mh = objective.coefficients()
    n = stats.n
    sums = stats.sums
    diag = sum(c * sums["C" if k == "Ct" else k].diagonal().to(device=device, dtype=dtype)
               for k, c in h.items() if c) / stats.count
    dead = diag == 0
    diag[dead] = 1
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    else:
        perm = torch.arange(n, device=device)
    dead_p = dead[perm].nonzero().flatten()

    def build():
        H = _square(stats, h, perm, dtype, device, block)
        H.diagonal()[dead_p] = 1
        return H
    damp_steps: list = []
    U, delta, mean_diag = inverse_cholesky_blocked(build, damp, block, steps=damp_steps)
    MH = Square(stats, mh, dtype, device, block) if any(mh.values()) else None
    return Factorization(dead, perm, U, delta, delta * mean_diag, MH, damp_steps)


def _square(stats: Statistics, coefficients: dict, perm: Optional[torch.Tensor], dtype, device, block: int):
    """`Σ c_k S_k` `(n, n)` over the statistics' means (`"Ct"`: `Cᵀ`), rows and columns in the order `perm`
    (None: natural), built `block` columns at a time from the sums."""
    n = stats.n
    out = torch.empty(n, n, dtype=dtype, device=device)
    for c0 in range(0, n, block):
        c1 = min(c0 + block, n)
        out[:, c0:c1] = _square_columns(stats, coefficients, perm, c0, c1, dtype, device)
    return out


def _square_columns(stats: Statistics, coefficients: dict, perm: Optional[torch.Tensor], c0: int, c1: int,
                    dtype, device) -> torch.Tensor:
    """Columns `c0…c1−1` `(n, c1 − c0)` of `_square`'s matrix."""
    acc = None
    for key, c in coefficients.items():
        if c == 0:
            continue
        S = stats.sums["C" if key == "Ct" else key]
        cols = torch.arange(c0, c1, device=S.device) if perm is None else perm[c0:c1].to(S.device)
        part = S.index_select(0, cols).T if key == "Ct" else S.index_select(1, cols)
        if perm is not None:
            part = part.index_select(0, perm.to(S.device))
        part = (part.to(device) / stats.count).to(dtype)
        acc = part.mul_(c) if acc is None else acc.add_(part, alpha=c)
    return acc


@dataclass
class Square:
    """`Σ c_k S_k` `(n, n)` over the statistics' means, rows and columns in the order `perm` (None: natural),
    never held whole: `times(W, square)` builds `W @ square` `block` columns at a time (the blocked form's
    `M − H_obj`)."""

    stats: Statistics
    coefficients: dict
    dtype: torch.dtype
    device: torch.device
    block: int
    perm: Optional[torch.Tensor] = None

    def permuted(self, perm: torch.Tensor) -> "Square":
        """The same matrix with rows and columns in the order `perm` (`P ᵀ S P`)."""
        return Square(self.stats, self.coefficients, self.dtype, self.device, self.block, perm)


def times(W: torch.Tensor, M) -> torch.Tensor:
    """`W @ M` `(m, n)` for a matrix or a `Square`."""
    if not isinstance(M, Square):
        return W @ M
    n = M.stats.n
    out = torch.empty(W.shape[0], n, dtype=W.dtype, device=W.device)
    for c0 in range(0, n, M.block):
        c1 = min(c0 + M.block, n)
        out[:, c0:c1] = W @ _square_columns(M.stats, M.coefficients, M.perm, c0, c1, M.dtype, M.device)
    return out


def quantize_layer(
    W: torch.Tensor,
    stats: Statistics,
    objective: Union[Objective, ObjectiveSpec],
    grid: GridSpec,
    decoder: Decoder,
    damp: float = QuantSpec.damp,
    seed: int = 0,
    score_objective: Optional[Objective] = None,
    max_rows: Optional[int] = None,
    rng: Optional[np.random.Generator] = None,
    dtype: torch.dtype = torch.float32,
    row0: int = 0,
    shared: Optional[dict] = None,
    plan: Optional[budget.Plan] = None,
) -> LayerResult:
    """Quantize `W` `(m, n)` (any float dtype, any device) given its calibration statistics.

    `objective` may be an `ObjectiveSpec` with sampled parameters: they are drawn from `rng` (or a
    generator seeded with `seed`) and recorded in `report["draws"]`. `max_rows` decodes the rows in
    chunks of at most that many (rows are independent problems sharing `H`). `row0`: `W` holds the rows
    `row0, row0 + 1, …` of a larger layer, decoded on their own; seeded decoders draw by the global row
    index, so the rows get the codes they get when the whole layer is decoded. `shared`: a dict the
    caller keeps while it quantizes modules that read the same inputs (q/k/v, gate/up): their
    `Factorization` is computed once (see `factorize`). `plan`: the whole-matrix or column-blocked form
    (`budget.plan`: the whole-matrix form wherever it fits the device's memory); the blocked form finishes
    `plan.rows` rows at a time and keeps the codes in the narrowest integer type.
    """
    prep = prepare_layer(W, stats, objective, grid, decoder, damp, seed, score_objective, rng, dtype, shared, plan)
    return finish_layer(prep, lambda pr, i: decoder.decode(pr, seed=seed, row0=row0 + i), max_rows)


def full_height(grid: GridSpec, decoder: Decoder, score_objective: Optional[Objective] = None) -> int:
    """`(m, n)` tensors the blocked form holds for the whole layer (`budget.blocked_bytes`): `budget.FULL_HEIGHT`,
    a static grid's scales and zeros in both orders, a progressive decoder's correction `G`, and a scoring
    objective's natural weight and `W M`."""
    static = grid.group_size == -1 or grid.static_groups
    return budget.FULL_HEIGHT + 4 * static + int(decoder.progressive) + 2 * (score_objective is not None)


@dataclass
class Prepared:
    """A layer ready to decode (`prepare_layer`): its `problem` in decoding order and what `finish_layer`
    needs to put the codes back in natural order and report them: `W` `(m, n)` float, natural order, dead
    columns zeroed (None in the blocked form, which keeps only `Wp`, the same in decoding order)."""

    problem: WorkingProblem
    W: Optional[torch.Tensor]
    Wp: torch.Tensor
    stats: Statistics
    objective: Objective
    grid: GridSpec
    g: Grid
    g_idx: torch.Tensor
    f: Factorization
    plan: budget.Plan
    decoder: Decoder
    draws: dict
    global_scale: Optional[float]
    t0: float


def prepare_layer(W, stats, objective, grid, decoder, damp=QuantSpec.damp, seed=0, score_objective=None, rng=None,
                  dtype=torch.float32, shared=None, plan=None) -> Prepared:
    """The first half of `quantize_layer` (same arguments): checks, objective draws, grid, factorisation and
    targets, up to the `WorkingProblem`."""
    t0 = time.perf_counter()
    if W.ndim != 2:
        raise InputError(f"weight must be 2-D (m, n), got shape {tuple(W.shape)}")
    m, n = W.shape
    if stats.n != n:
        raise InputError(f"weight has n={n} input columns but the statistics are {stats.n}×{stats.n}")
    draws = {}
    if isinstance(objective, ObjectiveSpec):
        objective, draws = objective.build(rng if rng is not None else np.random.default_rng(seed))
    missing = objective.needs - stats.needs
    if missing:
        raise InputError(f"objective '{objective.name}' needs statistics {sorted(missing)} that were not accumulated")
    dev = W.device
    if plan is None:
        plan = budget.plan(m, n, dev, torch.finfo(dtype).bits // 8, stats.bytes_on(dev),
                           full_height(grid, decoder, score_objective))
    W = W.to(dtype).clone()
    static = grid.group_size == -1 or grid.static_groups
    global_scale = grid.global_scale_of(W)            # nvfp4: from the weight as it comes
    fit = functools.partial(grid.fit, global_scale=global_scale)
    if grid.group_size == -1:               # GPTQ: one grid per row, fitted before dead columns are zeroed
        scale_nat, zero_nat, g_idx = _static_grid(W, grid, fit)
    f = factorize(stats, objective, damp, grid.act_order, dtype, dev, shared, plan)
    W[:, f.dead] = 0
    if grid.group_size != -1 and grid.static_groups:
        scale_nat, zero_nat, g_idx = _static_grid(W, grid, fit)

    perm, U = f.perm, f.U
    Wp = W[:, perm]
    if plan.blocked and score_objective is None:
        W = None                                      # the natural rows are Wp's, put back a chunk at a time
    if f.MH is None:                                  # M = H_obj: T = W
        G, T = None, Wp
    elif plan.blocked:
        T, G = _targets_by_rows(Wp, f.MH.permuted(perm), U, plan.rows or m, decoder.progressive)
    else:                                             # T = W + D H_d⁻¹ = W + (D Uᵀ) U, decoding order
        D = times(W, f.MH)[:, perm]
        G = D @ U.T
        T = Wp + G @ U

    lower = torch.zeros(n, dtype=dtype, device=dev)
    upper = torch.full((n,), float(grid.maxq), dtype=dtype, device=dev)
    if static:
        g = Grid(lower, upper, scale_nat[:, perm].to(dev), zero_nat[:, perm].to(dev), alphabet=grid.alphabet)
    else:
        g = Grid(lower, upper, group_size=grid.group_size, fit=fit, alphabet=grid.alphabet)
        g_idx = torch.empty(n, dtype=torch.long)
        g_idx[perm.cpu()] = torch.arange(n) // grid.group_size
    problem = WorkingProblem(U, T, g)
    if decoder.progressive:
        problem.base, problem.inject = Wp, (torch.zeros_like(Wp) if G is None else G)
    # candidates are chosen by the exact (undamped) objective value per row: the decoded objective's,
    # from the loss accumulated along each walk, unless a separate scoring objective is given
    if score_objective is not None:
        problem.score = RowScore.of(score_objective, W, stats, perm)
    else:
        problem.score = PathScore(Wp, f.lam, f.dead[perm].nonzero().flatten())
    return Prepared(problem, W, Wp, stats, objective, grid, g, g_idx, f, plan, decoder, draws, global_scale, t0)


def _targets_by_rows(Wp: torch.Tensor, MHp: "Square", U: torch.Tensor, rows: int, keep_G: bool):
    """The blocked form's targets `T = Wp + (D Uᵀ) U` `(m, n)` in decoding order, with `D = Wp (M − H_obj)_pp`
    (`MHp` in decoding order, so `D` needs no permuted copy), written over `D` `rows` rows at a time: one
    full-height tensor besides `Wp` (and `G = D Uᵀ` when `keep_G`, for a progressive decoder). Returns `T, G`."""
    T = times(Wp, MHp)
    G = torch.empty_like(T) if keep_G else None
    for r0 in range(0, T.shape[0], rows):
        r = slice(r0, r0 + rows)
        Gr = T[r] @ U.T
        T[r] = Wp[r] + Gr @ U
        if G is not None:
            G[r] = Gr
    return T, G


def finish_layer(prep: Prepared, decode, max_rows: Optional[int] = None) -> LayerResult:
    """The second half of `quantize_layer`: `decode(problem rows, first row)` → `DecodeResult` on chunks of
    rows (`plan.rows`, else `max_rows`, else all), the codes in natural order, the objective, the report."""
    problem, W, Wp, objective, g, g_idx, f, plan = (prep.problem, prep.W, prep.Wp, prep.objective, prep.g,
                                                    prep.g_idx, prep.f, prep.plan)
    perm, dev = f.perm, Wp.device
    m, n = Wp.shape
    t1 = time.perf_counter()
    inv = torch.argsort(perm)
    natural = (lambda r0, r1: W[r0:r1]) if W is not None else (lambda r0, r1: Wp[r0:r1][:, inv])  # noqa: E731
    Q_all = torch.empty(m, n, dtype=Wp.dtype, device=dev) if plan.blocked else None
    n_groups = int(g_idx.max()) + 1
    first = torch.zeros(n_groups, dtype=torch.long)
    for gi in range(n_groups - 1, -1, -1):
        first[gi] = int((g_idx == gi).nonzero()[0])
    first = first.to(dev)
    stats64 = _Double(prep.stats, dev)

    def finish(parts, r0, r1):
        """Codes, scales, zeros of rows `r0…r1−1`, natural order, and in the whole form their dequantized
        weight and objective (the blocked form writes the weight into `Q_all`)."""
        codes = torch.cat([p.codes for p in parts])[:, inv]
        scale = torch.cat([p.scale for p in parts])[:, inv]
        zero = torch.cat([p.zero for p in parts])[:, inv]
        Q = g.dequantize(codes, scale, zero)
        codes = codes.round()
        if plan.blocked:                          # written in place; the objective once all rows are in
            Q_all[r0:r1] = Q
            return codes.to(_narrowest(prep.grid.maxq)), scale[:, first].float(), zero[:, first].float()
        row_loss = objective.value(W[r0:r1].double(), Q.double(), stats64).cpu()
        return codes.long(), scale[:, first].float(), zero[:, first].float(), Q.float(), row_loss

    chunk = plan.rows or max_rows or m
    parts = []
    finished = []
    for i in range(0, m, chunk):
        parts.append(decode(problem.rows(slice(i, i + chunk)), i))
        if plan.blocked:                          # finish each chunk; keep only its result
            finished.append(finish(parts[-1:], i, min(i + chunk, m)))
            p = parts[-1]
            parts[-1] = DecodeResult(*(x.new_empty((0, *x.shape[1:])) for x in (p.codes, p.scale, p.zero)),
                                     p.objective, p.info)     # empty, not views that would keep the chunk
    t2 = time.perf_counter()
    if not plan.blocked:
        finished.append(finish(parts, 0, m))
    codes, scales, zeros = (torch.cat(x) for x in list(zip(*finished))[:3])
    if plan.blocked:
        row_loss = _row_losses(objective, natural, Q_all, stats64, plan.block, chunk).cpu()
        Q = Q_all.float()
    else:
        Q, row_loss = torch.cat([f[3] for f in finished]), torch.cat([f[4] for f in finished])
    del finished
    report = {
        "objective": objective.describe(),
        "decoder": repr(prep.decoder),
        "backend": parts[0].info.get("backend", "reference"),
        "draws": prep.draws,
        "damp": f.delta,
        "damp_steps": f.damp_steps,
        "dead_columns": int(f.dead.sum()),
        "path_objective": float(torch.cat([p.objective for p in parts]).double().sum()),
        "seconds": {"prepare": t1 - prep.t0, "decode": t2 - t1, "total": time.perf_counter() - prep.t0},
    }
    if plan.blocked:
        report["blocked"] = {"block": plan.block, "rows": plan.rows}
    infos = [p.info for p in parts if p.info]
    if infos and "candidate" in infos[0]:
        report["candidate_histogram"] = torch.bincount(torch.cat([i["candidate"].cpu() for i in infos])).tolist()
    return LayerResult(
        qweight=Q, codes=codes, scales=scales, zeros=zeros,
        g_idx=g_idx.cpu(), perm=perm.cpu(), row_loss=row_loss, loss=float(row_loss.sum()), report=report,
        alphabet=prep.grid.alphabet, global_scale=prep.global_scale,
    )


def quantize_stack(Ws: list[torch.Tensor], stats: list[Statistics], objectives: list[Objective], grid: GridSpec,
                   decoder: Decoder, damp: float = QuantSpec.damp, seeds: Optional[list[int]] = None,
                   dtype: torch.dtype = torch.float32) -> list[LayerResult]:
    """Layers of one shape `(m, n)` with their own statistics and objectives (the experts of a group), decoded
    by one call of `decoder` on their stacked problems (`WorkingProblem.stack`, each with its own `U`) when it
    can (`decoder.stackable`, the whole-matrix form, one grid rule for all, and a backend whose walk takes a
    stack where it has one for a single layer); each result is what
    `quantize_layer(Ws[e], stats[e], objectives[e], grid, decoder, damp, seed=seeds[e])` gives, up to the
    rounding of the batched products."""
    seeds = list(seeds) if seeds is not None else [0] * len(Ws)
    shared: dict = {}                                 # layers reading one input (an expert's gate and up) share U
    preps = [prepare_layer(W, st, obj, grid, decoder, damp, seed, dtype=dtype, shared=shared)
             for W, st, obj, seed in zip(Ws, stats, objectives, seeds)]
    alone = lambda p, seed: finish_layer(p, lambda pr, i: decoder.decode(pr, seed=seed, row0=i))  # noqa: E731
    one_rule = all(not p.g.dynamic or p.global_scale is None for p in preps)
    if len(preps) < 2 or not decoder.stackable or not one_rule or any(p.plan.blocked for p in preps):
        return [alone(p, seed) for p, seed in zip(preps, seeds)]
    stacked = WorkingProblem.stack([p.problem for p in preps], seeds)
    if decoder.primitives.native("walk", preps[0].problem) and not decoder.primitives.native("walk", stacked):
        return [alone(p, seed) for p, seed in zip(preps, seeds)]   # a backend's kernels, one expert at a time
    res = decoder.decode(stacked, seed=seeds[0])
    m = preps[0].problem.m
    out = []
    for e, p in enumerate(preps):
        part = _rows_of(res, e * m, (e + 1) * m)
        out.append(finish_layer(p, lambda pr, i, part=part: part))
        out[-1].report["stacked"] = len(preps)
    return out


def _row_losses(objective: Objective, natural, Q: torch.Tensor, stats64: "_Double", cols: int, rows: int):
    """`objective.value` per row `(m,)` float64 of the dequantized `Q` `(m, n)` against the weight's rows
    (`natural(r0, r1)`), reading each block of `cols` columns of the statistics once (from the host, when they
    were moved there) and going over the rows `rows` at a time under it."""
    m, n = Q.shape
    out = torch.zeros(m, dtype=torch.float64, device=Q.device)
    for c in range(0, n, cols):
        st = stats64.columns(slice(c, c + cols))
        for r0 in range(0, m, rows):
            r1 = min(r0 + rows, m)
            objective.value_columns(natural(r0, r1).double(), Q[r0:r1].double(), st, slice(c, c + cols), out[r0:r1])
    return out


def _rows_of(res: DecodeResult, r0: int, r1: int) -> DecodeResult:
    """Rows `r0…r1−1` of a decoded stack (an `info` tensor is cut along its last dimension)."""
    info = {k: v[..., r0:r1] if isinstance(v, torch.Tensor) else v for k, v in res.info.items()}
    return DecodeResult(res.codes[r0:r1], res.scale[r0:r1], res.zero[r0:r1], res.objective[r0:r1], info)


def _narrowest(maxq: int) -> torch.dtype:
    return torch.uint8 if maxq <= 255 else torch.int16 if maxq < 2 ** 15 else torch.int32


class _Double:
    """The statistics in float64 on `device`, for the reported objective value: each read converts
    afresh, so that no more than the matrix in use is held in float64."""

    def __init__(self, stats, device):
        self.stats, self.device = stats, device

    def _get(self, key):
        v = getattr(self.stats, key)
        return None if v is None else v.to(device=self.device, dtype=torch.float64)

    H = property(lambda self: self._get("H"))
    C = property(lambda self: self._get("C"))
    G = property(lambda self: self._get("G"))

    def columns(self, sl: slice) -> "_Columns":
        """The columns `sl` of each statistic (and of `Cᵀ`), each read converting only those columns."""
        return _Columns(self.stats, self.device, sl)


class _Columns:
    """Columns `sl` of the statistics' means in float64 on `device`: `H`, `C`, `G` `(n, k)` and `Ct`, the
    same columns of `Cᵀ`, each read converting afresh; sums held on another device (the host) are copied
    over once, in their own dtype, and kept while this object lives."""

    def __init__(self, stats, device, sl):
        self.stats, self.device, self.sl = stats, device, sl
        self._copied: dict = {}

    def _get(self, key, transpose=False):
        part = self._copied.get((key, transpose))
        if part is None:
            S = self.stats.sums[key]
            part = S[self.sl].T if transpose else S[:, self.sl]
            if S.device.type != torch.device(self.device).type:
                part = self._copied[key, transpose] = part.to(self.device)
        return (part.to(self.device) / self.stats.count).to(torch.float64)

    H = property(lambda self: self._get("H"))
    C = property(lambda self: self._get("C"))
    G = property(lambda self: self._get("G"))
    Ct = property(lambda self: self._get("C", transpose=True))

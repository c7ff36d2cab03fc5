"""Property tests of the decoders (docs/formulation.md §6), checked against brute force on small random problems.

Problems are drawn jointly with their box so that the box never holds more than `MAX_POINTS` points:
`exhaustive` stays fast and is the ground truth for everything else. Bases are well or ill conditioned
(singular values spread over up to four decades), in `A` form or upper-triangular `R` form, with one to
three right-hand sides. Run more examples with `HYPOTHESIS_PROFILE=thorough`.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ojbkq_core.decoders import RTN, Babai, Beam, Exact, Exhaustive, Klein, Successive
from ojbkq_core.grid import Grid, GridSpec
from ojbkq_core.layer import quantize_layer
from ojbkq_core.linalg import inverse_cholesky
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.problem import BILSProblem, WorkingProblem
from ojbkq_core.solve import solve
from ojbkq_core.stats import Statistics

MAX_POINTS = 5000
RTOL = 1e-9


def all_decoders():
    return [RTN(), Babai(), Klein(), Klein(k=3, window=1), Successive(), Beam(), Beam(width=2, expand=1),
            Exact(), Exhaustive()]


def not_worse(a, b, rtol=RTOL):
    """Elementwise `a ≤ b` up to a relative tolerance (both non-negative objective values)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.all(a <= b + rtol * np.maximum(np.abs(b), 1.0))


def same_value(a, b, rtol=RTOL):
    return not_worse(a, b, rtol) and not_worse(b, a, rtol)


# --- strategies -----------------------------------------------------------------------------------

@st.composite
def boxes(draw, max_n=8, max_width=8, max_points=MAX_POINTS):
    """`(n, lower, upper)`: a scalar box (ints) or a per-coordinate one (`(n,)` int arrays) with at most
    `max_points` points."""
    n = draw(st.integers(1, max_n))
    lo0 = draw(st.integers(-3, 3))
    if draw(st.booleans()):
        w = 1
        while w < max_width and (w + 1) ** n <= max_points:
            w += 1
        width = draw(st.integers(1, w))
        return n, lo0, lo0 + width - 1
    widths, budget = [], max_points
    for _ in range(n):
        width = draw(st.integers(1, min(max_width, budget)))
        widths.append(width)
        budget //= width
    order = draw(st.permutations(range(n)))
    widths = np.array(widths)[list(order)]
    lower = np.array(draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), dtype=np.int64)
    return n, lower, lower + widths - 1


def spread_basis(rng, m, n, decades):
    """`(m, n)` with singular values spread log-uniformly over `decades` decades, random scale."""
    Q1, _ = np.linalg.qr(rng.normal(size=(m, n)))
    Q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    sv = np.logspace(0, -decades, n) * 10 ** rng.uniform(-1, 1)
    return (Q1 * rng.permutation(sv)) @ Q2.T


@st.composite
def bils_problems(draw, form=None):
    """A random `BILSProblem`: form `A`, `R` (upper triangular) or `diag` (diagonal `R`)."""
    n, lower, upper = draw(boxes())
    form = form or draw(st.sampled_from(["A", "R"]))
    decades = draw(st.sampled_from([0.0, 1.0, 2.0, 3.0, 4.0]))
    p = draw(st.integers(1, 3))
    one_d = p == 1 and draw(st.booleans())
    noise = draw(st.sampled_from([0.0, 0.1, 0.5, 2.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = n + draw(st.integers(0, 3)) if form == "A" else n
    B = spread_basis(rng, m, n, decades)
    if form == "R":
        B = np.linalg.qr(B)[1]
    elif form == "diag":
        B = np.diag(rng.choice([-1, 1], n) * np.diag(np.linalg.qr(B)[1]))
    lo = np.broadcast_to(lower, (n,))
    hi = np.broadcast_to(upper, (n,))
    width = hi - lo + 1
    z_true = rng.integers(lo - width // 2, hi + width // 2 + 1, size=(p, n)).T      # some optima on faces
    y = B @ z_true + noise * np.linalg.norm(B, axis=0).mean() * rng.normal(size=(m, p))
    y = y[:, 0] if one_d else y
    kw = {"A": B} if form == "A" else {"R": B}
    return BILSProblem.create(y, lower, upper, **kw)


def residuals(P, dec, seed=0):
    return np.atleast_1d(solve(P, dec, seed=seed).residual)


# --- lattice form ---------------------------------------------------------------------------------

@given(P=bils_problems(), seed=st.integers(0, 2**31 - 1))
def test_every_decoder_stays_in_the_box_and_exhaustive_is_a_lower_bound(P, seed):
    best = residuals(P, Exhaustive())
    lower, upper = P.lower, P.upper
    for dec in all_decoders():
        sol = solve(P, dec, seed=seed)
        assert sol.z.dtype == np.int64 and sol.z.shape == (P.n,) + P.y.shape[1:]
        Z = sol.z if sol.z.ndim == 2 else sol.z[:, None]
        assert np.all(Z >= lower[:, None]) and np.all(Z <= upper[:, None]), dec
        np.testing.assert_allclose(sol.residual, P.residual(sol.z), rtol=1e-12)
        assert not_worse(best, np.atleast_1d(sol.residual), rtol=1e-7), dec


@given(P=bils_problems(form="diag"))
def test_babai_on_a_diagonal_R_is_optimal(P):
    assert same_value(residuals(P, Babai()), residuals(P, Exhaustive()))


@given(P=bils_problems())
def test_exact_equals_exhaustive(P):
    assert same_value(residuals(P, Exact()), residuals(P, Exhaustive()))


@given(P=bils_problems())
def test_beam_without_pruning_equals_exhaustive(P):
    points = int(np.prod(P.upper - P.lower + 1))
    width = int((P.upper - P.lower).max()) + 1
    assert same_value(residuals(P, Beam(width=points, expand=width)), residuals(P, Exhaustive()))


@given(P=bils_problems(), seed=st.integers(0, 2**31 - 1), beta=st.floats(0.05, 20.0))
def test_klein_is_never_worse_than_babai_and_more_candidates_never_hurt(P, seed, beta):
    wp, _, _ = P.working()
    babai = Babai().decode(wp).objective
    default = Klein().decode(wp, seed=seed)
    assert not_worse(default.objective, babai)
    assert torch.equal(default.info["candidate_scores"][0], babai)        # candidate 0 is the Babai path
    few = Klein(k=4).decode(wp, seed=seed)                                   # default β does not depend on k
    assert torch.equal(default.info["candidate_scores"][:4], few.info["candidate_scores"])
    assert not_worse(default.objective, few.objective)
    k4 = Klein(k=4, beta=beta).decode(wp, seed=seed)
    k16 = Klein(k=16, beta=beta).decode(wp, seed=seed)
    assert not_worse(k4.objective, babai)
    assert torch.equal(k16.info["candidate_scores"][:4], k4.info["candidate_scores"])
    assert not_worse(k16.objective, k4.objective)
    assert not_worse(residuals(P, Klein(), seed), residuals(P, Babai()), rtol=1e-7)


@given(P=bils_problems(), width=st.integers(1, 6), expand=st.integers(1, 3))
def test_beam_is_never_worse_than_babai(P, width, expand):
    wp, _, _ = P.working()
    assert not_worse(Beam(width=width, expand=expand).decode(wp).objective, Babai().decode(wp).objective)


@given(P=bils_problems(), seed=st.integers(0, 2**31 - 1))
def test_path_objective_is_the_quadratic_form_and_the_residual(P, seed):
    """`Σ e_j² = (t − q)ᵀ H (t − q)` with `H = AᵀA` in decoding order, and `‖y − A z‖² = Σ e_j² + const`."""
    wp, perm, const = P.working()
    Bp = P.basis[:, perm]
    H = Bp.T @ Bp
    T = wp.T.numpy()
    scale_y = (P.Y**2).sum(0)
    for dec in all_decoders():
        res = dec.decode(wp, seed=seed)
        obj = res.objective.numpy()
        D = T - res.values.numpy()
        direct = np.einsum("ij,jk,ik->i", D, H, D)
        np.testing.assert_allclose(obj, direct, rtol=1e-6, atol=1e-9 * (1 + scale_y).max(), err_msg=repr(dec))
        Z = np.empty((P.n, wp.m), dtype=np.int64)
        Z[perm] = np.rint(res.codes.numpy()).T
        resid = ((P.Y - P.basis @ Z) ** 2).sum(0)
        np.testing.assert_allclose(obj + const, resid, rtol=1e-7, atol=1e-9 * (1 + scale_y).max(), err_msg=repr(dec))


@given(P=bils_problems(), seed=st.integers(0, 2**31 - 1))
def test_decoders_are_deterministic_for_a_seed(P, seed):
    wp, _, _ = P.working()
    for dec in all_decoders():
        a, b = dec.decode(wp, seed=seed), dec.decode(wp, seed=seed)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.objective, b.objective), dec


# --- layer form -----------------------------------------------------------------------------------

def correlated_inputs(rng, N, n, mismatch):
    """Runtime and full-precision inputs `(N, n)` float64 with correlated features (a random mixing
    matrix with column scales over two decades)."""
    mix = rng.normal(size=(n, n)) * np.logspace(0, -2, n)
    X = rng.normal(size=(N, n)) @ mix
    Xfp = X + mismatch * rng.normal(size=(N, n)) @ mix
    return torch.from_numpy(X), torch.from_numpy(Xfp)


@st.composite
def layers(draw, max_m=6, max_n=8):
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W = torch.from_numpy(rng.normal(size=(m, n)) * 10 ** rng.uniform(-2, 0))
    X, Xfp = correlated_inputs(rng, 4 * n + 8, n, draw(st.sampled_from([0.0, 0.05, 0.3])))
    return W, X, Xfp


@st.composite
def grid_specs(draw, n):
    bits = draw(st.integers(2, 3))
    group_size = draw(st.sampled_from([-1, 2, 4]))
    return GridSpec(bits=bits, group_size=group_size, sym=draw(st.booleans()), act_order=draw(st.booleans()),
                    static_groups=group_size != -1 and draw(st.booleans()))


@st.composite
def objective_specs(draw):
    name = draw(st.sampled_from(sorted(PRESETS)))
    params = {}
    if name == "regularized":
        params["alpha"] = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    elif name == "jta":
        params = {"mu": draw(st.sampled_from([0.2, 0.6, 1.0])), "lam": draw(st.sampled_from([0.0, 0.6, 1.0]))}
    return preset(name, *PRESETS[name], **params)


def all_stats(X, Xfp):
    return Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"), dtype=torch.float64)


@given(layer=layers(), data=st.data(), objective=objective_specs(), seed=st.integers(0, 2**31 - 1))
def test_layer_codes_in_range_and_candidates_never_worse_than_babai(layer, data, objective, seed):
    W, X, Xfp = layer
    grid = data.draw(grid_specs(W.shape[1]))
    stats = all_stats(X, Xfp)
    static = grid.group_size == -1 or grid.static_groups
    decoders = [RTN(), Babai(), Klein(), Klein(k=5, beta=2.0), Successive(), Beam(), Beam(width=3, expand=1)]
    if static:
        decoders.append(Exact())
    out = {}
    for dec in decoders:
        r = quantize_layer(W, stats, objective, grid, dec, seed=seed, dtype=torch.float64)
        assert r.codes.dtype == torch.int64 and r.codes.shape == W.shape
        assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= grid.maxq, dec
        Q = r.scales[:, r.g_idx] * (r.codes - r.zeros[:, r.g_idx])
        torch.testing.assert_close(Q, r.qweight, rtol=1e-5, atol=1e-6 * float(W.abs().max()))
        out[repr(dec)] = r
    babai = out[repr(Babai())].row_loss.numpy()
    for name, r in out.items():
        if name.startswith(("Klein", "Beam")):
            # the objective's own score chooses among candidates, and the Babai path is one of them
            assert not_worse(r.row_loss.numpy(), babai, rtol=1e-7), name


@given(layer=layers(), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_regularized_endpoints_are_symmetric_and_asymmetric(layer, data, seed):
    W, X, Xfp = layer
    grid = data.draw(grid_specs(W.shape[1]))
    stats = all_stats(X, Xfp)
    spec = lambda name, **kw: preset(name, *PRESETS[name], **kw)  # noqa: E731
    for dec in (Babai(), Klein(k=4), Beam(width=2), Successive()):
        run = lambda obj: quantize_layer(W, stats, obj, grid, dec, seed=seed, dtype=torch.float64)  # noqa: E731
        r0, sym = run(spec("regularized", alpha=0.0)), run(spec("symmetric"))
        assert torch.equal(r0.codes, sym.codes), dec
        r1, asym = run(spec("regularized", alpha=1.0)), run(spec("asymmetric"))
        assert torch.equal(r1.codes, asym.codes), dec
        torch.testing.assert_close(r1.row_loss, asym.row_loss, rtol=1e-12, atol=0)


@st.composite
def layer_working_problems(draw):
    """A layer's `WorkingProblem` with a static 2-bit grid of per-row scales and zeros, `n ≤ 6` so that
    the box `[0, 3]ⁿ` stays small, and the damped `H` it was built from."""
    W, X, _ = draw(layers(max_n=6))
    sym = draw(st.booleans())
    H = X.T @ X / X.shape[0]
    U, Hd, _ = inverse_cholesky(H, damp=draw(st.sampled_from([1e-4, 0.01, 0.1])))
    spec = GridSpec(bits=2, sym=sym)
    s, z = spec.fit(W)
    m, n = W.shape
    grid = Grid(torch.zeros(n, dtype=W.dtype), torch.full((n,), float(spec.maxq), dtype=W.dtype),
                s[:, None].expand(m, n).contiguous(), z[:, None].expand(m, n).contiguous())
    return WorkingProblem(U, W.clone(), grid), Hd


@given(wph=layer_working_problems(), seed=st.integers(0, 2**31 - 1))
def test_layer_working_problem_against_exhaustive(wph, seed):
    wp, Hd = wph
    best = Exhaustive().decode(wp).objective
    babai = Babai().decode(wp).objective
    for dec in all_decoders():
        res = dec.decode(wp, seed=seed)
        assert torch.all((res.codes >= 0) & (res.codes <= 3)) and torch.equal(res.codes, res.codes.round())
        D = wp.T - res.values
        direct = ((D @ Hd) * D).sum(1)
        torch.testing.assert_close(res.objective, direct, rtol=1e-6, atol=1e-12)
        assert not_worse(best, res.objective, rtol=1e-7), dec
        if isinstance(dec, (Klein, Beam)):
            assert not_worse(res.objective, babai), dec
    assert same_value(Exact().decode(wp).objective, best)


def test_strategies_reach_the_interesting_cases():
    """The problem strategy produces wide boxes, per-coordinate boxes and ill-conditioned bases (a guard
    against a strategy that silently draws only trivial problems)."""
    from hypothesis import find, settings
    cfg = settings(max_examples=2000, database=None)
    P = find(bils_problems(), lambda P: P.n >= 4 and np.all(P.upper - P.lower >= 3), settings=cfg)
    assert P.n >= 4
    P = find(bils_problems(), lambda P: len(set((P.upper - P.lower).tolist())) > 1, settings=cfg)
    assert np.ptp(P.upper - P.lower) > 0
    P = find(bils_problems(), lambda P: P.n >= 3 and np.linalg.cond(P.basis) > 1e3, settings=cfg)
    assert np.linalg.cond(P.basis) > 1e3
    P = find(bils_problems(), lambda P: P.Y.shape[1] == 3 and math.prod((P.upper - P.lower + 1).tolist()) > 500,
             settings=cfg)
    assert P.Y.shape[1] == 3

"""Decoders: parameters checked where they enter, refusals with clear messages, seeds, row chunking."""
import math

import numpy as np
import pytest
import torch

from ojbkq_core.decoders import BUILTIN, RTN, Babai, Beam, Exact, Exhaustive, Klein, Successive
from ojbkq_core.decoders.klein import klein_rho
from ojbkq_core.errors import InputError
from ojbkq_core.grid import Grid, GridSpec
from ojbkq_core.layer import quantize_layer
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.problem import BILSProblem, WorkingProblem
from ojbkq_core.registry import get_registry
from ojbkq_core.stats import Statistics
from ojbkq_core.verify import random_problem


def lattice_problem(n=6, box=(0, 3), rhs=7, cond="well", seed=0):
    P = random_problem(np.random.default_rng(seed), n, box[0], box[1], rhs, cond)
    return P.working()[0]


def layer_problem(m=9, n=12, bits=3, group_size=-1, seed=0):
    """A layer's working problem: correlated inputs, min-max grid (static, or dynamic with groups)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    U, _, _ = _inverse_cholesky(X.T @ X / X.shape[0])
    spec = GridSpec(bits=bits, group_size=group_size)
    lower = torch.zeros(n, dtype=W.dtype)
    upper = torch.full((n,), float(spec.maxq), dtype=W.dtype)
    if group_size == -1:
        s, z = spec.fit(W)
        grid = Grid(lower, upper, s[:, None].expand(m, n).contiguous(), z[:, None].expand(m, n).contiguous())
    else:
        grid = Grid(lower, upper, group_size=group_size, fit=spec.fit)
    return WorkingProblem(U, W, grid)


def _inverse_cholesky(H):
    from ojbkq_core.linalg import inverse_cholesky
    return inverse_cholesky(H, 0.01)


# --- parameters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,params,words", [
    (Babai, {"k": 4}, ["'babai'", "unknown parameter(s) k", "allowed: none"]),
    (Klein, {"K": 4}, ["'klein'", "unknown parameter(s) K", "allowed: beta, k, "]),
    (Klein, {"k": 0}, ["'klein'", "k=0", "positive integer"]),
    (Klein, {"k": 2.5}, ["k=2.5", "positive integer"]),
    (Klein, {"k": True}, ["k=True", "positive integer"]),
    (Klein, {"beta": -1.0}, ["beta=-1.0", "positive number"]),
    (Klein, {"beta": 0}, ["beta=0", "positive number"]),
    (Klein, {"beta": "hot"}, ["beta='hot'", "positive number"]),
    (Klein, {"beta": float("nan")}, ["beta=nan", "positive number"]),
    (Klein, {"rel_beta": -2}, ["rel_beta=-2", "positive number"]),
    (Klein, {"window": 0}, ["window=0", "positive integer"]),
    (Beam, {"width": 0}, ["'beam'", "width=0"]),
    (Beam, {"expand": "2"}, ["'beam'", "expand='2'"]),
    (Exact, {"max_nodes": -5}, ["'exact'", "max_nodes=-5"]),
    (Exhaustive, {"max_points": 0}, ["'exhaustive'", "max_points=0"]),
    (Exhaustive, {"chunk": 1.0}, ["'exhaustive'", "chunk=1.0"]),
    (RTN, {"seed": 1}, ["'rtn'", "unknown parameter(s) seed"]),
])
def test_bad_parameters_are_refused_by_name(cls, params, words):
    with pytest.raises(InputError) as e:
        cls(**params)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_defaults_and_registry_lookup():
    reg = get_registry()
    for cls in BUILTIN:
        dec = reg.decoder(cls.name, backend="reference")
        assert type(dec) is cls and dec.options == cls.params
        assert isinstance(reg.decoder(cls.name), cls)       # a CPU backend, when installed, subclasses it
    assert reg.decoder("klein", {"k": 3}).options == {**Klein.params, "k": 3}
    with pytest.raises(InputError, match="unknown decoder 'babbai'.*babai"):
        reg.decoder("babbai")
    with pytest.raises(InputError, match="k=0"):
        reg.decoder("klein", {"k": 0})


# --- refusals -----------------------------------------------------------------------------------

def test_exhaustive_refuses_an_oversized_box():
    wp = lattice_problem(n=8, box=(0, 15), rhs=1)
    with pytest.raises(InputError) as e:
        Exhaustive().decode(wp)
    msg = str(e.value)
    assert f"{16**8} points" in msg and "max_points=1048576" in msg and "'exact'" in msg
    with pytest.raises(InputError, match="4096 points, over max_points=4095"):
        Exhaustive(max_points=4095).decode(lattice_problem(n=6, box=(0, 3), rhs=1))
    Exhaustive(max_points=4096).decode(lattice_problem(n=6, box=(0, 3), rhs=1))


def test_exhaustive_chunking_does_not_change_the_optimum():
    wp = lattice_problem(n=5, box=(-2, 2), rhs=4, cond="ill", seed=3)
    a, b = Exhaustive().decode(wp), Exhaustive(chunk=7).decode(wp)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.objective, b.objective)


@pytest.mark.parametrize("cls", [Exact, Exhaustive])
def test_exact_references_need_a_static_grid(cls):
    wp = layer_problem(m=2, n=4, bits=2, group_size=2)
    with pytest.raises(InputError, match=f"'{cls.name}' needs a static grid.*static_groups"):
        cls().decode(wp)
    X = torch.randn(64, 8, dtype=torch.float64)
    stats = Statistics.from_inputs(X, dtype=torch.float64)
    with pytest.raises(InputError, match="needs a static grid"):
        quantize_layer(torch.randn(3, 8), stats, preset("symmetric", *PRESETS["symmetric"]),
                       GridSpec(bits=2, group_size=4), cls())


def test_exact_stops_at_max_nodes_with_a_clear_error():
    wp = lattice_problem(n=8, box=(0, 7), rhs=1, cond="ill", seed=1)
    with pytest.raises(InputError, match="max_nodes=3.*raise max_nodes or use beam"):
        Exact(max_nodes=3).decode(wp)


# --- randomness and seeds -----------------------------------------------------------------------

def test_klein_same_seed_same_result_other_seed_other_candidates():
    wp = layer_problem(seed=2)
    dec = Klein(k=8)
    a, b, c = dec.decode(wp, seed=5), dec.decode(wp, seed=5), dec.decode(wp, seed=6)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.info["candidate_scores"], b.info["candidate_scores"])
    # candidate 0 is Babai whatever the seed; the sampled candidates move with the seed
    assert torch.equal(a.info["candidate_scores"][0], c.info["candidate_scores"][0])
    assert not torch.equal(a.info["candidate_scores"][1:], c.info["candidate_scores"][1:])
    assert Klein(k=8).decode(wp, seed=5).objective.equal(a.objective)       # a fresh instance too


def test_klein_limits_of_beta_and_k():
    wp = layer_problem(seed=3)
    babai = Babai().decode(wp)
    cold = Klein(k=6, beta=1e12).decode(wp, seed=0)         # every path rounds to nearest
    assert torch.equal(cold.info["candidate_scores"], babai.objective.expand(6, -1))
    one = Klein(k=1).decode(wp, seed=9)
    assert torch.equal(one.codes, babai.codes)
    hot = Klein(k=6, beta=1e-6).decode(wp, seed=0)          # near-uniform draws in the window
    assert torch.all(hot.info["candidate_scores"][1:] > babai.objective)
    assert torch.all(hot.codes >= 0) and torch.all(hot.codes <= 7)


@pytest.mark.parametrize("kw", [{}, {"rel_beta": 1.0}, {"rel_beta": 40.0}, {"beta": 3.0}, {"window": 2}])
@pytest.mark.parametrize("shape", [dict(bits=3), dict(bits=2, group_size=4), dict(bits=4, m=40, n=16, group_size=8)])
def test_klein_noise_only_where_a_draw_can_land_changes_nothing(monkeypatch, kw, shape):
    """On the CPU Klein draws noise only for the codes within `reach` of the nearest one; with the whole
    window drawn (the GPU's way) every candidate, score and winner is the same."""
    from ojbkq_core.decoders import sampling as sampling_mod
    reached = []
    real_reach = sampling_mod.reach
    monkeypatch.setattr(sampling_mod, "reach", lambda *a: reached.append(real_reach(*a)) or reached[-1])
    for seed in range(3):
        wp = layer_problem(seed=10 + seed, **shape)
        wp.T = wp.T * 1.3                                    # some targets beyond the box: clamped codes
        pruned = Klein(k=8, **kw).decode(wp, seed=seed)
        monkeypatch.setattr(sampling_mod, "reach", lambda kappa, w, spread, ratio=1.0: w)
        full = Klein(k=8, **kw).decode(wp, seed=seed)
        monkeypatch.setattr(sampling_mod, "reach", lambda *a: reached.append(real_reach(*a)) or reached[-1])
        assert torch.equal(pruned.codes, full.codes)
        assert torch.equal(pruned.info["candidate_scores"], full.info["candidate_scores"])
    if "beta" not in kw and kw.get("rel_beta", 4.0) >= 4.0:
        assert min(reached) < {**Klein.params, **kw}["window"]      # the bound did leave codes out


def test_klein_reach_bound():
    from ojbkq_core.decoders.sampling import gumbel_spread, reach
    spread = gumbel_spread()
    assert 19 < spread < 20                                 # −log(−log u) over u in [2⁻²⁵, 1 − 2⁻²⁴]
    assert reach(4.0, 4, spread) == 2                      # κ (o² − |o|) = 24 > spread at o = 3, 8 at o = 2
    assert reach(3.0, 4, spread) == 3 and reach(1.0, 4, spread) == 4 and reach(100.0, 4, spread) == 1 and reach(100.0, 1, spread) == 1
    assert reach(float("nan"), 4, spread) == 4 and reach(0.0, 3, spread) == 3


def test_klein_rho_solves_kleins_equation():
    for k, n in ((2, 1), (16, 8), (64, 8), (1000, 30)):
        rho = klein_rho(k, n)
        assert rho > 1 and math.isclose((math.e * rho) ** (2 * n / rho), k, rel_tol=1e-9)
    assert klein_rho(1, 5) == math.inf


def test_klein_default_beta_is_relative_to_the_smallest_grid_step():
    """`β_i = rel_beta / min_j r_ij²` with `r_ij = s_ij / U_jj`, the same for every `k`; `beta=` fixes
    it for all rows."""
    wp = layer_problem(seed=4)
    for rel in (4.0, 0.5):
        beta = Klein(rel_beta=rel).beta(wp)
        for i in range(wp.m):
            r2 = sorted(((wp.grid.scale[i, j] / wp.U[j, j]) ** 2).item() for j in range(wp.n))
            assert math.isclose(beta[i].item(), rel / r2[0], rel_tol=1e-12)
    assert torch.equal(Klein(k=2).beta(wp), Klein(k=64).beta(wp))
    assert torch.equal(Klein(beta=2.5).beta(wp), torch.full((wp.m,), 2.5, dtype=wp.T.dtype))
    # invariant to the scale of H: H → c² H scales U by 1/c and every r² by c²
    scaled = WorkingProblem(wp.U / 3, wp.T, wp.grid)
    torch.testing.assert_close(Klein().beta(scaled), Klein().beta(wp) / 9, rtol=1e-12, atol=0)


def test_the_first_row_index_feeds_the_draws():
    wp = layer_problem(m=2, seed=5)
    row = wp.rows(slice(1, 2))
    dec = Klein(k=8, beta=0.5)
    as_row1 = dec.decode(row, seed=0, row0=1)
    assert torch.equal(as_row1.codes[0], dec.decode(wp, seed=0).codes[1])
    assert not torch.equal(as_row1.info["candidate_scores"], dec.decode(row, seed=0, row0=0).info["candidate_scores"])


@pytest.mark.parametrize("dec", [RTN(), Babai(), Klein(k=8), Klein(k=5, beta=0.3, window=2), Successive(),
                                 Beam(), Beam(width=3, expand=1), Exact()], ids=repr)
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_row_chunking_does_not_change_results(dec, chunk):
    for wp in (layer_problem(m=9, bits=2, seed=6), lattice_problem(n=5, rhs=9, cond="ill", seed=6)):
        whole = dec.decode(wp, seed=11)
        parts = [dec.decode(wp.rows(slice(i, i + chunk)), seed=11, row0=i) for i in range(0, wp.m, chunk)]
        assert torch.equal(torch.cat([p.codes for p in parts]), whole.codes)
        torch.testing.assert_close(torch.cat([p.objective for p in parts]), whole.objective, rtol=1e-12, atol=0)


def test_quantize_layer_max_rows_does_not_change_klein():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g) @ torch.randn(16, 16, generator=g)
    W = torch.randn(10, 16, generator=g)
    stats = Statistics.from_inputs(X)
    spec = preset("symmetric", *PRESETS["symmetric"])
    grid = GridSpec(bits=3, group_size=4)
    whole = quantize_layer(W, stats, spec, grid, Klein(k=8), seed=3)
    chunked = quantize_layer(W, stats, spec, grid, Klein(k=8), seed=3, max_rows=3)
    assert torch.equal(whole.codes, chunked.codes)


# --- decoders that reduce to babai --------------------------------------------------------------

@pytest.mark.parametrize("group_size", [-1, 4])
def test_width_one_beam_successive_without_injection_and_rtn_grid(group_size):
    wp = layer_problem(bits=3, group_size=group_size, seed=7)
    babai = Babai().decode(wp)
    for dec in (Beam(width=1, expand=1), Beam(width=1, expand=3), Successive()):
        assert torch.equal(dec.decode(wp).codes, babai.codes), dec
    rtn = RTN().decode(wp)
    scale, zero = wp.grid.initial(wp.T)
    assert torch.equal(rtn.codes, torch.clamp(torch.round(wp.T / scale) + zero, 0, 7))


def test_rtn_objective_is_the_quadratic_form():
    wp = layer_problem(bits=2, seed=8)
    res = RTN().decode(wp)
    H = torch.linalg.inv(wp.U.T @ wp.U)
    D = wp.T - res.values
    torch.testing.assert_close(res.objective, ((D @ H) * D).sum(1), rtol=1e-8, atol=1e-10)


def test_decoders_work_in_float32():
    wp64 = layer_problem(bits=3, seed=9)
    wp = WorkingProblem(wp64.U.float(), wp64.T.float(),
                        Grid(wp64.grid.lower.float(), wp64.grid.upper.float(), wp64.grid.scale.float(),
                             wp64.grid.zero.float()))
    for dec in (RTN(), Babai(), Klein(), Successive(), Beam(), Exact()):
        res = dec.decode(wp, seed=1)
        assert res.codes.dtype == torch.float32 and res.objective.dtype == torch.float32, dec
        assert torch.all((res.codes >= 0) & (res.codes <= 7)), dec


def test_uniforms_stay_below_one_so_gumbel_draws_stay_finite():
    from ojbkq_core.rng import to_unit, uniform
    x = torch.tensor([0, 0xFFFF_FFFF, 0xFFFF_FE00], dtype=torch.int64)
    for dt in (torch.float32, torch.float64):
        u = to_unit(x, dt)
        assert bool((u > 0).all() and (u < 1).all())
        assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    assert to_unit(x, torch.float64)[1].item() == 1 - 2 ** -25       # float64 keeps the exact value
    u = uniform(3, torch.arange(4).view(-1, 1, 1), torch.arange(64).view(1, -1, 1), 7, torch.arange(9).view(1, 1, -1))
    assert u.shape == (4, 64, 9) and bool(((u > 0) & (u < 1)).all())

"""The layer quantizer against independent, straightforward implementations (docs/formulation.md §1–§4, §6)."""
import numpy as np
import pytest
import torch

from ojbkq_core.decoders import RTN, Babai, Beam, Klein, Successive
from ojbkq_core.errors import InputError
from ojbkq_core.grid import GridSpec
from ojbkq_core.layer import quantize_layer
from ojbkq_core.objectives import PRESETS, Objective, Term, preset
from ojbkq_core.stats import Statistics


def correlated_inputs(N, n, seed, mismatch=0.1, dead=()):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    X = torch.randn(N, n, generator=g, dtype=torch.float64) @ A
    Xfp = X + mismatch * torch.randn(N, n, generator=g, dtype=torch.float64) @ A
    for j in dead:
        X[:, j] = 0
        Xfp[:, j] = 0
    return X.float(), Xfp.float()


def gptq_reference(W, H, bits, group_size, sym, act_order, static_groups, damp=0.01):
    """The published GPTQ procedure, column by column without lazy batching, in float32."""
    W = W.clone().float()
    H = H.clone().float()
    maxq = 2**bits - 1
    n = W.shape[1]

    def params(w):
        xmin = torch.clamp(w.min(1).values, max=0)
        xmax = torch.clamp(w.max(1).values, min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin[xmin < 0] = -xmax[xmin < 0]
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1, 1
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
        return scale, zero

    if group_size == -1:
        s_all, z_all = params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups and group_size != -1:
        groups = [params(W[:, i:i + group_size]) for i in range(0, n, group_size)]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H[range(n), range(n)] += damp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    for j in range(n):
        if group_size == -1:
            s, z = s_all, z_all
        elif static_groups:
            s, z = groups[int(perm[j]) // group_size]
        elif j % group_size == 0:
            s, z = params(W[:, j:j + group_size])
        c = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        codes[:, j] = c
        err = (W[:, j] - s * (c - z)) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
    return codes[:, torch.argsort(perm)].long()


def sym_objective():
    return preset("symmetric", *PRESETS["symmetric"])


@pytest.mark.parametrize("group_size,act_order,static_groups", [
    (-1, False, False), (-1, True, False), (16, False, False), (16, True, False), (16, True, True), (32, False, True),
])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_babai_symmetric_is_gptq(group_size, act_order, static_groups, sym, bits):
    X, _ = correlated_inputs(512, 64, seed=bits, dead=(5,))
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(7))
    spec = GridSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, static_groups=static_groups)
    stats = Statistics.from_inputs(X)
    res = quantize_layer(W, stats, sym_objective(), spec, Babai())
    ref = gptq_reference(W, stats.H, bits, group_size, sym, act_order, static_groups)
    assert torch.equal(res.codes, ref)
    assert res.codes.min() >= 0 and res.codes.max() <= 2**bits - 1
    # dequantized weights reproduce scales/zeros through g_idx
    Q = res.scales[:, res.g_idx] * (res.codes - res.zeros[:, res.g_idx])
    assert torch.allclose(Q, res.qweight, atol=1e-6)


def test_group_size_not_dividing_block():
    """A group size that is neither a divisor nor a multiple of the 128-column block (96) still
    fits each group on fully updated targets, as the straightforward procedure does."""
    X, _ = correlated_inputs(1024, 288, seed=3)
    W = torch.randn(8, 288, generator=torch.Generator().manual_seed(1))
    spec = GridSpec(bits=3, group_size=96)
    stats = Statistics.from_inputs(X)
    res = quantize_layer(W, stats, sym_objective(), spec, Babai())
    assert torch.equal(res.codes, gptq_reference(W, stats.H, 3, 96, False, False, False))


def direct_loss(W, Q, X, Xfp, terms):
    W, Q, X, Xfp = (t.double() for t in (W, Q, X, Xfp))
    total = 0.0
    for t in terms:
        A = (1 - t.a) * X + t.a * Xfp
        B = (1 - t.b) * X + t.b * Xfp
        total += t.w * float(((A @ W.T - B @ Q.T) ** 2).sum()) / X.shape[0]
    return total


@pytest.mark.parametrize("name,params", [("symmetric", {}), ("asymmetric", {}), ("regularized", {"alpha": 0.3}),
                                         ("jta", {"mu": 0.6, "lam": 0.6})])
@pytest.mark.parametrize("decoder", [RTN(), Babai(), Successive(), Klein(k=4), Beam(width=2)])
def test_reported_loss_is_the_objective_from_inputs(name, params, decoder):
    X, Xfp = correlated_inputs(400, 32, seed=11)
    W = torch.randn(10, 32, generator=torch.Generator().manual_seed(2))
    spec = preset(name, *PRESETS[name], **params)
    obj, _ = spec.build()
    stats = Statistics.from_inputs(X, Xfp, needs=obj.needs)
    res = quantize_layer(W, stats, spec, GridSpec(bits=3, group_size=16), decoder, seed=1)
    assert res.loss == pytest.approx(direct_loss(W, res.qweight, X, Xfp, obj.terms), rel=1e-4)


@pytest.mark.parametrize("static", [False, True])
def test_regularized_endpoints(static):
    X, Xfp = correlated_inputs(300, 32, seed=5, mismatch=0.3)
    W = torch.randn(12, 32, generator=torch.Generator().manual_seed(3))
    stats = Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"))
    spec = GridSpec(bits=3, group_size=16, static_groups=static)
    q = lambda name, **p: quantize_layer(W, stats, preset(name, *PRESETS[name], **p), spec, Babai()).codes  # noqa: E731
    assert torch.equal(q("regularized", alpha=0.0), q("symmetric"))
    assert torch.equal(q("regularized", alpha=1.0), q("asymmetric"))
    assert not torch.equal(q("symmetric"), q("asymmetric"))


def test_successive_matches_babai_on_target_with_static_grid():
    X, Xfp = correlated_inputs(500, 48, seed=9, mismatch=0.3)
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(4))
    spec_obj = preset("regularized", *PRESETS["regularized"], alpha=0.5)
    stats = Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"))
    grid = GridSpec(bits=4, group_size=16, static_groups=True)
    a = quantize_layer(W, stats, spec_obj, grid, Babai(), dtype=torch.float64)
    b = quantize_layer(W, stats, spec_obj, grid, Successive(), dtype=torch.float64)
    assert (a.codes != b.codes).float().mean() < 1e-3
    assert b.loss == pytest.approx(a.loss, rel=1e-6)
    # at alpha = 0 successive is babai exactly
    sym = preset("regularized", *PRESETS["regularized"], alpha=0.0)
    assert torch.equal(quantize_layer(W, stats, sym, grid, Successive()).codes,
                       quantize_layer(W, stats, sym, grid, Babai()).codes)


def test_sampled_alpha_is_seeded_and_recorded():
    X, Xfp = correlated_inputs(200, 16, seed=1)
    W = torch.randn(4, 16)
    stats = Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"))
    spec = preset("regularized", *PRESETS["regularized"], alpha="uniform:0.4:0.8")
    r1 = quantize_layer(W, stats, spec, GridSpec(bits=4), Babai(), rng=np.random.default_rng(3))
    r2 = quantize_layer(W, stats, spec, GridSpec(bits=4), Babai(), rng=np.random.default_rng(3))
    a = r1.report["draws"]["alpha"]
    assert 0.4 <= a <= 0.8 and a == r2.report["draws"]["alpha"]
    assert torch.equal(r1.codes, r2.codes)


def test_scoring_objective_is_used_for_selection():
    X, Xfp = correlated_inputs(300, 24, seed=2, mismatch=0.3)
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(5))
    stats = Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"))
    jta, _ = preset("jta", *PRESETS["jta"]).build()
    reg = preset("regularized", *PRESETS["regularized"], alpha=0.5)
    grid = GridSpec(bits=3, group_size=8)
    base = quantize_layer(W, stats, reg, grid, Babai())
    scored = quantize_layer(W, stats, reg, grid, Klein(k=16), score_objective=jta, seed=0)
    # per row, the chosen candidate is never worse than babai (candidate 0) under the scoring objective
    jb = jta.value(W.double(), base.qweight.double(), stats_double(stats))
    js = jta.value(W.double(), scored.qweight.double(), stats_double(stats))
    assert torch.all(js <= jb + 1e-6 * jb.abs().max())


def stats_double(stats):
    class S:
        H, C, G = stats.H.double(), stats.C.double(), stats.G.double()
    return S


def test_klein_and_beam_rows_never_worse_than_babai():
    X, _ = correlated_inputs(600, 64, seed=4)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    stats = Statistics.from_inputs(X)
    grid = GridSpec(bits=3, group_size=32)
    babai = quantize_layer(W, stats, sym_objective(), grid, Babai())
    for dec in (Klein(k=16), Klein(k=64), Beam(width=4), Beam(width=8, expand=3)):
        r = quantize_layer(W, stats, sym_objective(), grid, dec, seed=2)
        assert torch.all(r.row_loss <= babai.row_loss * (1 + 1e-5) + 1e-9), dec
    k16 = quantize_layer(W, stats, sym_objective(), grid, Klein(k=16), seed=2)
    k64 = quantize_layer(W, stats, sym_objective(), grid, Klein(k=64), seed=2)
    assert torch.all(k64.row_loss <= k16.row_loss * (1 + 1e-5) + 1e-9)


def test_row_chunks_give_identical_results():
    X, _ = correlated_inputs(300, 32, seed=8)
    W = torch.randn(20, 32, generator=torch.Generator().manual_seed(8))
    stats = Statistics.from_inputs(X)
    for dec in (Klein(k=8), Beam(width=3)):
        a = quantize_layer(W, stats, sym_objective(), GridSpec(bits=3, group_size=8), dec, seed=5)
        b = quantize_layer(W, stats, sym_objective(), GridSpec(bits=3, group_size=8), dec, seed=5, max_rows=7)
        assert torch.equal(a.codes, b.codes)


def test_bad_inputs():
    X, _ = correlated_inputs(100, 16, seed=0)
    stats = Statistics.from_inputs(X)
    with pytest.raises(InputError, match="input columns"):
        quantize_layer(torch.randn(4, 8), stats, sym_objective(), GridSpec(), Babai())
    with pytest.raises(InputError, match="needs statistics"):
        quantize_layer(torch.randn(4, 16), stats, preset("asymmetric", *PRESETS["asymmetric"]), GridSpec(), Babai())
    with pytest.raises(InputError, match="bits"):
        GridSpec(bits=9)
    with pytest.raises(InputError, match="must lie in"):
        Objective((Term(1, 1.5, 0),))


def test_cholesky_failure_raises_damping_then_reports():
    from ojbkq_core.errors import FactorizationError
    from ojbkq_core.linalg import inverse_cholesky
    H = torch.tensor([[1.0, 1.5], [1.5, 1.0]], dtype=torch.float64)  # indefinite
    U, Hd, delta = inverse_cholesky(H, damp=0.01)
    assert delta > 0.01 and torch.allclose(U.T @ U @ Hd, torch.eye(2, dtype=torch.float64), atol=1e-8)
    with pytest.raises(FactorizationError, match="damp"):
        inverse_cholesky(torch.tensor([[1.0, 0.0], [0.0, -5.0]]), damp=0.0, retries=1)


def test_path_score_is_the_objective_up_to_a_row_constant():
    """`Σ e² − λ‖q − w‖² − Σ_dead q²` minus the exact objective is the same for every candidate of a row
    (dead columns, damping, an asymmetric objective), so it ranks candidates as the objective does."""
    from ojbkq_core.layer import factorize
    from ojbkq_core.objectives import PathScore
    X, Xfp = correlated_inputs(400, 24, seed=11, mismatch=0.3, dead=(5,))
    W = torch.randn(6, 24, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    stats = Statistics.from_inputs(X.double(), Xfp.double(), needs=("H", "C", "G"), dtype=torch.float64)
    jta, _ = preset("jta", *PRESETS["jta"]).build()
    f = factorize(stats, jta, 0.05, True, torch.float64, "cpu")
    W[:, f.dead] = 0
    Wp = W[:, f.perm]
    U = f.U
    T = Wp + ((W @ f.MH)[:, f.perm] @ U.T) @ U
    Hd = torch.linalg.inv(U.T @ U)                      # the damped H the walk decodes, decoding order
    score = PathScore(Wp, f.lam, f.dead[f.perm].nonzero().flatten())
    inv = torch.argsort(f.perm)
    g = torch.Generator().manual_seed(13)
    offsets = []
    for _ in range(5):
        Qp = Wp + 0.3 * torch.randn(Wp.shape, generator=g, dtype=torch.float64)
        path = (((T - Qp) @ Hd) * (T - Qp)).sum(1)
        exact = jta.value(W, Qp[:, inv], stats)
        offsets.append(score(Qp, path) - exact)
    offsets = torch.stack(offsets)
    torch.testing.assert_close(offsets, offsets[:1].expand_as(offsets), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dec", [Klein(k=12), Beam(width=4)])
def test_path_score_chooses_the_candidates_the_exact_objective_chooses(dec):
    X, Xfp = correlated_inputs(500, 48, seed=14, mismatch=0.3, dead=(7,))
    W = torch.randn(24, 48, generator=torch.Generator().manual_seed(15))
    stats = Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"))
    jta = preset("jta", *PRESETS["jta"]).build()[0]
    grid = GridSpec(bits=3, group_size=16)
    by_path = quantize_layer(W, stats, jta, grid, dec, seed=3, dtype=torch.float64)
    by_value = quantize_layer(W, stats, jta, grid, dec, seed=3, dtype=torch.float64, score_objective=jta)
    assert torch.equal(by_path.codes, by_value.codes)
    assert by_path.report["candidate_histogram"] == by_value.report["candidate_histogram"]


def test_modules_reading_the_same_inputs_share_one_factorization():
    X, Xfp = correlated_inputs(300, 32, seed=16, mismatch=0.2, dead=(3,))
    stats = Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"))
    g = torch.Generator().manual_seed(17)
    grid = GridSpec(bits=4, group_size=8, act_order=True)
    for name in ("symmetric", "jta"):
        spec = preset(name, *PRESETS[name])
        shared = {}
        for m in (8, 16, 4):                               # q, k, v
            W = torch.randn(m, 32, generator=g)
            a = quantize_layer(W, stats, spec, grid, Klein(k=4), seed=m, shared=shared)
            b = quantize_layer(W, stats, spec, grid, Klein(k=4), seed=m)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.row_loss, b.row_loss)
        assert len(shared) == 1

"""Objectives as term lists, their statistics and their closed forms (docs/formulation.md §2)."""
import numpy as np
import pytest
import torch

from ojbkq_core.errors import InputError
from ojbkq_core.objectives import PRESETS, Distribution, from_terms, preset
from ojbkq_core.stats import Statistics, symmetric_gram


def data(seed=0, N=500, n=12):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    Xfp = X + 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64)
    return X, Xfp


def test_streaming_statistics_equal_whole_matrices():
    X, Xfp = data()
    st = Statistics(12, needs=("H", "C", "G"), dtype=torch.float64)
    for i in range(0, 500, 37):
        st.add(X[i:i + 37], Xfp[i:i + 37])
    N = X.shape[0]
    assert torch.allclose(st.H, X.T @ X / N)
    assert torch.allclose(st.C, Xfp.T @ X / N)
    assert torch.allclose(st.G, Xfp.T @ Xfp / N)
    assert st.count == N


def test_a_wide_layers_sums_are_added_a_block_of_columns_at_a_time(monkeypatch):
    """Past `ADD_WHOLE_UP_TO` inputs each batch's products are added on a GPU by blocks of columns (no second
    `(n, n)` matrix beside the sums): the same sums to rounding, the blocks' seams included; on the CPU whole."""
    import ojbkq_core.stats as stats_module
    X, Xfp = data(n=12)
    whole = Statistics(12, needs=("H", "C", "G"), dtype=torch.float64)
    for i in range(0, 500, 37):
        whole.add(X[i:i + 37], Xfp[i:i + 37])
    monkeypatch.setattr(stats_module, "ADD_BY_COLUMNS_ON", ("cuda", "cpu"))   # a GPU's rule, here on the CPU
    monkeypatch.setattr(stats_module, "ADD_WHOLE_UP_TO", 8)
    monkeypatch.setattr(stats_module, "ADD_COLUMNS", 5)                     # 5 + 5 + 2 columns
    added = []
    real = stats_module.gram
    monkeypatch.setattr(stats_module, "gram", lambda A, B, dtype: added.append(tuple(B.shape)) or real(A, B, dtype))
    blocks = Statistics(12, needs=("H", "C", "G"), dtype=torch.float64)
    for i in range(0, 500, 37):
        blocks.add(X[i:i + 37], Xfp[i:i + 37])
    assert added[:3] == [(37, 12)] * 3 and added[3:6] == [(37, 5), (37, 5), (37, 2)]
    for key in ("H", "C", "G"):
        torch.testing.assert_close(blocks.sums[key], whole.sums[key], rtol=1e-12, atol=1e-12)
    assert stats_module.product_bytes(12) == 12 * 5 * 4 and stats_module.product_bytes(8) == 8 * 8 * 4
    monkeypatch.setattr(stats_module, "ADD_BY_COLUMNS_ON", ("cuda",))
    added.clear()
    cpu = Statistics(12, needs=("H",), dtype=torch.float64)
    cpu.add(X[:40])
    cpu.add(X[40:80])
    assert added == [(40, 12)] * 2                                          # the CPU adds whole products


@pytest.mark.parametrize("n,band", [(12, 5), (300, 128), (600, 0), (129, 128)])
def test_symmetric_gram_is_the_full_product(n, band):
    """Bands of the upper triangle, mirrored below the diagonal blocks: `Aᵀ A` to rounding."""
    A = torch.randn(257, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    S = symmetric_gram(A, band)
    b = band or max(128, n // 4)
    if n > b:
        assert torch.equal(S[b:, :b], S[:b, b:].T)
    torch.testing.assert_close(S, A.T @ A, rtol=1e-12, atol=1e-12)


def test_only_needed_statistics_are_computed():
    X, _ = data()
    st = Statistics.from_inputs(X.float(), needs=("H",))
    assert st.C is None and st.G is None and st.H is not None
    with pytest.raises(InputError, match="full-precision"):
        Statistics(12, needs=("H", "C")).add(X)
    with pytest.raises(InputError, match="features"):
        Statistics(5).add(X)


def test_bf16_inputs_accumulate_in_float32():
    X, _ = data()
    st = Statistics.from_inputs(X.bfloat16(), needs=("H",))
    assert st.H.dtype == torch.float32
    Xb = X.bfloat16().double()
    assert torch.allclose(st.H.double(), Xb.T @ Xb / len(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,params,needs", [
    ("symmetric", {}, {"H"}), ("asymmetric", {}, {"H", "C", "G"}), ("regularized", {"alpha": 0.0}, {"H"}),
    ("regularized", {"alpha": 0.4}, {"H", "C", "G"}), ("jta", {}, {"H", "C", "G"}),
])
def test_needs(name, params, needs):
    obj, _ = preset(name, *PRESETS[name], **params).build()
    assert obj.needs == needs


@pytest.mark.parametrize("name,params", [("symmetric", {}), ("asymmetric", {}), ("regularized", {"alpha": 0.3}),
                                         ("jta", {"mu": 0.7, "lam": 0.2})])
def test_value_equals_direct_sum_of_terms(name, params):
    X, Xfp = data(1)
    st = Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"), dtype=torch.float64)
    obj, _ = preset(name, *PRESETS[name], **params).build()
    W, Q = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    direct = sum(t.w * ((((1 - t.a) * X + t.a * Xfp) @ W.T - ((1 - t.b) * X + t.b * Xfp) @ Q.T) ** 2).sum(0)
                 for t in obj.terms) / len(X)
    assert torch.allclose(obj.value(W, Q, st), direct)
    # the target minimises the continuous objective: gradient zero at T = W M H⁻¹
    H, M = obj.quadratic(st)
    T = W @ M @ torch.linalg.inv(H)
    grad = -2 * W @ M + 2 * T @ H
    assert grad.abs().max() < 1e-8


def test_jta_preset_is_its_terms():
    obj, _ = preset("jta", *PRESETS["jta"], mu=0.6, lam=0.6).build()
    same = from_terms([{"w": 0.6, "a": 0.6, "b": 0}, {"w": 0.4, "a": 1, "b": 1}]).build()[0]
    assert obj.terms == same.terms


def test_distributions():
    rng = np.random.default_rng(0)
    d = Distribution.parse("uniform:0.4:0.8")
    xs = [d.sample(rng) for _ in range(200)]
    assert 0.4 <= min(xs) and max(xs) <= 0.8
    b = Distribution.parse("beta:2:2")
    assert 0 < b.sample(rng) < 1
    for bad in ("uniform:0.8:0.4", "uniform:0.2", "gauss:0:1", "beta:0:1", "uniform:a:b"):
        with pytest.raises(InputError, match="alpha"):
            Distribution.parse(bad)


@pytest.mark.parametrize("bad,needle", [
    (dict(name="regularized", alpha=1.5), "alpha"), (dict(name="jta", mu=-1), "mu"),
    (dict(name="jta", nu=1), "unknown parameter"),
])
def test_bad_objective_parameters(bad, needle):
    name = bad.pop("name")
    with pytest.raises(InputError, match=needle):
        preset(name, *PRESETS[name], **bad)


def test_bad_terms():
    with pytest.raises(InputError, match="terms"):
        from_terms([])
    with pytest.raises(InputError, match="w, a, b"):
        from_terms([{"w": 1, "a": 0}])
    with pytest.raises(InputError, match="≥ 0"):
        from_terms([{"w": -1, "a": 0, "b": 0}])

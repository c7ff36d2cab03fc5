"""`BILSProblem`: validation where the arrays enter, `.npz` loading, and the working (layer) form."""
import numpy as np
import pytest
import torch

from ojbkq_core.decoders import Babai
from ojbkq_core.errors import InputError
from ojbkq_core.problem import BILSProblem
from ojbkq_core.solve import solve


def good(n=3, m=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"A": rng.normal(size=(m, n)), "y": rng.normal(size=m), "lower": 0, "upper": 3}


def upper_R(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return np.triu(rng.normal(size=(n, n))) + 3 * np.eye(n)


# --- create -----------------------------------------------------------------------------------------

def test_a_valid_problem_is_accepted_and_normalised():
    P = BILSProblem.create(**good())
    assert P.n == 3 and P.A.dtype == np.float64
    assert P.lower.dtype == np.int64 and P.lower.tolist() == [0, 0, 0] and P.upper.tolist() == [3, 3, 3]
    assert P.Y.shape == (5, 1)
    P = BILSProblem.create(np.zeros((3, 2)), [0, -1, 2], np.array([1.0, 1.0, 4.0]), R=upper_R())
    assert P.lower.tolist() == [0, -1, 2] and P.upper.tolist() == [1, 1, 4] and P.Y.shape == (3, 2)


@pytest.mark.parametrize("change,words", [
    ({"A": None}, ["exactly one", "'A'", "'R'"]),
    ({"R": upper_R()}, ["exactly one"]),
    ({"A": np.ones(5)}, ["'A'", "2-D"]),
    ({"A": np.ones((2, 3))}, ["'A'", "full column rank"]),
    ({"A": np.outer(np.arange(5.0), [1.0, 2.0, 3.0])}, ["'A'", "full column rank", "rank 1"]),
    ({"A": np.array([["a", "b", "c"]] * 5)}, ["'A'", "numeric"]),
    ({"A": np.where(np.eye(5, 3) == 1, np.nan, 1.0)}, ["'A'", "NaN or inf"]),
    ({"y": np.array([1.0, np.inf, 0, 0, 0])}, ["'y'", "NaN or inf"]),
    ({"y": np.ones(4)}, ["'y'", "(4,)", "(5,)"]),
    ({"y": np.ones((5, 2, 1))}, ["'y'", "(5, 2, 1)"]),
    ({"lower": [0, 0]}, ["'lower'", "(2,)", "(3,)"]),
    ({"upper": np.zeros((3, 1), dtype=int)}, ["'upper'", "(3, 1)"]),
    ({"lower": 0.5}, ["'lower'", "integers"]),
    ({"upper": [1.0, 2.0, np.nan]}, ["'upper'", "integers"]),
    ({"upper": "3"}, ["'upper'", "integer"]),
    ({"lower": [0, 4, 0]}, ["empty", "coordinate 1", "lower=4", "upper=3"]),
])
def test_create_names_the_bad_array(change, words):
    kw = {**good(), **change}
    if kw.get("A") is None:
        kw.pop("A")
    with pytest.raises(InputError) as e:
        BILSProblem.create(**kw, source="p.npz")
    msg = str(e.value)
    assert msg.startswith("p.npz: ") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("R,words", [
    (np.ones((3, 4)), ["square", "(3, 4)"]),
    (np.ones(3), ["square"]),
    (np.ones((3, 3)), ["upper triangular"]),
    (np.diag([1.0, 0.0, 2.0]), ["singular", "index 1"]),
    (np.diag([1.0, -np.inf, 2.0]), ["'R'", "NaN or inf"]),
])
def test_create_rejects_bad_R(R, words):
    with pytest.raises(InputError) as e:
        BILSProblem.create(np.zeros(3), 0, 1, R=R, source="r.npz")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# --- load -------------------------------------------------------------------------------------------

def test_load_round_trip(tmp_path):
    p = tmp_path / "ok.npz"
    g = good()
    np.savez(p, **g)
    P = BILSProblem.load(str(p))
    np.testing.assert_array_equal(P.A, g["A"])
    assert P.R is None and P.source == str(p)
    np.savez(p, R=upper_R(), y=np.zeros((3, 4)), lower=np.array([0, 0, 0]), upper=np.int64(2))
    P = BILSProblem.load(str(p))
    assert P.A is None and P.Y.shape == (3, 4) and P.upper.tolist() == [2, 2, 2]


@pytest.mark.parametrize("arrays,words", [
    ({"A": np.eye(3), "lower": 0, "upper": 1}, ["missing array(s) y"]),
    ({"A": np.eye(3), "y": np.zeros(3)}, ["missing array(s) lower, upper"]),
    ({"A": np.eye(3), "y": np.zeros(3), "lower": 0, "upper": 1, "b": 1}, ["unknown array(s) b", "A or R"]),
    ({"y": np.zeros(3), "lower": 0, "upper": 1}, ["exactly one"]),
    ({"A": np.eye(3), "R": np.eye(3), "y": np.zeros(3), "lower": 0, "upper": 1}, ["exactly one"]),
    ({"R": np.tril(np.ones((3, 3))), "y": np.zeros(3), "lower": 0, "upper": 1}, ["upper triangular"]),
])
def test_load_names_the_file_and_the_problem(tmp_path, arrays, words):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(InputError) as e:
        BILSProblem.load(str(p))
    assert str(e.value).startswith(str(p))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_load_missing_or_unreadable_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        BILSProblem.load(str(tmp_path / "absent.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_text("not an archive")
    with pytest.raises(InputError, match="cannot read as .npz"):
        BILSProblem.load(str(junk))


# --- working form -----------------------------------------------------------------------------------

def textbook_babai(R, y, lower, upper):
    """Box-constrained Babai point of `min ‖y − R z‖²`, `R` upper triangular: back substitution from the
    last coordinate, rounding each centre and clamping it to the box."""
    n = R.shape[0]
    z = np.zeros(n, dtype=np.int64)
    for k in range(n - 1, -1, -1):
        centre = (y[k] - R[k, k + 1:] @ z[k + 1:]) / R[k, k]
        z[k] = np.clip(np.round(centre), lower[k], upper[k])
    return z


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("form", ["A", "R"])
def test_babai_on_the_working_form_is_textbook_babai(seed, form):
    rng = np.random.default_rng(seed)
    n, p = int(rng.integers(1, 9)), 3
    B = rng.normal(size=(n + 2, n)) * np.logspace(0, -seed % 4, n)
    lower = rng.integers(-3, 1, size=n)
    upper = lower + rng.integers(0, 6, size=n)
    Y = B @ rng.integers(-4, 5, size=(n, p)) + rng.normal(size=(n + 2, p))
    if form == "R":
        Q, R = np.linalg.qr(B)
        Y, B = Q.T @ Y, R
        P = BILSProblem.create(Y, lower, upper, R=R)
        Rt, Yt = R, Y
    else:
        P = BILSProblem.create(Y, lower, upper, A=B)
        Q, Rt = np.linalg.qr(B)
        Yt = Q.T @ Y
    expect = np.stack([textbook_babai(Rt, Yt[:, i], lower, upper) for i in range(p)], 1)
    np.testing.assert_array_equal(solve(P, Babai()).z, expect)


@pytest.mark.parametrize("seed", range(4))
def test_working_form_factors_and_constant(seed):
    """`H⁻¹ = Uᵀ U` with `H = AᵀA` in decoding order, `T = A⁺ y`, and `‖y − A z‖² = (t − z)ᵀ H (t − z) + const`."""
    rng = np.random.default_rng(seed)
    n, m, p = 5, 8, 2
    A = rng.normal(size=(m, n))
    Y = rng.normal(size=(m, p)) * 3
    P = BILSProblem.create(Y, -2, 2, A=A)
    wp, perm, const = P.working()
    assert sorted(perm.tolist()) == list(range(n))
    U = wp.U.numpy()
    assert np.allclose(U, np.triu(U)) and np.all(np.diag(U) > 0)
    H = A[:, perm].T @ A[:, perm]
    np.testing.assert_allclose(U.T @ U @ H, np.eye(n), atol=1e-10)
    t = np.linalg.lstsq(A, Y, rcond=None)[0]
    np.testing.assert_allclose(wp.T.numpy(), t[perm].T, atol=1e-10)
    assert wp.grid.scale.shape == (p, n) and torch.all(wp.grid.scale == 1) and torch.all(wp.grid.zero == 0)
    Z = rng.integers(-2, 3, size=(n, p))
    D = t - Z
    np.testing.assert_allclose(P.residual(Z), np.einsum("ji,jk,ki->i", D, A.T @ A, D) + const, rtol=1e-10)
    np.testing.assert_allclose(P.residual(Z[:, 0]), P.residual(Z)[0])
    # a Python-side copy of the lattice form: ‖Rl (t − q)‖² with Rl = U⁻ᵀ is the same objective
    Rl = wp.lattice().numpy()
    Dp = D[perm]
    np.testing.assert_allclose(((Rl @ Dp) ** 2).sum(0), np.einsum("ji,jk,ki->i", Dp, H, Dp), rtol=1e-10)


def test_one_dimensional_y_gives_one_dimensional_z():
    P = BILSProblem.create(**good())
    sol = solve(P, Babai())
    assert sol.z.shape == (3,) and sol.residual.shape == ()
    np.testing.assert_allclose(sol.residual, ((P.y - P.A @ sol.z) ** 2).sum())

"""Plugins: the example decoder plugin `plugins/ojbkq-colreorder` installed and discovered through its entry
point, failures and name conflicts reported, and the plugin's decoder checked against brute force."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ojbkq_core import registry
from ojbkq_core.cli import main
from ojbkq_core.decoders import Babai, Exact, Exhaustive
from ojbkq_core.errors import InputError
from ojbkq_core.grid import GridSpec
from ojbkq_core.layer import quantize_layer
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.problem import BILSProblem
from ojbkq_core.solve import solve
from ojbkq_core.stats import Statistics

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "ojbkq-colreorder"


@pytest.fixture
def entry_points(monkeypatch, tmp_path):
    """Add fake distributions' entry points in the group `ojbkq`: `add(name, module_source)` writes the
    module into a temporary folder on `sys.path` (or uses an importable module name when the source is
    None) and advertises it. The process-wide registry is reset around the test."""
    real = importlib.metadata.entry_points
    extra = []

    def fake(**kw):
        eps = list(real(**kw))
        return eps + [e for e in extra if kw.get("group") in (None, e.group)]

    def add(name, module, source=None):
        if source is not None:
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        extra.append(importlib.metadata.EntryPoint(name=name, value=module, group=registry.GROUP))

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.setattr(registry, "_REGISTRY", None)
    yield add
    for mod in [m for m in sys.modules if m.startswith("ojbkq_test_plugin_")]:
        del sys.modules[mod]


def sorted_babai(**params):
    sys.path.insert(0, str(PLUGIN))
    try:
        from ojbkq_colreorder.sorted_babai import SortedBabai
    finally:
        sys.path.remove(str(PLUGIN))
    return SortedBabai(**params)


def random_problem(seed, n=6, box=(0, 3), rhs=4, noise=0.3, diagonal=False):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    if diagonal:
        A = np.diag(rng.normal(size=n) * np.logspace(0, -2, n))
    Y = A @ rng.integers(box[0], box[1] + 1, size=(n, rhs)) + noise * rng.normal(size=(n, rhs))
    return BILSProblem.create(Y, box[0], box[1], R=A) if diagonal else BILSProblem.create(Y, box[0], box[1], A=A)


# --- (a) a real installation ----------------------------------------------------------------------

def test_installed_plugin_is_listed_and_solves(tmp_path):
    """Build and install the plugin with pip into a temporary folder (so the shared environment is left
    as it was), then run the console script with that folder on PYTHONPATH."""
    exe = shutil.which("ojbkq", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the ojbkq console script is not installed")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available")
    src = tmp_path / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build the plugin here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([exe, "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("sorted-babai"))
    assert line.split()[1] == "colreorder" and "order=vblast" in line
    assert "failed plugin: colreorder" not in r.stdout

    P = random_problem(3)
    np.savez(tmp_path / "p.npz", A=P.A, y=P.y, lower=P.lower, upper=P.upper)
    out = tmp_path / "z.npz"
    r = subprocess.run([exe, "solve", str(tmp_path / "p.npz"), "-o", str(out), "--decoder", "sorted-babai",
                        "--param", "order=diag"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with np.load(out) as f:
        z, residual = f["z"], f["residual"]
    assert z.dtype == np.int64 and np.all((z >= 0) & (z <= 3))
    np.testing.assert_allclose(residual, ((P.y - P.A @ z) ** 2).sum(0), rtol=1e-12)
    assert np.all(residual <= solve(P, Babai()).residual * (1 + 1e-9))
    r = subprocess.run([exe, "solve", str(tmp_path / "p.npz"), "-o", str(out), "--decoder", "sorted-babai",
                        "--param", "order=random"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "order='random'" in r.stderr and "vblast, diag" in r.stderr


# --- (b) discovery through the entry-point path ---------------------------------------------------

def test_entry_point_discovery_and_use_by_name(entry_points):
    entry_points("colreorder", "ojbkq_colreorder")
    reg = registry.get_registry()
    assert reg.decoders["sorted-babai"].plugin == "colreorder"
    assert reg.decoders["babai"].plugin == "builtin"
    assert not reg.failures and not reg.conflicts
    dec = reg.decoder("sorted-babai", {"order": "diag"})
    assert dec.options == {"order": "diag", "keep_natural": True}
    P = random_problem(1)
    sol = solve(P, dec)
    assert np.all((sol.z >= 0) & (sol.z <= 3))
    with pytest.raises(InputError, match="keep_natural=1"):
        reg.decoder("sorted-babai", {"keep_natural": 1})


def test_plugin_in_the_plugins_listing(entry_points, capsys):
    entry_points("colreorder", "ojbkq_colreorder")
    assert main(["plugins", "--json"]) == 0
    import json
    out = json.loads(capsys.readouterr().out)
    assert out["decoders"]["sorted-babai"] == "colreorder" and out["failures"] == {}
    assert out["formats"] == {"gptq": "builtin", "fake": "builtin", "compressed-tensors": "builtin"}


# --- (c) a broken plugin --------------------------------------------------------------------------

def test_a_plugin_that_fails_to_import_is_reported_and_the_others_work(entry_points, capsys, tmp_path):
    entry_points("colreorder", "ojbkq_colreorder")
    entry_points("broken", "ojbkq_test_plugin_broken", "raise RuntimeError('needs libfoo 2.0')\n")
    entry_points("missing", "ojbkq_test_plugin_not_there")
    entry_points("bad-hook", "ojbkq_test_plugin_badhook", """
        from ojbkq_core.hookspecs import hookimpl

        @hookimpl
        def register_decoders(register):
            raise ValueError("decoder table corrupt")
    """)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "failed plugin: broken: import ojbkq_test_plugin_broken: RuntimeError: needs libfoo 2.0" in out
    assert "failed plugin: missing: import ojbkq_test_plugin_not_there: ModuleNotFoundError" in out
    assert "failed plugin: bad-hook: register_decoders: ValueError: decoder table corrupt" in out
    assert "sorted-babai" in out and "klein" in out
    reg = registry.get_registry()
    assert set(reg.failures) == {"broken", "missing", "bad-hook"}
    P = random_problem(2)
    for name in ("sorted-babai", "babai", "exact"):
        sol = solve(P, reg.decoder(name))
        assert np.all((sol.z >= 0) & (sol.z <= 3)), name


# --- (d) name conflicts ---------------------------------------------------------------------------

def test_a_name_conflict_is_reported_and_the_first_registration_kept(entry_points, capsys):
    entry_points("colreorder", "ojbkq_colreorder")
    entry_points("clash", "ojbkq_test_plugin_clash", """
        from ojbkq_core.decoders import Babai
        from ojbkq_core.hookspecs import hookimpl

        class Impostor(Babai):
            name = "babai"

        class Other(Babai):
            name = "sorted-babai"

        @hookimpl
        def register_decoders(register):
            register(Impostor)
            register(Other)
    """)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "conflict: 'babai' from clash ignored: already registered by builtin" in out
    assert "conflict: 'sorted-babai' from clash ignored: already registered by colreorder" in out
    reg = registry.get_registry()
    assert type(reg.decoder("babai", backend="reference")) is Babai      # the builtin, not the impostor
    assert type(reg.decoder("sorted-babai")).__module__ == "ojbkq_colreorder.sorted_babai"
    assert not reg.failures


def test_a_backend_plugin_registers_a_primitive_and_every_decoder_on_its_device_calls_it(entry_points, capsys):
    """A third-party backend registers a `walk` for the CPU (here the reference's, counting its calls):
    babai, klein and the colreorder plugin's sorted-babai all walk through it under `backend: auto` and
    under its name, not under `reference`; a primitive of an unknown name is a reported failure."""
    entry_points("colreorder", "ojbkq_colreorder")
    entry_points("counting", "ojbkq_test_plugin_counting", """
        from ojbkq_core.decoders.primitives import reference_walk
        from ojbkq_core.hookspecs import hookimpl

        CALLS = []

        def walk(problem, paths=1, **kw):
            CALLS.append(paths)
            return reference_walk(problem, paths, **kw)

        @hookimpl
        def register_primitives(register):
            register("walk", "cpu", walk, 50, lambda problem: problem.T.dtype.is_floating_point)
    """)
    entry_points("typo", "ojbkq_test_plugin_typo", """
        from ojbkq_core.hookspecs import hookimpl

        @hookimpl
        def register_primitives(register):
            register("wlak", "cpu", lambda *a: None)
    """)
    import ojbkq_test_plugin_counting as counting
    reg = registry.get_registry()
    assert "unknown primitive 'wlak'" in reg.failures["typo"]
    from layer_problems import synthetic_layer
    W, st_ = synthetic_layer(5, 24, seed=3)
    spec = preset("symmetric", *PRESETS["symmetric"])
    grid = GridSpec(bits=3, group_size=-1)
    for name, params, paths in [("babai", {}, 1), ("klein", {"k": 3}, 3), ("sorted-babai", {}, 1)]:
        counting.CALLS.clear()
        res = quantize_layer(W, st_, spec, grid, reg.decoder(name, params, device="cpu"), seed=1)
        assert counting.CALLS and counting.CALLS[0] == paths and res.report["backend"] == "reference"
        counting.CALLS.clear()
        quantize_layer(W, st_, spec, grid, reg.decoder(name, params, device="cpu", backend="counting"), seed=1)
        assert counting.CALLS
        counting.CALLS.clear()
        quantize_layer(W, st_, spec, grid, reg.decoder(name, params, device="cpu", backend="reference"), seed=1)
        assert not counting.CALLS
    assert main(["plugins"]) == 0
    assert "walk           counting" in capsys.readouterr().out


# --- the decoder itself ---------------------------------------------------------------------------

@st.composite
def small_problems(draw, diagonal=False):
    n = draw(st.integers(1, 6))
    lo = draw(st.integers(-2, 1))
    hi = lo + draw(st.integers(0, 3))
    return random_problem(draw(st.integers(0, 2**32 - 1)), n=n, box=(lo, hi), rhs=draw(st.integers(1, 3)),
                          noise=draw(st.sampled_from([0.0, 0.2, 1.0])), diagonal=diagonal)


@given(P=small_problems(), order=st.sampled_from(["vblast", "diag"]))
def test_sorted_babai_in_the_box_and_never_worse_than_babai(P, order):
    babai = solve(P, Babai()).residual
    best = solve(P, Exhaustive()).residual
    for keep in (True, False):
        sol = solve(P, sorted_babai(order=order, keep_natural=keep))
        assert np.all(sol.z >= P.lower[:, None]) and np.all(sol.z <= P.upper[:, None])
        assert np.all(sol.residual >= best * (1 - 1e-9) - 1e-9)
        if keep:
            assert np.all(sol.residual <= babai * (1 + 1e-9) + 1e-12)


@given(P=small_problems(diagonal=True), order=st.sampled_from(["vblast", "diag"]))
def test_sorted_babai_on_a_diagonal_R_is_optimal(P, order):
    best = solve(P, Exhaustive()).residual
    sol = solve(P, sorted_babai(order=order, keep_natural=False))
    np.testing.assert_allclose(sol.residual, best, rtol=1e-9, atol=1e-12)


@given(P=small_problems(), seed=st.integers(0, 2**32 - 1))
def test_sorted_babai_is_equivariant_to_column_permutations(P, seed):
    """The order comes from the problem, not from how its columns happen to be numbered: permuting the
    columns of `A` permutes the solution and changes nothing else."""
    pi = np.random.default_rng(seed).permutation(P.n)
    Q = BILSProblem.create(P.y, P.lower[pi], P.upper[pi], A=P.A[:, pi])
    dec = sorted_babai(keep_natural=False)
    z, zq = solve(P, dec).z, solve(Q, dec).z
    np.testing.assert_array_equal(zq, z[pi])


def test_vblast_order_is_the_pivoted_cholesky_of_the_inverse():
    """One grid step of the column decoded next is worth `s_j² / P_jj` (`P = H⁻¹` conditioned on the
    columns already decoded, `s = 1` here); V-BLAST takes the largest at every step, so the permuted factor
    `U'` (`U'ᵀ U' = P[π][:, π]`) has the smallest remaining conditional variance on its diagonal."""
    dec = sorted_babai()
    P = random_problem(5, n=7)
    wp, _, _ = P.working()
    perm = dec.order(wp)
    assert sorted(perm.tolist()) == list(range(7))
    Hinv = (wp.U.T @ wp.U).numpy()
    assert perm[0] == int(np.argmin(np.diag(Hinv)))
    from ojbkq_colreorder.sorted_babai import permute
    U2 = permute(wp, perm).U.numpy()
    np.testing.assert_allclose(U2.T @ U2, Hinv[np.ix_(perm, perm)], atol=1e-10)
    # at each step k, the chosen column has the smallest conditional variance U2[k, k]² among the rest
    for k in range(7):
        rest = Hinv[np.ix_(perm[k:], perm[k:])] - U2[:k, k:].T @ U2[:k, k:]
        assert np.isclose(U2[k, k] ** 2, np.diag(rest).min())


def test_vblast_finds_the_optimum_more_often_than_babai():
    """Near a lattice point inside the box the V-BLAST order is the better Babai order (fixed seeds)."""
    hits = {"babai": 0, "vblast": 0}
    dec = {"babai": Babai(), "vblast": sorted_babai(keep_natural=False)}
    for seed in range(60):
        P = random_problem(seed, n=8, rhs=4, noise=0.2)
        opt = solve(P, Exact()).residual
        for k, d in dec.items():
            hits[k] += int(np.sum(solve(P, d).residual <= opt * (1 + 1e-9) + 1e-12))
    assert hits["vblast"] > hits["babai"] + 20, hits


def test_sorted_babai_on_a_layer():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    stats = Statistics.from_inputs(X, dtype=torch.float64)
    spec = preset("symmetric", *PRESETS["symmetric"])
    for grid in (GridSpec(bits=3, group_size=-1), GridSpec(bits=3, group_size=4, static_groups=True, act_order=True),
                 GridSpec(group_size=16, grid="nvfp4", static_groups=True)):
        babai = quantize_layer(W, stats, spec, grid, Babai(), dtype=torch.float64)
        res = quantize_layer(W, stats, spec, grid, sorted_babai(), dtype=torch.float64)
        assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= grid.maxq
        assert torch.all(res.row_loss <= babai.row_loss * (1 + 1e-9))
        assert sum(res.report["candidate_histogram"]) == 5
    with pytest.raises(InputError, match="'sorted-babai' reorders columns and needs a static grid"):
        quantize_layer(W, stats, spec, GridSpec(bits=3, group_size=4), sorted_babai(), dtype=torch.float64)
    with pytest.raises(InputError, match="order='sorted'.*vblast, diag"):
        sorted_babai(order="sorted")


def test_a_plugin_given_by_its_dotted_name_is_registered_under_that_name(tmp_path, monkeypatch):
    (tmp_path / "dotted_backend.py").write_text(textwrap.dedent("""
        from ojbkq_core.hookspecs import hookimpl

        @hookimpl
        def register_primitives(register):
            register("rows", "cpu", lambda problem, paths: 1, priority=0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = registry.load(extra_plugins=("dotted_backend",))
    assert [i.plugin for i in reg.primitives if i.name == "rows" and i.priority == 0] == ["dotted_backend"]
    assert reg.pm.get_plugin("dotted_backend") is not None

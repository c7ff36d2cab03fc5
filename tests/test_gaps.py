"""Optimality gaps on sub-problems cut from layers (docs/formulation.md §7): the sub-problem is the layer's
objective with the other columns fixed, exact is never beaten, babai is optimal on one column, and
`ojbkq gaps` runs on a tiny Llama saved to disk."""
import json
import os

import numpy as np
import pytest
import torch

from ojbkq_core import cli
from ojbkq_core.decoders import Babai, Beam, Klein
from ojbkq_core.gaps import Entry, relative_gaps, solve, windows_of
from ojbkq_core.grid import GridSpec
from ojbkq_core.layer import quantize_layer
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.stats import Statistics
from test_layer import correlated_inputs
from tiny_models import CALIB_TXT, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quantized_layer(name="jta", params=None, act_order=True, bits=3, damp=0.01, grid="int"):
    """A synthetic layer, its statistics, objective and `quantize_layer` result (babai, dynamic groups)."""
    X, Xfp = correlated_inputs(300, 48, seed=3, mismatch=0.2)
    W = torch.randn(12, 48, generator=torch.Generator().manual_seed(4))
    spec = preset(name, *PRESETS[name], **({"mu": 0.6, "lam": 0.6} if params is None else params))
    obj, _ = spec.build()
    stats = Statistics.from_inputs(X, Xfp, needs=obj.needs)
    spec = GridSpec(bits=bits, group_size=16, act_order=act_order, grid=grid)
    res = quantize_layer(W, stats, obj, spec, Babai(), seed=7, damp=damp)
    return W, stats, obj, res, spec.maxq


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name,params", [("symmetric", {}), ("jta", {"mu": 0.6, "lam": 0.6})])
def test_window_objective_is_the_layer_objective_with_the_rest_fixed(name, params, act_order):
    """f(q_S) − f(q'_S) equals the layer objective's difference (from the statistics, natural column order)
    when only the window's columns change: the conditioning and the column order are right."""
    W, stats, obj, res, maxq = quantized_layer(name, params, act_order=act_order)
    wins = windows_of("layer", "x", W, stats, obj, res, maxq, c=5, rows=4, windows=3, rng=np.random.default_rng(0))
    H = obj.quadratic(stats)[0]
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(48)
    assert torch.equal(perm, res.perm)
    inv = torch.argsort(perm)
    Qp = res.qweight.double()[:, perm]                              # decoding order
    assert all(torch.allclose(w.q, Qp[w.rows, w.j:w.j + 5], atol=1e-6) for w in wins)
    g = torch.Generator().manual_seed(0)
    for win in wins:
        codes = torch.randint(0, win.maxq + 1, win.q.shape, generator=g).double()
        other = win.scale * (codes - win.zero)
        Q2 = Qp.clone()
        Q2[win.rows, win.j:win.j + 5] = other
        full = obj.value(W.double(), Qp[:, inv], stats)[win.rows] - obj.value(W.double(), Q2[:, inv], stats)[win.rows]
        sub = win.value(win.q) - win.value(other)
        assert torch.allclose(sub, full.double(), rtol=1e-6, atol=1e-9 * float(win.value(other).abs().max()))
        assert torch.all(win.value(win.q) >= 0) and torch.all(win.value(other) >= 0)


@pytest.mark.parametrize("grid,bits", [("int", 3), ("nvfp4", 4)])
def test_exact_is_never_beaten_and_babai_is_optimal_on_one_column(grid, bits):
    W, stats, obj, res, maxq = quantized_layer(damp=0.0, grid=grid, bits=bits)
    decs = [Entry("babai", "babai", {}, decoder=Babai()), Entry("klein k=8", "klein", {"k": 8}, decoder=Klein(k=8)),
            Entry("beam width=4", "beam", {"width": 4}, decoder=Beam(width=4))]
    recipe = Entry("babai (layer)", "babai", {}, on="layer")
    for c in (1, 6):
        wins = windows_of("layer", "x", W, stats, obj, res, maxq, c=c, rows=6, windows=4, rng=np.random.default_rng(c))
        assert all(w.lam == 0 for w in wins) and all(w.alphabet is res.alphabet for w in wins)
        Qp = res.qweight.double()[:, res.perm]
        assert all(torch.allclose(w.q, Qp[w.rows, w.j:w.j + c], atol=1e-6) for w in wins)
        found, skipped = solve(wins, decs, recipe, max_nodes=10**6, seed=0, progress=False)
        assert skipped == {"singular_windows": 0, "rows_past_max_nodes": 0}
        by = {}
        for row in found:
            by.setdefault(row["label"], []).append(row)
        assert set(by) == {"babai", "klein k=8", "beam width=4", "babai (layer)", "exact"}
        for label, rows in by.items():
            f, fstar = np.array([x["f"] for x in rows]), np.array([x["fstar"] for x in rows])
            assert len(rows) == 24 and np.all(fstar <= f * (1 + 1e-9) + 1e-12)      # exact is never worse
        gap = {k: relative_gaps(np.array([x["f"] for x in v]), np.array([x["fstar"] for x in v])) for k, v in by.items()}
        # candidates include the Babai path and are chosen by f: never worse than babai, row by row
        assert np.all(gap["klein k=8"] <= gap["babai"] + 1e-12) and np.all(gap["beam width=4"] <= gap["babai"] + 1e-12)
        if c == 1:
            assert np.all(gap["babai"] == 0)
        else:
            assert gap["babai"].max() > 0                               # not a vacuous comparison


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save(tiny_llama(), str(tmp_path_factory.mktemp("models") / "llama"))


def _tiny(model_dir, *extra):
    return [f"model.path={model_dir}", "model.dtype=float32", f"calibration.path={CALIB_TXT}",
            "calibration.samples=8", "calibration.seqlen=64", "quant.group_size=32", "eval.perplexity=[]",
            "device=cpu", *extra]


def test_command_on_a_tiny_llama(llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "gaps.json")
    sets = [a for kv in _tiny(llama_dir) for a in ("--set", kv)]
    args = ["gaps", "gptq", *sets, "--bits", "3,4", "--blocks", "1",
            "--rows", "3", "--windows", "2", "--decoders", "babai,klein:k=4,successive,beam:width=4",
            "--undamped", "babai", "-o", out]
    assert cli.main([*args, "--columns", "1"]) == 0
    records = json.load(open(out))
    babai = [r for r in records if r["decoder"] == "babai" and r["solved_on"] == "sub-problem" and r["damping"] == "none"]
    assert {r["layer"] for r in babai} == {"q", "k", "v", "o", "gate", "up", "down", "all"}
    assert {r["bits"] for r in babai} == {3, 4}
    assert all(r["optimal_fraction"] == 1.0 and r["gap_mean"] == 0 for r in babai)   # one column: babai is optimal

    assert cli.main([*args, "--columns", "8"]) == 0
    records = json.load(open(out))
    assert open(str(tmp_path / "gaps.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "klein k=4" in table and "babai (layer)" in table and "babai λ=0" in table
    keys = {"decoder", "params", "bits", "layer", "grid", "optimal_fraction", "gap_mean", "gap_p95", "count", "c",
            "rows", "seed", "model", "device"}
    assert all(keys <= r.keys() for r in records)
    assert all(r["below_exact"] == 0 for r in records)                                # exact is never worse
    alls = {(r["decoder"], str(r["params"]), r["bits"]): r for r in records if r["layer"] == "all" and r["damping"] == "layer"}
    exact = [r for r in records if r["decoder"] == "exact"]
    assert exact and all(r["optimal_fraction"] == 1.0 for r in exact)
    assert all(r["count"] == 7 * 2 * 3 for r in alls.values())
    assert any(r["gap_mean"] > 0 for r in alls.values())                              # some decoder loses somewhere
    assert alls[("klein", str({"k": 4}), 3)]["gap_mean"] <= alls[("babai", "{}", 3)]["gap_mean"] + 1e-12


def test_bad_input(llama_dir, tmp_path, capsys):
    sets = [a for kv in _tiny(llama_dir) for a in ("--set", kv)]
    base = ["gaps", "gptq", *sets, "-o", str(tmp_path / "g.json")]
    assert cli.main([*base, "--blocks", "5"]) == 2
    assert "--blocks 5: the model has blocks 0..1" in capsys.readouterr().err
    assert cli.main([*base, "--columns", "0"]) == 2
    assert "--columns 0" in capsys.readouterr().err
    assert cli.main([*base, "--decoders", "klein:k"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert cli.main([*base, "-o", str(tmp_path / "no" / "g.json")]) == 2
    assert not os.path.exists(tmp_path / "g.json")

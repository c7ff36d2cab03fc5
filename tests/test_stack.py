"""Experts decoded together (layer.quantize_stack, WorkingProblem.stack): one decoder call for a group of layers
of one shape, each with its own statistics and factor `U`, gives every layer the codes its own call gives."""
import numpy as np
import pytest
import torch

from ojbkq_core.decoders import Babai, Beam, Klein, Successive
from ojbkq_core.grid import GridSpec
from ojbkq_core.layer import quantize_layer, quantize_stack
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.problem import WorkingProblem
from ojbkq_core.stats import Statistics

from test_layer import correlated_inputs


def experts(E=4, m=12, n=48, dtype=torch.float64, dead=True):
    """`E` weights `(m, n)` with statistics of their own (different inputs, token counts and dead columns)."""
    Ws, stats = [], []
    for e in range(E):
        X, Xfp = correlated_inputs(100 + 37 * e, n, seed=e, dead=(e,) if dead else ())
        Ws.append(torch.randn(m, n, generator=torch.Generator().manual_seed(50 + e)))
        stats.append(Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"), dtype=dtype))
    return Ws, stats


def objectives(name, E):
    spec = preset(name, *PRESETS[name])
    return [spec.build(np.random.default_rng([7, e]))[0] for e in range(E)]


CASES = [
    ("symmetric", Babai, {}, GridSpec(bits=4, group_size=8)),
    ("symmetric", Babai, {}, GridSpec(bits=3, group_size=-1, act_order=True)),
    ("jta", Klein, {"k": 5}, GridSpec(bits=3, group_size=8)),
    ("jta", Klein, {"k": 4}, GridSpec(bits=3, group_size=16, act_order=True, static_groups=True)),
    ("regularized", Successive, {}, GridSpec(bits=3, group_size=8)),
    ("symmetric", Klein, {"k": 4}, GridSpec(bits=4, group_size=16, grid="nvfp4", static_groups=True)),
]


@pytest.mark.parametrize("name,decoder,params,grid", CASES)
def test_each_expert_of_a_stack_gets_the_codes_of_its_own_call(name, decoder, params, grid):
    Ws, stats = experts()
    objs = objectives(name, len(Ws))
    seeds = [11, 12, 13, 14]
    stacked = quantize_stack(Ws, stats, objs, grid, decoder(**params), seeds=seeds, dtype=torch.float64)
    for e, res in enumerate(stacked):
        own = quantize_layer(Ws[e], stats[e], objs[e], grid, decoder(**params), seed=seeds[e], dtype=torch.float64)
        assert res.report["stacked"] == 4 and "stacked" not in own.report and res.report["backend"] == "reference"
        assert torch.equal(res.codes, own.codes), e
        torch.testing.assert_close(res.scales, own.scales)
        torch.testing.assert_close(res.row_loss, own.row_loss, rtol=1e-10, atol=1e-12)
        assert res.report["path_objective"] == pytest.approx(own.report["path_objective"], rel=1e-10)
        if "candidate_histogram" in own.report:
            assert res.report["candidate_histogram"] == own.report["candidate_histogram"]


def test_in_float32_a_stack_stays_within_the_float32_tolerance():
    Ws, stats = experts(E=3, m=32, n=64, dtype=torch.float32)
    objs = objectives("jta", 3)
    grid = GridSpec(bits=3, group_size=16)
    for dec, bound in ((Babai(), 1e-3), (Klein(k=4), 0.05)):
        stacked = quantize_stack(Ws, stats, objs, grid, dec, seeds=[1, 2, 3])
        for e, res in enumerate(stacked):
            own = quantize_layer(Ws[e], stats[e], objs[e], grid, dec, seed=e + 1)
            assert (res.codes != own.codes).float().mean().item() <= bound
            assert res.loss == pytest.approx(own.loss, rel=5e-3)


def test_a_decoder_that_cannot_stack_is_called_once_per_expert():
    Ws, stats = experts(E=2)
    objs = objectives("symmetric", 2)
    grid = GridSpec(bits=2, group_size=8)
    out = quantize_stack(Ws, stats, objs, grid, Beam(width=2), seeds=[3, 4], dtype=torch.float64)
    for e, res in enumerate(out):
        own = quantize_layer(Ws[e], stats[e], objs[e], grid, Beam(width=2), seed=3 + e, dtype=torch.float64)
        assert "stacked" not in res.report and torch.equal(res.codes, own.codes)


def test_rows_of_a_stack_are_whole_problems():
    Ws, stats = experts(E=3, m=4, n=8, dead=False)
    probs = []
    for W, st in zip(Ws, stats):
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(st.H.double() + torch.eye(8))), upper=True)
        from ojbkq_core.grid import Grid
        g = Grid(torch.zeros(8, dtype=torch.float64), torch.full((8,), 7.0, dtype=torch.float64),
                 torch.full((4, 8), 0.1, dtype=torch.float64), torch.full((4, 8), 3.0, dtype=torch.float64))
        probs.append(WorkingProblem(U, W.double(), g))
    st = WorkingProblem.stack(probs, [5, 6, 7])
    assert st.problems == 3 and st.m == 12 and st.diagonal().shape == (12, 8)
    assert torch.equal(st.draws[0], torch.tensor([5] * 4 + [6] * 4 + [7] * 4))
    assert torch.equal(st.draws[1], torch.arange(4).repeat(3))
    two = st.rows(slice(4, 12))
    assert two.problems == 2 and torch.equal(two.U[0], probs[1].U) and torch.equal(two.draws[0][:4], torch.full((4,), 6))
    with pytest.raises(ValueError, match="split a problem"):
        st.rows(slice(2, 6))
    # a stack chunked by whole problems decodes as the whole stack
    whole = Klein(k=3).decode(st)
    parts = [Klein(k=3).decode(st.rows(slice(i, i + 4))) for i in range(0, 12, 4)]
    assert torch.equal(torch.cat([p.codes for p in parts]), whole.codes)


@pytest.mark.parametrize("name,params,objective", [("babai", {}, "symmetric"), ("klein", {"k": 4}, "jta"),
                                                    ("successive", {}, "regularized")])
def test_the_cpu_plugin_walks_a_stack_with_each_experts_codes(name, params, objective):
    """The CPU plugin's kernels take a stack (each row with its expert's `U`, seed and row index): each expert
    gets the codes of its own call through the plugin, and the reference stack's."""
    pytest.importorskip("numba")
    reg = cpu_registry()
    Ws, stats = experts(E=3, dtype=torch.float32)
    objs = objectives(objective, 3)
    grid = GridSpec(bits=3, group_size=8)
    dec = lambda: reg.decoder(name, params, device="cpu")  # noqa: E731
    out = quantize_stack(Ws, stats, objs, grid, dec(), seeds=[1, 2, 3])
    ref = quantize_stack(Ws, stats, objs, grid, type(dec())(**params), seeds=[1, 2, 3])
    for e, r in enumerate(out):
        own = quantize_layer(Ws[e], stats[e], objs[e], grid, dec(), seed=e + 1)
        assert r.report["stacked"] == 3 and r.report["backend"] == "ojbkq-cpu" and own.report["backend"] == "ojbkq-cpu"
        assert torch.equal(r.codes, own.codes) and torch.equal(r.codes, ref[e].codes), e


def test_a_backend_whose_walk_takes_one_u_decodes_the_experts_one_call_each():
    """A backend that runs single problems but not stacks: rather than the reference walk on the stack, each
    expert is decoded by its own call through it."""
    from ojbkq_core.decoders.primitives import Impl, Primitives, reference_walk
    calls = []

    def single_only(problem, paths=1, **kw):
        calls.append(problem.problems)
        return reference_walk(problem, paths, **kw)
    prims = Primitives({"walk": [Impl("walk", "cpu", single_only, 1, lambda p: p.problems == 1, "one-u")]})
    Ws, stats = experts(E=2)
    objs = objectives("symmetric", 2)
    grid = GridSpec(bits=4, group_size=8)
    out = quantize_stack(Ws, stats, objs, grid, Babai().use(prims), seeds=[1, 2], dtype=torch.float64)
    assert calls == [1, 1] and all("stacked" not in r.report for r in out)
    together = quantize_stack(Ws, stats, objs, grid, Babai(), seeds=[1, 2], dtype=torch.float64)   # the reference stacks
    assert all(r.report["stacked"] == 2 for r in together)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(out, together))


def cpu_registry():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "ojbkq-cpu"))
    from ojbkq_cpu import plugin
    from ojbkq_core.registry import load
    return load(extra_plugins=(plugin,))

"""The CPU plugin `plugins/ojbkq-cpu`: its hook registers the CPU primitives (walk, beam), the decoders built
for the CPU call them, and its numba kernels take the reference decoders' decisions exactly (same codes,
grids and objectives, bit for bit)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "ojbkq-cpu"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from ojbkq_core.decoders import Babai, Beam, Klein, Successive  # noqa: E402
from ojbkq_core.decoders.search import smallest  # noqa: E402
from ojbkq_core.grid import GridSpec  # noqa: E402
from ojbkq_core.layer import quantize_layer  # noqa: E402
from ojbkq_core.objectives import PRESETS, preset  # noqa: E402
from ojbkq_core.problem import BILSProblem  # noqa: E402
from ojbkq_core.registry import load  # noqa: E402
from ojbkq_core.rng import to_unit  # noqa: E402
from ojbkq_cpu import plugin  # noqa: E402
from ojbkq_core.decoders.primitives import REFERENCE  # noqa: E402
from ojbkq_cpu.kernels import _BUCKET_SHIFT, gumbel_bucket_bounds  # noqa: E402
from layer_problems import synthetic_layer as layer  # noqa: E402

PAIRS = {"babai": Babai, "klein": Klein, "successive": Successive, "beam": Beam}
CPU = load(extra_plugins=(plugin,)).decoder("babai", device="cpu").primitives    # the CPU plugin's primitives


def on_cpu(cls, **params):
    """The decoder `cls(**params)` calling the CPU plugin's primitives."""
    return cls(**params).use(CPU)


GRIDS = {
    "groups-inside-blocks": GridSpec(bits=4, group_size=16),
    "row-grid+act-order": GridSpec(bits=3, group_size=-1, act_order=True),
    "groups-not-dividing-n": GridSpec(bits=4, group_size=20),
    "static-groups+sym": GridSpec(bits=3, group_size=16, static_groups=True, sym=True),
    "group-over-two-blocks": GridSpec(bits=3, group_size=256),
    "nvfp4-static+act-order": GridSpec(group_size=16, grid="nvfp4", static_groups=True, act_order=True),
    "mxfp4-fitted-in-the-walk": GridSpec(group_size=32, grid="mxfp4"),
}


def both(name, params, W, st, objective="symmetric", grid=None, seed=3, **kw):
    cls = PAIRS[name]
    spec = preset(objective, *PRESETS[objective])
    grid = grid or GridSpec(bits=4, group_size=16)
    a = quantize_layer(W, st, spec, grid, cls(**params), seed=seed, **kw)
    b = quantize_layer(W, st, spec, grid, on_cpu(cls, **params), seed=seed, **kw)
    assert a.report["backend"] == "reference" and b.report["backend"] == "ojbkq-cpu"
    return a, b


def same(a, b):
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert b.loss == a.loss


def test_the_hook_registers_the_cpu_primitives_and_cpu_decoders_call_them():
    reg = load(extra_plugins=(plugin,))
    mine = [i for i in reg.primitives if i.fn.__module__ == "ojbkq_cpu.primitives"]
    assert {i.name for i in mine} == {"walk", "beam"}
    assert all(i.device == "cpu" and i.priority == plugin.PRIORITY for i in mine)
    for name, cls in PAIRS.items():
        d = reg.decoder(name, {}, device="cpu")
        assert type(d) is cls                              # the reference class, calling the CPU primitives
        assert {i.fn.__module__ for v in d.primitives.impls.values() for i in v} == {"ojbkq_cpu.primitives"}
        assert reg.decoder(name, {}, device="cpu", backend="reference").primitives is REFERENCE
        assert reg.decoder(name, {}, device="cpu", backend=mine[0].plugin).primitives.impls
        assert not any(i.fn.__module__ == "ojbkq_cpu.primitives"
                       for v in reg.decoder(name, {}, device="cuda").primitives.impls.values() for i in v)


def test_a_plugin_decoder_that_calls_the_primitives_runs_on_the_cpu_kernels():
    """A decoder outside the project (here: the two best of Klein's candidates, by the walk primitive) gets
    the CPU kernels through `self.primitives`, with the reference's results."""
    from ojbkq_core.decoders import Decoder
    from ojbkq_core.decoders.primitives import Sampling

    class Twice(Decoder):
        name = "twice"

        def decode(self, problem, seed=0, row0=0):
            beta = torch.full((problem.m,), 50.0)
            paths = self.primitives.walk(problem, 4, sampling=Sampling(beta, 2, seed, row0))
            return paths.best(problem)

    W, st = layer(6, 96, seed=13)
    spec = preset("symmetric", *PRESETS["symmetric"])
    grid = GridSpec(bits=3, group_size=16)
    a = quantize_layer(W, st, spec, grid, Twice(), seed=2)
    b = quantize_layer(W, st, spec, grid, Twice().use(CPU), seed=2)
    assert (a.report["backend"], b.report["backend"]) == ("reference", "ojbkq-cpu")
    same(a, b)


def test_float64_problems_go_to_the_reference_unchanged():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64).numpy()
    y = torch.randn(6, 3, generator=g, dtype=torch.float64).numpy() * 3
    wp, _, _ = BILSProblem.create(y, -2, 2, A=A).working()
    for name, params in [("babai", {}), ("klein", {"k": 4}), ("beam", {"width": 3})]:
        cls = PAIRS[name]
        a, b = cls(**params).decode(wp, seed=5), on_cpu(cls, **params).decode(wp, seed=5)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.objective, b.objective)
        assert b.info["backend"] == "reference"


@pytest.mark.parametrize("grid", list(GRIDS))
def test_babai_takes_the_reference_decisions(grid):
    W, st = layer(12, 300, seed=len(grid))
    a, b = both("babai", {}, W, st, grid=GRIDS[grid])
    same(a, b)
    assert b.report["path_objective"] == a.report["path_objective"]


@pytest.mark.parametrize("rows", [8, 37])                       # within one program's rows, and over three
def test_successive_carries_the_injection_like_the_reference(rows):
    W, st = layer(rows, 160, seed=5)
    a, b = both("successive", {}, W, st, objective="regularized")
    same(a, b)


@pytest.mark.parametrize("grid", ["nvfp4-static+act-order", "mxfp4-fitted-in-the-walk"])
def test_successive_on_an_fp4_alphabet(grid):
    W, st = layer(9, 160, seed=15)
    a, b = both("successive", {}, W, st, objective="regularized", grid=GRIDS[grid])
    same(a, b)


@pytest.mark.parametrize("objective", ["symmetric", "jta"])
@pytest.mark.parametrize("grid", ["groups-inside-blocks", "row-grid+act-order", "groups-not-dividing-n",
                                  "nvfp4-static+act-order", "mxfp4-fitted-in-the-walk"])
def test_klein_draws_the_reference_numbers(objective, grid):
    """Same seed, same counter-based uniforms: the same candidates and the same choice per row."""
    W, st = layer(10, 200, seed=6)
    a, b = both("klein", {"k": 6, "window": 3}, W, st, objective=objective, grid=GRIDS[grid])
    same(a, b)
    assert a.report["candidate_histogram"] == b.report["candidate_histogram"]


@pytest.mark.parametrize("grid", [GridSpec(bits=2, group_size=16),
                                  GridSpec(group_size=16, grid="nvfp4", static_groups=True)])
def test_klein_with_a_fixed_beta_and_clamped_targets(grid):
    """A small β (draws far from the nearest code) and targets beyond the box (codes clamped)."""
    W, st = layer(8, 64, seed=12)
    a, b = both("klein", {"k": 5, "window": 4, "beta": 0.05}, 6 * W, st, grid=grid)
    same(a, b)


def test_klein_is_independent_of_row_chunks_and_never_worse_than_babai():
    W, st = layer(6, 64, seed=7)
    spec = preset("symmetric", *PRESETS["symmetric"])
    grid = GridSpec(bits=3, group_size=16)
    whole = quantize_layer(W, st, spec, grid, on_cpu(Klein, k=3, window=1), seed=11)
    parts = quantize_layer(W, st, spec, grid, on_cpu(Klein, k=3, window=1), seed=11, max_rows=4)
    assert torch.equal(whole.codes, parts.codes)
    babai = quantize_layer(W, st, spec, grid, on_cpu(Babai), seed=11)
    assert (whole.row_loss <= babai.row_loss * (1 + 1e-9) + 1e-12).all()


@pytest.mark.parametrize("grid", ["groups-inside-blocks", "row-grid+act-order", "group-over-two-blocks",
                                  "nvfp4-static+act-order", "mxfp4-fitted-in-the-walk"])
@pytest.mark.parametrize("objective", ["symmetric", "jta"])
def test_beam_keeps_the_reference_beams(grid, objective):
    W, st = layer(6, 300, seed=8)
    a, b = both("beam", {"width": 3, "expand": 2}, W, st, objective=objective, grid=GRIDS[grid])
    same(a, b)
    assert a.report["candidate_histogram"] == b.report["candidate_histogram"]


def test_beam_on_a_lattice_problem_with_ties():
    """Integer targets on an integer lattice make equal partial scores common: ties are broken the same
    way (lower index first), and beam with the Babai path is never worse than babai."""
    g = torch.Generator().manual_seed(9)
    A = torch.randint(-2, 3, (10, 10), generator=g).double().numpy() + 4 * np.eye(10)
    y = torch.randint(-6, 7, (10, 5), generator=g).double().numpy()
    wp, _, _ = BILSProblem.create(y, -3, 2, A=A).working(dtype=torch.float32)
    for width, expand in [(2, 1), (4, 2), (5, 3)]:
        a, b = Beam(width=width, expand=expand).decode(wp), on_cpu(Beam, width=width, expand=expand).decode(wp)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.objective, b.objective)
        bab = on_cpu(Babai).decode(wp)
        assert torch.equal(bab.codes, Babai().decode(wp).codes)
        assert (b.objective <= bab.objective + 1e-5).all()
        assert ((b.codes >= -3) & (b.codes <= 2)).all()


def test_smallest_keeps_equal_values_in_index_order():
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0], [float("inf"), 0.0], [1.0, float("inf")]])
    v, i = smallest(x, 3, 0)
    assert i[:, 0].tolist() == [1, 3, 0] and i[:, 1].tolist() == [2, 0, 1]
    assert v[:, 1].tolist() == [0.0, 1.0, 1.0]


def test_the_bucket_bounds_cover_every_draw():
    """Every 32-bit hash's Gumbel draw (as the reference computes it) lies within its bucket's bounds, and
    the bounds are tight (within 0.01 of the bucket's smallest and largest draw)."""
    h = torch.arange(1 << 24, dtype=torch.int64)            # the 24 bits a uniform is made of
    g = -torch.log(-torch.log(to_unit(h << 8))).view(-1, 1 << (_BUCKET_SHIFT - 8))
    lo, hi = g.amin(1).double().numpy(), g.amax(1).double().numpy()
    gmin, gmax = gumbel_bucket_bounds()
    assert (gmin < lo).all() and (hi < gmax).all()
    assert (lo - gmin < 0.01).all() and (gmax - hi < 0.01).all()

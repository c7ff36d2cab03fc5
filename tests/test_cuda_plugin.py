"""The GPU plugin `plugins/ojbkq-cuda`: its hook registers the device primitives (walk, beam, row budget), the
decoders built for a CUDA device call them, and its kernels take the same decisions as the reference decoders.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`, set here
before the kernels are first imported), so the comparisons with the reference run on any machine with
Triton installed; with a GPU the compiled kernels are compared on CUDA tensors.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "ojbkq-cuda"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from ojbkq_core.decoders import Babai, Beam, Klein, Successive  # noqa: E402
from ojbkq_core.errors import InputError  # noqa: E402
from ojbkq_core.grid import GridSpec  # noqa: E402
from ojbkq_core.layer import quantize_layer  # noqa: E402
from ojbkq_core.objectives import PRESETS, preset  # noqa: E402
from ojbkq_core.problem import BILSProblem  # noqa: E402
from ojbkq_core.registry import load  # noqa: E402
from ojbkq_cuda import plugin, runtime  # noqa: E402
from ojbkq_core.decoders.primitives import REFERENCE  # noqa: E402
from layer_problems import synthetic_layer as layer  # noqa: E402

PAIRS = {"babai": Babai, "klein": Klein, "successive": Successive, "beam": Beam}
DEVICE = load(extra_plugins=(plugin,)).decoder("babai", device="cuda").primitives   # the plugin's primitives


def on_device(cls, **params):
    """The decoder `cls(**params)` calling the GPU plugin's primitives."""
    return cls(**params).use(DEVICE)


interpreted = pytest.mark.skipif(not runtime.interpreted(),
                                 reason="needs Triton's interpreter (Triton installed, no GPU)")
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and runtime.triton_available()),
                          reason="needs a CUDA device and Triton")


def both(name, params, W, st, objective="symmetric", grid=None, seed=3, **kw):
    cls = PAIRS[name]
    spec = preset(objective, *PRESETS[objective])
    grid = grid or GridSpec(bits=4, group_size=16)
    a = quantize_layer(W, st, spec, grid, cls(**params), seed=seed, **kw)
    b = quantize_layer(W, st, spec, grid, on_device(cls, **params), seed=seed, **kw)
    assert a.report["backend"] == "reference" and b.report["backend"] == "ojbkq-cuda"
    return a, b


# --- registration (no Triton needed) -------------------------------------------------------------

def test_the_hook_registers_the_device_primitives_and_cuda_decoders_call_them():
    reg = load(extra_plugins=(plugin,))
    mine = [i for i in reg.primitives if i.fn.__module__ == "ojbkq_cuda.primitives"]
    assert {i.name for i in mine} == {"walk", "beam", "rows"}
    assert all(i.device == "cuda" and i.priority > 0 for i in mine)
    for name, cls in PAIRS.items():
        for device in ("cuda", "cuda:1"):
            d = reg.decoder(name, {}, device=device)
            assert type(d) is cls
            assert {i.fn.__module__ for v in d.primitives.impls.values() for i in v} == {"ojbkq_cuda.primitives"}
        assert not any(i.fn.__module__ == "ojbkq_cuda.primitives"
                       for v in reg.decoder(name, {}, device="cpu").primitives.impls.values() for i in v)
        assert reg.decoder(name, {}, device="cuda", backend="reference").primitives is REFERENCE
        assert reg.decoder(name, {}, device="cuda", backend=mine[0].plugin).primitives.impls
    with pytest.raises(InputError, match="backend 'turbo'"):
        reg.decoder("klein", {}, device="cuda", backend="turbo")


def test_parameters_are_checked_as_by_the_reference():
    reg = load(extra_plugins=(plugin,))
    with pytest.raises(InputError, match="k=0"):
        reg.decoder("klein", {"k": 0}, device="cuda")
    with pytest.raises(InputError, match="unknown parameter"):
        reg.decoder("beam", {"widht": 2}, device="cuda")
    assert reg.decoder("beam", {"width": 3}, device="cuda").options == {"width": 3, "expand": 2}


def test_float64_problems_go_to_the_reference_unchanged():
    """The kernels take float32; a float64 lattice problem is decoded by the reference implementation."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64).numpy()
    y = torch.randn(6, 3, generator=g, dtype=torch.float64).numpy() * 3
    wp, _, _ = BILSProblem.create(y, -2, 2, A=A).working()
    for name, params in [("babai", {}), ("klein", {"k": 4}), ("beam", {"width": 3})]:
        cls = PAIRS[name]
        a, b = cls(**params).decode(wp, seed=5), on_device(cls, **params).decode(wp, seed=5)
        assert b.info["backend"] == "reference"
        assert torch.equal(a.codes, b.codes) and torch.equal(a.objective, b.objective)


@interpreted
def test_fp4_problems_take_the_reference_decisions_in_the_kernels():
    """A float32 problem on the E2M1 alphabet (targets past both ends of the box included): the kernels, given
    the alphabet as a table, take the reference decoders' decisions."""
    from ojbkq_core.grid import E2M1, Grid
    from ojbkq_core.problem import WorkingProblem
    g = torch.Generator().manual_seed(2)
    n, m = 8, 5
    A = torch.randn(n + 2, n, generator=g)
    U = torch.linalg.cholesky(torch.linalg.inv(A.T @ A + 0.1 * torch.eye(n))).T.contiguous()
    T = torch.randn(m, n, generator=g) * 4
    grid = Grid(torch.zeros(n), torch.full((n,), 14.0), torch.ones(m, n), torch.zeros(m, n), alphabet=E2M1)
    wp = WorkingProblem(U, T, grid)
    for name, params in [("babai", {}), ("klein", {"k": 4, "window": 3}), ("beam", {"width": 3, "expand": 2})]:
        cls = PAIRS[name]
        a, b = cls(**params).decode(wp, seed=5), on_device(cls, **params).decode(wp, seed=5)
        assert b.info["backend"] != "reference"
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.objective, b.objective, rtol=1e-5, atol=1e-6)
    assert E2M1.value(a.codes).abs().max() == 6                     # some codes at the ends of the box


# --- the kernels against the reference (interpreter on CPU) ---------------------------------------

GRIDS = {
    "groups": GridSpec(bits=4, group_size=16),
    "row-grid+act-order": GridSpec(bits=3, group_size=-1, act_order=True),
    "groups-not-dividing-n": GridSpec(bits=4, group_size=20),
    "static-groups+sym": GridSpec(bits=3, group_size=16, static_groups=True, sym=True),
    "nvfp4-static+act-order": GridSpec(group_size=16, grid="nvfp4", static_groups=True, act_order=True),
    "mxfp4-fitted-in-the-walk": GridSpec(group_size=32, grid="mxfp4"),
}


@interpreted
@pytest.mark.parametrize("grid", list(GRIDS))
def test_babai_kernel_takes_the_reference_decisions(grid):
    W, st = layer(12, 48, seed=hash(grid) % 1000)
    a, b = both("babai", {}, W, st, grid=GRIDS[grid])
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros)
    # the block products are summed in another order (one in-place product per block): grids fitted on
    # updated targets agree to rounding
    torch.testing.assert_close(a.scales, b.scales, rtol=1e-5, atol=0)
    assert b.loss == pytest.approx(a.loss, rel=1e-6)
    assert b.report["path_objective"] == pytest.approx(a.report["path_objective"], rel=1e-5)


@interpreted
def test_babai_kernel_on_rows_chunked_by_the_memory_budget(monkeypatch):
    W, st = layer(10, 32, seed=4)
    a, _ = both("babai", {}, W, st)
    monkeypatch.setenv("OJBKQ_CUDA_MAX_BYTES", str(3 * 32 * 13 + 3 * 24 * 32))   # three rows a chunk
    _, b = both("babai", {}, W, st)
    assert torch.equal(a.codes, b.codes)


@interpreted
@pytest.mark.parametrize("grid", [None, GridSpec(group_size=16, grid="nvfp4", static_groups=True)])
def test_successive_kernel_carries_the_injection_like_the_reference(grid):
    W, st = layer(8, 32, seed=5)
    a, b = both("successive", {}, W, st, objective="regularized", grid=grid)
    assert torch.equal(a.codes, b.codes)
    assert b.loss == pytest.approx(a.loss, rel=1e-6)


@interpreted
@pytest.mark.parametrize("objective,grid", [("symmetric", GridSpec(bits=3, group_size=16)),
                                            ("jta", GridSpec(bits=3, group_size=16)),
                                            ("jta", GridSpec(group_size=16, grid="nvfp4", static_groups=True))])
def test_klein_kernel_draws_the_reference_numbers(objective, grid):
    """Same seed, same counter-based uniforms: the same candidates and the same choice per row."""
    W, st = layer(4, 32, seed=6)
    a, b = both("klein", {"k": 3, "window": 2}, W, st, objective=objective, grid=grid)
    assert torch.equal(a.codes, b.codes)
    assert a.report["candidate_histogram"] == b.report["candidate_histogram"]
    assert b.loss == pytest.approx(a.loss, rel=1e-6)


@interpreted
@pytest.mark.parametrize("grid", ["static-groups", "per-row"])
def test_klein_kernel_on_a_static_grid_draws_only_within_reach_and_picks_the_same_codes(grid):
    """With scales known beforehand each block weighs only the codes a draw can reach (`column_reach`):
    fewer draws, the reference's codes, and the walk's paths equal to those of the whole window."""
    from ojbkq_core.decoders.sampling import column_reach
    from ojbkq_cuda.walk import walk
    spec_grid = {"static-groups": GridSpec(bits=3, group_size=16, static_groups=True),
                 "per-row": GridSpec(bits=3, group_size=-1)}[grid]
    W, st = layer(5, 32, seed=12)
    a, b = both("klein", {"k": 3}, W, st, objective="jta", grid=spec_grid)
    assert torch.equal(a.codes, b.codes)
    assert a.report["candidate_histogram"] == b.report["candidate_histogram"]
    # the same walk with and without the bound, on the problem the decoder sees
    captured = {}

    class Spy(Klein):
        def decode(self, problem, seed=0, row0=0):
            captured["problem"] = problem
            return super().decode(problem, seed, row0)

    quantize_layer(W, st, preset("jta", *PRESETS["jta"]), spec_grid, Spy(k=3).use(DEVICE), seed=3)
    pr = captured["problem"]
    dec = Klein(k=3)
    beta = dec.beta(pr)
    reach = column_reach(pr, beta, 4)
    assert len(reach) == pr.n and max(reach) <= 4 and min(reach) < 4
    full = walk(pr, 3, beta=beta, window=4, seed=3)
    bounded = walk(pr, 3, beta=beta, window=4, seed=3, reach=reach)
    assert torch.equal(full.codes, bounded.codes) and torch.equal(full.score, bounded.score)


@interpreted
def test_klein_kernel_is_independent_of_row_chunks_and_never_worse_than_babai():
    W, st = layer(6, 32, seed=7)
    spec = preset("symmetric", *PRESETS["symmetric"])
    grid = GridSpec(bits=3, group_size=16)
    whole = quantize_layer(W, st, spec, grid, on_device(Klein, k=3, window=1), seed=11)
    parts = quantize_layer(W, st, spec, grid, on_device(Klein, k=3, window=1), seed=11, max_rows=4)
    assert torch.equal(whole.codes, parts.codes)
    babai = quantize_layer(W, st, spec, grid, on_device(Babai), seed=11)
    assert (whole.row_loss <= babai.row_loss * (1 + 1e-9) + 1e-12).all()


@interpreted
@pytest.mark.parametrize("grid", [GridSpec(bits=3, group_size=16), GridSpec(group_size=32, grid="mxfp4")])
def test_beam_kernel_keeps_the_reference_beams(grid):
    W, st = layer(6, 32, seed=8)
    a, b = both("beam", {"width": 3, "expand": 2}, W, st, grid=grid)
    assert torch.equal(a.codes, b.codes)
    assert a.report["candidate_histogram"] == b.report["candidate_histogram"]
    assert b.loss == pytest.approx(a.loss, rel=1e-6)


@interpreted
def test_beam_kernel_on_a_lattice_problem_chooses_by_the_path_objective():
    """float32 lattice form (no scoring objective, box not starting at 0): beam with the Babai path is
    never worse than babai, and equals the reference."""
    g = torch.Generator().manual_seed(9)
    A = torch.randn(10, 10, generator=g, dtype=torch.float64).numpy()
    y = torch.randn(10, 4, generator=g, dtype=torch.float64).numpy() * 4
    wp, _, _ = BILSProblem.create(y, -3, 2, A=A).working(dtype=torch.float32)
    a, b = Beam(width=4).decode(wp), on_device(Beam, width=4).decode(wp)
    assert torch.equal(a.codes, b.codes)
    bab = on_device(Babai).decode(wp)
    assert torch.equal(bab.codes, Babai().decode(wp).codes)
    assert (b.objective <= bab.objective + 1e-5).all()
    assert ((b.codes >= -3) & (b.codes <= 2)).all()


# --- compiled kernels on a GPU -------------------------------------------------------------------

@cuda
def test_on_the_gpu_every_device_decoder_matches_the_reference():
    W, st = layer(256, 512, N=2048, seed=10, device="cuda")
    a, b = both("babai", {}, W, st, grid=GridSpec(bits=4, group_size=128))
    assert (a.codes != b.codes).float().mean().item() < 1e-3
    assert b.loss == pytest.approx(a.loss, rel=1e-4)
    a, b = both("successive", {}, W, st, objective="regularized", grid=GridSpec(bits=4, group_size=128))
    assert (a.codes != b.codes).float().mean().item() < 1e-3
    for name, params in [("klein", {"k": 8}), ("beam", {"width": 4})]:
        a, b = both(name, params, W, st, grid=GridSpec(bits=3, group_size=128))
        assert (a.codes != b.codes).float().mean().item() < 0.05
        assert b.loss == pytest.approx(a.loss, rel=5e-3)
    spec = preset("symmetric", *PRESETS["symmetric"])
    runs = [quantize_layer(W, st, spec, GridSpec(bits=3, group_size=128), on_device(Klein, k=8), seed=2) for _ in range(2)]
    assert torch.equal(runs[0].codes, runs[1].codes)


# --- the trailing products -----------------------------------------------------------------------

def test_tf32_split_is_exact_and_its_high_part_has_tf32_precision():
    from ojbkq_cuda.trailing import tf32_split
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-6, 6, 96)
    hi, lo = tf32_split(x)
    assert torch.equal(hi + lo, x)                                     # the split loses nothing
    assert not (hi.view(torch.int32) & 0x1FFF).any()                   # 10 mantissa bits: TF32 holds hi exactly
    assert (lo.abs() <= hi.abs() * 2.0 ** -11).all()                   # rounded to nearest


@pytest.mark.parametrize("how", ["fp32", "tf32x3"])
def test_trailing_update_matches_the_float64_product(how):
    """Both ways subtract `Err @ U[block, rest]` to float32 accuracy (off the GPU tf32x3 is the same three
    products in float32)."""
    from ojbkq_cuda.trailing import Trailing
    g = torch.Generator().manual_seed(1)
    U = torch.randn(40, 40, generator=g).triu()
    Err, T = torch.randn(24, 8, generator=g), torch.randn(24, 40, generator=g)
    want = T[:, 16:].double() - Err.double() @ U[8:16, 16:].double()
    Trailing(U, how).update(T[:, 16:], Err, 8, 16)
    assert torch.allclose(T[:, 16:].double(), want, rtol=0, atol=1e-5)


def test_an_unknown_trailing_mode_is_refused(monkeypatch):
    from ojbkq_cuda.trailing import mode
    monkeypatch.setenv("OJBKQ_CUDA_PRODUCTS", "bf16")
    with pytest.raises(ValueError, match="OJBKQ_CUDA_PRODUCTS='bf16'"):
        mode()


@interpreted
def test_klein_kernel_with_split_trailing_products_keeps_the_reference_codes(monkeypatch):
    monkeypatch.setenv("OJBKQ_CUDA_PRODUCTS", "tf32x3")
    W, st = layer(6, 48, seed=13)
    a, b = both("klein", {"k": 3}, W, st, objective="jta", grid=GridSpec(bits=3, group_size=16))
    assert torch.equal(a.codes, b.codes)
    assert b.loss == pytest.approx(a.loss, rel=1e-6)


@cuda
def test_on_the_gpu_split_trailing_products_stay_within_the_float32_tolerance(monkeypatch):
    W, st = layer(256, 512, N=2048, seed=10, device="cuda")
    monkeypatch.setenv("OJBKQ_CUDA_PRODUCTS", "tf32x3")
    a, b = both("babai", {}, W, st, grid=GridSpec(bits=4, group_size=128))
    assert (a.codes != b.codes).float().mean().item() < 1e-3
    assert b.loss == pytest.approx(a.loss, rel=1e-4)
    for name, params in [("klein", {"k": 8}), ("beam", {"width": 4})]:      # the float32 test's bounds
        a, b = both(name, params, W, st, grid=GridSpec(bits=3, group_size=128))
        assert (a.codes != b.codes).float().mean().item() < 0.05
        assert b.loss == pytest.approx(a.loss, rel=5e-3)


# --- the kernels through Triton's compiler (no GPU needed) ---------------------------------------------------

COMPILE = """
import sys
sys.path.insert(0, {plugin!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ojbkq_cuda import kernels as k

def compile_(fn, pointers, constexprs):
    sig = {{n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}}
    src = ASTSource(fn, sig, {{(fn.arg_names.index(c),): v for c, v in constexprs.items()}})
    return len(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"])

table = ({{"values_ptr": None, "K": 0, "TIE": 0}}, {{}}) if {alphabet!r} == "integers" else \\
    ({{"K": 15, "TIE": 1}}, {{"values_ptr": "*fp32"}})
f32 = {{n: "*fp32" for n in ("T_ptr", "U_ptr", "lo_ptr", "hi_ptr", "S_ptr", "Z_ptr", "G_ptr", "beta_ptr",
                            "noise_ptr", "err_ptr", "score_ptr")}}
walk = compile_(k.walk_block_kernel, {{**f32, "codes_ptr": "*u8", **table[1]}},
                {{"bs": 32, "BLOCK_M": 16, "BS": 32, "HAS_INJECT": True, "SAMPLE": True, "WINDOW": 2, "EXACT": True,
                  **table[0]}})
beam = compile_(k.beam_block_kernel, {{**f32, "codes_ptr": "*u8", "anc_ptr": "*i32", **table[1]}},
                {{"bs": 16, "B": 4, "BP": 4, "E": 2, "EP": 8, "EP2": 2, "ROWS": 4, "BS": 16, "DYNAMIC": False,
                  "EXACT": True, **table[0]}})
print("cubin bytes", walk, beam)
"""


@pytest.mark.skipif(not runtime.triton_available(), reason="needs Triton")
@pytest.mark.parametrize("alphabet", ["integers", "e2m1"])
def test_the_kernels_compile_for_the_gpu_on_both_grids(alphabet):
    """The walk (klein's sampling and successive rounding's injection on) and the beam compile for an H100
    (sm_90) with Triton's own compiler and ptxas, no GPU needed, on the integer grid and with an alphabet table.
    The interpreter runs the helpers as Python, so a form Triton cannot compile (a return inside a compile-time
    branch, say) shows only here. A process of its own: the interpreter is on in this one."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = COMPILE.format(plugin=str(PLUGIN), alphabet=alphabet)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    walk, beam = map(int, r.stdout.split()[-2:])
    assert walk > 1000 and beam > 1000


# --- a stack of problems (experts decoded together) ---------------------------------------------------------

@pytest.mark.parametrize("name,params,objective,grid", [
    ("babai", {}, "symmetric", GridSpec(bits=4, group_size=16)),
    ("klein", {"k": 3}, "jta", GridSpec(bits=3, group_size=16)),
    ("klein", {"k": 3}, "symmetric", GridSpec(bits=3, group_size=16, static_groups=True)),
    ("successive", {}, "regularized", GridSpec(bits=3, group_size=16)),
])
@pytest.mark.parametrize("products", ["fp32", "tf32x3"])
def test_a_stack_through_the_kernels_gives_each_expert_the_codes_of_its_own_call(monkeypatch, name, params, objective,
                                                                                grid, products):
    """One kernel launch per block for all experts, each program reading its expert's `U`, one batched trailing
    product: every expert gets the codes its own call through the kernels gives, and the reference's."""
    import numpy as np
    from ojbkq_core.layer import quantize_stack
    monkeypatch.setenv("OJBKQ_CUDA_PRODUCTS", products)
    layers = [layer(12, 48, seed=20 + e) for e in range(3)]
    spec = preset(objective, *PRESETS[objective])
    objs = [spec.build(np.random.default_rng([5, e]))[0] for e in range(3)]
    seeds = [7, 8, 9]
    cls = PAIRS[name]
    stacked = quantize_stack([W for W, _ in layers], [st for _, st in layers], objs, grid, on_device(cls, **params),
                             seeds=seeds)
    reference = quantize_stack([W for W, _ in layers], [st for _, st in layers], objs, grid, cls(**params), seeds=seeds)
    for e, ((W, st), res) in enumerate(zip(layers, stacked)):
        own = quantize_layer(W, st, objs[e], grid, on_device(cls, **params), seed=seeds[e])
        assert res.report["stacked"] == 3 and res.report["backend"] == "ojbkq-cuda"
        assert torch.equal(res.codes, own.codes), e
        assert torch.equal(res.codes, reference[e].codes), e
        assert res.loss == pytest.approx(own.loss, rel=1e-6)

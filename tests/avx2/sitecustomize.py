"""An AVX2-only CPU, emulated on an AVX-512 host for the processes that import torch (`make ... EMULATE=avx2`).

With `OJBKQ_EMULATE_AVX2=1` and this folder on PYTHONPATH, every Python process (vLLM's engine processes
too) sees torch report no AVX-512, no AVX512_BF16 and no AMX, so that vLLM loads the library it loads on
such a CPU (`vllm._C_AVX2`) and ojbkq picks the dtype it picks there. The Makefile sets, beside it,
`ATEN_CPU_CAPABILITY=avx2` and `ONEDNN_MAX_CPU_ISA=AVX2` (torch's own kernels at AVX2: bfloat16 matrix
products then run in emulation, as on such a CPU) and `NUMBA_CPU_NAME=haswell` (the numba kernels built
for AVX2).
"""
import os

if os.environ.get("OJBKQ_EMULATE_AVX2") == "1":
    try:
        import torch.cpu
    except ImportError:                                 # an environment without torch: nothing to emulate
        pass
    else:
        for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
                      "_is_amx_tile_supported", "_is_amx_fp16_supported"):
            if hasattr(torch.cpu, _name):
                setattr(torch.cpu, _name, lambda: False)

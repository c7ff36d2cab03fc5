"""The dtype a model runs in, chosen for the device: `model.dtype: device` and `ojbkq compare --dtype device`.

    device  →  bfloat16 on a GPU that computes it (compute capability 8.0 and later), and on a CPU that
               computes it natively (AVX512_BF16 or AMX); float32 on any other CPU (AVX2 only, or AVX-512
               without bfloat16) or GPU

A CPU without native bfloat16 runs bfloat16 matrix products in emulation, tens of times slower than
float32 (`bench/results/cpu_dtype.json`). `cpu_capability()` is what torch reports of the CPU, and so
honours `ATEN_CPU_CAPABILITY` (e.g. `avx2`, which makes an AVX-512 host run torch's AVX2 kernels):

    {"capability": "AVX2", "avx512_bf16": False, "amx": False, "bf16_native": False}

`bf16_native` needs torch's kernels at AVX-512 and the CPU's bfloat16 instructions.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

DEVICE = "device"                 # the spelling of "chosen for the device"
log = logging.getLogger("ojbkq")


@functools.lru_cache(maxsize=None)
def cpu_capability() -> dict:
    """What torch reports of this CPU: its kernels' instruction set (`capability`: AVX2, AVX512, ...),
    whether the CPU has AVX512_BF16 and AMX tiles, and `bf16_native` (both kernels and instructions)."""
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    native = capability.startswith("AVX512") and (bf16 or amx)
    return {"capability": capability, "avx512_bf16": bf16, "amx": amx, "bf16_native": native}


def resolve_dtype(dtype: str, device: str) -> str:
    """`dtype` as the run uses it on `device` (cpu, cuda, cuda:N): `device` becomes bfloat16 or float32
    (module docstring); any other name (bfloat16, float16, float32, auto: the checkpoint's) is kept."""
    if dtype != DEVICE:
        return dtype
    if str(device).startswith("cuda"):
        return "bfloat16" if cuda_bf16(str(device)) else "float32"
    return "bfloat16" if cpu_capability()["bf16_native"] else "float32"


def cuda_bf16(device: str) -> bool:
    """Whether the CUDA device computes bfloat16 (compute capability 8.0 and later)."""
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def device_record(device: str) -> dict:
    """What a run report or a compare record says of the device it ran on: `{"cpu": cpu_capability()}` on
    a CPU, `{}` on a GPU."""
    return {} if str(device).startswith("cuda") else {"cpu": dict(cpu_capability())}


def dtype_line(dtype: str, device: str) -> str:
    """The dtype and, on a CPU, what decided it, for a log line: `dtype float32 (CPU: AVX2, bfloat16 not
    native)`."""
    if str(device).startswith("cuda"):
        return f"dtype {dtype}"
    caps = cpu_capability()
    return f"dtype {dtype} (CPU: {caps['capability']}, bfloat16 {'native' if caps['bf16_native'] else 'not native'})"


@functools.lru_cache(maxsize=None)
def emulated_slowdown(size: int = 256) -> float:
    """How many times slower a bfloat16 matrix product `(size, size) @ (size, size)` is than a float32 one
    on this CPU, one thread, best of three each (about 0.1 s where bfloat16 is emulated)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(size, size).to(dt), torch.randn(size, size).to(dt)
            a @ b
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            best[dt] = min(times)
        return best[torch.bfloat16] / max(best[torch.float32], 1e-9)
    finally:
        torch.set_num_threads(threads)


_warned = []


def warn_if_emulated(dtype: str, device: str, key: str = "model.dtype") -> None:
    """One warning line (once per process) when `dtype` is bfloat16 on a CPU without native
    bfloat16: it runs, in emulation, at the slowdown measured here."""
    if str(device).startswith("cuda") or dtype != "bfloat16" or cpu_capability()["bf16_native"]:
        return
    if _warned:
        return
    _warned.append(key)
    caps = cpu_capability()
    log.warning("warning: %s=%s on a CPU without native bfloat16 (torch capability %s, avx512_bf16 %s, amx %s): "
                "its matrix products run in emulation, measured %.0fx slower than float32 here; "
                "%s=device (or float32) runs float32", key, dtype, caps["capability"],
                str(caps["avx512_bf16"]).lower(), str(caps["amx"]).lower(), emulated_slowdown(), key)


__all__ = ["DEVICE", "cpu_capability", "device_record", "dtype_line", "emulated_slowdown", "resolve_dtype", "warn_if_emulated"]

"""Where the kernels run: lazy Triton import, launch shapes, the memory budget for row chunks.

Triton is imported on first use, so `ojbkq plugins` and the reference path work without it. With
`TRITON_INTERPRET=1` set before the first use, the kernels run in Triton's interpreter on CPU tensors
(slow; used by the tests on machines without a GPU).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def kernels():
    from . import kernels as k
    return k


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreted() -> bool:
    if not triton_available():
        return False
    import triton
    return bool(triton.knobs.runtime.interpret)


def exact() -> bool:
    """Compiled kernels round each product on its own (libdevice `mul_rn`); the interpreter's numpy
    arithmetic does that already."""
    return not interpreted()


def usable(t: torch.Tensor) -> bool:
    """True when the kernels can run on tensors like `t`: float32 on a CUDA device with Triton, or any
    float32 CPU tensor under the interpreter."""
    if t.dtype != torch.float32 or not triton_available():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreted())


def block_rows(R: int, BS: int, sample: bool = False) -> int:
    """Rows per program: enough programs to fill the device; at most 8 rows of a 128-column block (4 when
    sampling), where the compiled kernel stays within the registers (ptxas: 122 and 168 registers a
    thread, no spills)."""
    forced = os.environ.get("OJBKQ_CUDA_BLOCK_M")
    if forced:
        return int(forced)
    if interpreted():                       # one program per 64 rows: the interpreter pays per program
        return min(64, 1 << max(1, (R - 1).bit_length()))
    bm = 4 if sample else 8
    while bm > 2 and -(-R // bm) < 512:
        bm //= 2
    return bm


def warps(block_m: int, BS: int) -> int:
    return 4 if block_m * BS >= 1024 else 2


def memory_budget(device: torch.device, fraction: float = 0.5, cap: int = 4 << 30) -> Optional[int]:
    """Bytes a decoder may hold for its paths: `fraction` of the device's free memory, at most `cap`
    (chunks of a few thousand rows already fill the device; more memory only saves launches) (CUDA),
    or None."""
    env = os.environ.get("OJBKQ_CUDA_MAX_BYTES")
    if env:
        return int(float(env))
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return min(int(free * fraction), cap)


@contextlib.contextmanager
def tf32(allowed: bool):
    """torch's float32 matrix products with TF32 `allowed` or not inside the block, as before after it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def alphabet_args(alphabet, device) -> dict:
    """The kernels' keyword arguments for a grid's alphabet (`ojbkq_core.grid.Alphabet`): none on the integers
    (the kernels' defaults), else its values `(K,)` float32 on `device`, `K` and the tie parity."""
    if alphabet.uniform:
        return {}
    return {"values_ptr": torch.tensor(alphabet.values, dtype=torch.float32, device=device), "K": alphabet.size,
            "TIE": alphabet.tie_parity}

"""Registers the device decoders through the `register_backends` hook (entry point `cuda` in the group
`ojbkq`). Priority 10 > 0: under `backend: auto` they replace the reference implementations for CUDA
tensors; `backend: reference` still selects the reference."""
from ojbkq_core.hookspecs import hookimpl

PRIORITY = 10


@hookimpl
def register_backends(register):
    from .decoders import DEVICE_DECODERS
    for cls in DEVICE_DECODERS:
        register(cls.name, "cuda", cls, PRIORITY)

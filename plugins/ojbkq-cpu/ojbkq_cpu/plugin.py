"""Registers the CPU decoders through the `register_backends` hook (entry point `cpu` in the group `ojbkq`).
Priority 10 > 0: under `backend: auto` they replace the reference implementations for float32 CPU
tensors; `backend: reference` still selects the reference."""
from ojbkq_core.hookspecs import hookimpl

PRIORITY = 10


@hookimpl
def register_backends(register):
    from .decoders import CPU_DECODERS
    for cls in CPU_DECODERS:
        register(cls.name, "cpu", cls, PRIORITY)

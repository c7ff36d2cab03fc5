"""Registers the transformers adapters through the `ojbkq` hooks."""
from ojbkq_core.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from .architectures import ADAPTERS
    for cls in ADAPTERS:
        register(cls)

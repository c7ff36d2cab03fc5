"""Registers the transformers adapters through the `ojbkq` hooks."""
from ojbkq_core.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    pass

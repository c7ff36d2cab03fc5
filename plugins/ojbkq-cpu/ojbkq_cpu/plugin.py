"""Registers the CPU primitives through the `register_primitives` hook (entry point `cpu` in the group
`ojbkq`). Priority 10 > 0: under `backend: auto` every decoder built for the CPU calls them for float32
problems; `backend: reference` still selects the reference."""
from ojbkq_core.hookspecs import hookimpl

PRIORITY = 10


@hookimpl
def register_primitives(register):
    from .primitives import beam_paths, usable, walk_paths
    register("walk", "cpu", walk_paths, PRIORITY, usable)
    register("beam", "cpu", beam_paths, PRIORITY, usable)

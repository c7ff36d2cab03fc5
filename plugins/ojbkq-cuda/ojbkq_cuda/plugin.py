"""Registers the device primitives through the `register_primitives` hook (entry point `cuda` in the group
`ojbkq`). Priority 10 > 0: under `backend: auto` every decoder built for a CUDA device calls them for
float32 problems; `backend: reference` still selects the reference."""
from ojbkq_core.hookspecs import hookimpl

PRIORITY = 10


@hookimpl
def register_primitives(register):
    from .primitives import beam_paths, rows, usable, walk_paths
    register("walk", "cuda", walk_paths, PRIORITY, usable)
    register("beam", "cuda", beam_paths, PRIORITY, usable)
    register("rows", "cuda", rows, PRIORITY, usable)

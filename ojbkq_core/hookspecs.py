"""Hook specifications: the whole plugin contract.

A plugin is a module (or object) with functions marked `@hookimpl`, advertised by an entry point in
the group `ojbkq`. Each hook receives a `register` callable; call it once per thing provided. The
built-in decoders, objectives, adapters, checkpoint formats and recipes are registered through these same hooks.
"""
import pluggy

hookspec = pluggy.HookspecMarker("ojbkq")
hookimpl = pluggy.HookimplMarker("ojbkq")


@hookspec
def register_decoders(register):
    """`register(cls)` for each `Decoder` subclass; `cls.name` is the name users give."""


@hookspec
def register_objectives(register):
    """`register(name, factory, schema)`: `factory(**params) -> Objective`; `schema` maps each
    parameter name to `(default, validate)` (validate returns the checked value or raises InputError)."""


@hookspec
def register_adapters(register):
    """`register(cls)` for each `Model` adapter class; `cls.name` names it."""


@hookspec
def register_backends(register):
    """`register(decoder, device, cls, priority)`: an implementation of the named decoder for a
    device type (`"cuda"`, `"cpu"`); the highest priority available for the problem's device wins
    under `backend: auto`. Reference implementations have priority 0."""


@hookspec
def register_primitives(register):
    """`register(name, device, fn, priority, accepts)`: an implementation of the decoders' primitive `name`
    (`walk`, `beam` or `rows`, ojbkq_core.decoders.primitives) for a device type, called for a problem when
    `accepts(problem)` holds. Every decoder built for that device under `backend: auto` (or under the
    plugin's name) calls it, the built-in ones and any plugin's decoder that calls `self.primitives`."""


@hookspec
def register_formats(register):
    """`register(cls)` for each checkpoint `Format` subclass (ojbkq_core.export.base); `cls.name` is
    the `output.format` users give, and `load_quantized` asks each format's `detect`."""


@hookspec
def register_recipes(register):
    """`register(name, path)` for each recipe file a plugin ships (YAML, TOML or JSON): `ojbkq quantize
    NAME` and `quantize(..., recipe=NAME)` find it by name, and `ojbkq recipes` lists it."""

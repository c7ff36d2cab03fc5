"""The built-in plugin: registers the reference decoders, the objective presets, the checkpoint
formats and the recipes through the same hooks a third-party plugin uses (entry point `builtin` in the group `ojbkq`)."""
from .decoders import BUILTIN
from .export.compressed_tensors import CompressedTensors
from .export.fake import Fake
from .export.gptq import GPTQ
from .hookspecs import hookimpl
from .objectives import PRESETS
from .recipes import builtin_paths


@hookimpl
def register_decoders(register):
    for cls in BUILTIN:
        register(cls)


@hookimpl
def register_objectives(register):
    for name, (factory, schema) in PRESETS.items():
        register(name, factory, schema)


@hookimpl
def register_formats(register):
    for cls in (GPTQ, Fake, CompressedTensors):
        register(cls)


@hookimpl
def register_recipes(register):
    for name, path in builtin_paths().items():
        register(name, path)

"""The built-in recipes: one file each in this folder, registered by the built-in plugin through the
`register_recipes` hook, like a plugin's own recipes (`spec.recipe_path` finds them by name)."""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
# the built-in recipes, in the order tables list them
BUILTIN = ("gptq", "gptaq", "regularized-successive", "regularized-beam", "ojbkq")


def builtin_paths() -> dict[str, str]:
    """Name → file of every recipe shipped with the package."""
    return {name: os.path.join(HERE, f"{name}.yaml") for name in BUILTIN}

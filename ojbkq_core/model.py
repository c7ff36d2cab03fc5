"""The model adapter interface: what the calibration engine needs to know about a network.

An adapter wraps a loaded model and names its repeated blocks, the linear modules inside each block
and the order in which they are quantized ("true-sequential" groups: the modules of a group read the
same inputs, and a later group sees the earlier groups already quantized). Embeddings, norms and the
output head are not listed, so they stay in full precision.

Adapters are registered through the `register_adapters` hook (`cls.name`); with `adapter: auto` the
first registered class whose `matches(model)` is true is used (`find_adapter`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import InputError


class Model(ABC):
    """A model seen as `embed → blocks[0] → … → blocks[L−1] → head`.

    Subclasses set `name` and implement `matches`, `blocks` and `groups`; `causal` says whether the
    model predicts the next token (perplexity applies) or is an encoder.
    """

    name: ClassVar[str] = ""
    causal: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when `model` has the module structure this adapter understands."""

    @abstractmethod
    def blocks_path(self) -> str:
        """Dotted name of the block list inside `self.model`, e.g. `model.layers`."""

    @abstractmethod
    def groups(self, block: nn.Module) -> list[list[str]]:
        """The block's quantized modules as true-sequential groups of names relative to the block."""

    # -- shared helpers --------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path())

    def modules(self, block: nn.Module) -> list[str]:
        """Every quantized module of `block`, in quantization order."""
        return [name for group in self.groups(block) for name in group]

    def layer_names(self) -> list[str]:
        """Full dotted names of every quantized module of the model, in quantization order."""
        path = self.blocks_path()
        return [f"{path}.{i}.{name}" for i, block in enumerate(self.blocks()) for name in self.modules(block)]

    def call_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `model(input_ids, attention_mask, ...)` during calibration."""
        return {"use_cache": False} if self.causal else {}

    def transposed(self, module: nn.Module) -> bool:
        """True when `module.weight` is stored `(in, out)` rather than `nn.Linear`'s `(out, in)`."""
        return False

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as `(m, n)` = `(out, in)`, a view of the parameter (no copy)."""
        W = module.weight
        return W.t() if self.transposed(module) else W

    def set_weight(self, module: nn.Module, Q: torch.Tensor) -> None:
        """Write `Q` `(out, in)` into the module in its own dtype, device and layout."""
        W = module.weight
        Q = Q.t() if self.transposed(module) else Q
        if Q.shape != W.shape:
            raise InputError(f"quantized weight {tuple(Q.shape)} does not fit module weight {tuple(W.shape)}")
        with torch.no_grad():
            W.copy_(Q.to(device=W.device, dtype=W.dtype))

    def __repr__(self):
        return f"{type(self).__name__}({type(self.model).__name__}, {len(self.blocks())} blocks)"


def has_modules(root: nn.Module, names) -> bool:
    """True when every dotted name in `names` is a submodule of `root` holding a 2-D `weight`."""
    for name in names:
        try:
            m = root.get_submodule(name)
        except AttributeError:
            return False
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            return False
    return True


def find_adapter(model: nn.Module, name: str = "auto", registry=None) -> Model:
    """The adapter `name` for `model`, or with `"auto"` the first registered one that matches."""
    if registry is None:
        from .registry import get_registry
        registry = get_registry()
    if name != "auto":
        cls = registry.adapter(name)
        if not cls.matches(model):
            raise InputError(f"model.adapter={name!r} does not fit {type(model).__name__}: the modules it "
                             f"expects are missing; use model.adapter=auto")
        return cls(model)
    for entry in registry.adapters.values():
        if entry.obj.matches(model):
            return entry.obj(model)
    known = ", ".join(sorted(registry.adapters)) or "none registered"
    raise InputError(f"no model adapter recognises {type(model).__name__} (adapters: {known}); "
                     f"install a plugin that registers one or name it with model.adapter")

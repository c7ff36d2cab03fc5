"""Outputs a block's later passes take instead of recomputing them.

Within one block the runtime stream runs one pass per true-sequential group (up to the group's modules)
and one to propagate, always on the same inputs `X[b]`. Once a submodule and every module run before it
are final, it gives the same output in every later pass. For a Llama block: q, k and v are final for the
o projection's pass, `self_attn` after the o projection is quantized, gate and up for the propagation;
without reuse the passes ran them again.

`Reuse` keeps such outputs per batch, for the block's quantized modules and the submodules that hold
them. In a pass, such a module that ends before any module still to be quantized (`pending`) has run is
kept as a copy (only its first call in the pass, within a byte budget; keeping a module drops what was
kept inside it); a later pass of the same block and batch gets a copy of the kept output in place of
the module's first call. The later passes compute bit for bit what running the module again would give.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterable, Optional

import torch
from torch import nn

_MISSING = object()


def nbytes(out: Any) -> Optional[int]:
    """Bytes of the tensors in a module output (a tensor, None, or tuples/lists of them); None for any
    other kind of output, which is not kept."""
    if out is None:
        return 0
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        sizes = [nbytes(x) for x in out]
        return None if any(s is None for s in sizes) else sum(sizes)
    return None


def copy_of(out: Any) -> Any:
    """A copy of a module output's tensors (a block may change a module's output in place)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(copy_of(x) for x in out)
    return out


class Reuse:
    """Kept outputs of `modules` (block-relative names of `block`'s quantized modules) and of the
    submodules holding them, per batch, at most `budget` bytes in all."""

    def __init__(self, block: nn.Module, modules: Iterable[str], budget: int):
        parts = {".".join(m.split(".")[:k]) for m in modules for k in range(1, m.count(".") + 2)}
        self.candidates = sorted(parts)                   # outer before inner
        self.kept: dict[int, dict[str, Any]] = {}
        self.bytes, self.budget = 0, budget
        self.reused = 0                                   # module calls answered from `kept`

    @contextlib.contextmanager
    def around(self, block: nn.Module, b: int, pending: Iterable[str]):
        """Run one pass of `block` on batch `b` inside this context: kept outputs stand in for their
        modules' first calls, and the candidate modules that end before any of `pending` runs are kept."""
        kept = self.kept.setdefault(b, {})
        state = {"dirty": False}
        calls: Counter = Counter()
        handles, replaced = [], []

        def dirty(module, args):
            state["dirty"] = True

        def keep(name):
            def hook(module, args, out):
                calls[name] += 1
                if state["dirty"] or calls[name] > 1 or name in kept:
                    return
                size = nbytes(out)
                if size is not None and self.bytes + size <= self.budget:
                    for inner in [k for k in kept if k.startswith(name + ".")]:
                        self.bytes -= nbytes(kept.pop(inner))
                    kept[name] = copy_of(out)                 # the block may change `out` in place
                    self.bytes += size
            return hook

        def stand_in(name, child):
            def forward(*args, **kwargs):
                calls[name] += 1
                if calls[name] == 1:
                    self.reused += 1
                    return copy_of(kept[name])
                own = replaced_forward[name]                      # a second call computes
                return own(*args, **kwargs) if own is not _MISSING else type(child).forward(child, *args, **kwargs)
            return forward

        replaced_forward: dict[str, Any] = {}
        try:
            for name in pending:
                handles.append(block.get_submodule(name).register_forward_pre_hook(dirty))
            for name in self.candidates:
                child = block.get_submodule(name)
                if name in kept:
                    replaced_forward[name] = child.__dict__.get("forward", _MISSING)
                    child.forward = stand_in(name, child)
                    replaced.append((name, child))
                else:
                    handles.append(child.register_forward_hook(keep(name)))
            yield
        finally:
            for h in handles:
                h.remove()
            for name, child in replaced:
                own = replaced_forward[name]
                if own is _MISSING:
                    del child.forward
                else:
                    child.forward = own

"""Running one block of a model on kept inputs: the first block's inputs captured from the model's own
forward (`capture_block_inputs`), a block run on them (`run_block`), and the inputs of its submodules seen
on the way (`module_inputs`). The calibration engine (calibrate.py) and the evaluation streams
(evaluation.py) both move rows through the blocks this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .model import Model


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every input it wanted was seen."""


@dataclass
class BlockInputs:
    """One calibration batch at the input of a block: `hidden` `(b, L, d)` where the streams live
    (`capture` moves it into its `Streams` and leaves `None`), plus the other positional and keyword
    arguments the model passed to its first block (attention mask, position ids, position embeddings,
    …), on the calibration device, shared by every block and both streams."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def to_device(obj: Any, device) -> Any:
    """Tensors inside (nested tuples, lists, dicts) moved to `device`; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def to_home(x: torch.Tensor, home) -> torch.Tensor:
    """`x` where a stream lives: a device, or `"pinned"` (page-locked host memory, copied asynchronously)."""
    if home == "pinned":
        return x.cpu().pin_memory()
    return x.to(home)


def _first_tensor(out) -> torch.Tensor:
    """A block's output hidden states (blocks return a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(adapter: Model, input_ids: torch.Tensor, batch_size: int, home="cpu",
                         device="cpu") -> list[BlockInputs]:
    """Run the model on `input_ids` `(S, L)` in batches up to its first block and keep that block's
    inputs: the hidden states on `home` (a device, or `"pinned"` host memory), the other arguments on
    `device`. The model's front (embeddings, rotary tables) runs where the model is."""
    block0 = adapter.blocks()[0]
    seen: list = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    model = adapter.model
    dev = model_device(model)
    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(dev)
            seen.clear()
            try:
                model(input_ids=ids, **adapter.call_kwargs())
            except _Stop:
                pass
            if not seen:
                raise RuntimeError(f"{type(model).__name__}'s forward never reached {adapter.blocks_path()}.0")
            args, kwargs = seen[0]
            kwargs = dict(kwargs)
            if args:
                hidden, args = args[0], tuple(args[1:])
            else:
                hidden = kwargs.pop("hidden_states")
            for k in ("past_key_values", "past_key_value", "layer_past"):
                if k in kwargs:
                    kwargs[k] = None
            out.append(BlockInputs(to_home(hidden.detach(), home), to_device(args, device), to_device(kwargs, device)))
    finally:
        handle.remove()
    return out


class Inputs(dict):
    """Module name → its input in one forward (`module_inputs`), and `tokens`: module name → the token
    positions `(N,)` of its input's rows, for a module called on routed tokens only (an expert)."""

    def __init__(self):
        super().__init__()
        self.tokens: dict[str, torch.Tensor] = {}


def run_block(block: nn.Module, hidden: torch.Tensor, b: BlockInputs, device, whole: bool = False):
    """`block` on `hidden` `(b, L, d)` with the batch's other arguments, on `device`: its output hidden states
    (with `whole`, its output as it returns it: a tensor or a tuple starting with it)."""
    out = block(hidden.to(device, non_blocking=True), *to_device(b.args, device), **to_device(b.kwargs, device))
    return out if whole else _first_tensor(out)


def module_inputs(block: nn.Module, names: Sequence[str], hidden: torch.Tensor, b: BlockInputs, device,
                  finish: bool = False):
    """The input of each named submodule of `block` when it runs on `hidden`; the forward stops as
    soon as all of them were seen, unless `finish`: then it runs to the end and `(inputs, output)` is
    returned. Modules called with the same tensor get the same object; a module the forward never
    calls (an expert no token is routed to) is absent. A module called with `tokens=` (a routed
    expert's `RoutedLinear`) has its rows' token positions in `got.tokens`. Only a module's first call
    in the forward counts."""
    want = set(names)
    got = Inputs()
    same: dict[int, tuple] = {}                   # id of an input tensor → (it, its detached view)
    handles = []

    def make(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values())))
            if name not in got:
                got[name] = same.setdefault(id(x), (x, x.detach()))[1]
                if kwargs.get("tokens") is not None:
                    got.tokens[name] = kwargs["tokens"]
            if not finish and want <= got.keys():
                raise _Stop
        return hook

    for name in names:
        handles.append(block.get_submodule(name).register_forward_pre_hook(make(name), with_kwargs=True))
    out = None
    try:
        out = run_block(block, hidden, b, device)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return (got, out) if finish else got

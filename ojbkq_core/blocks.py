"""Running one block of a model on kept inputs: the first block's inputs captured from the model's own
forward (`capture_block_inputs`), a block run on them (`run_block`), and the inputs of its submodules seen
on the way (`module_inputs`). The calibration engine (calibrate.py) and the evaluation streams
(evaluation.py) both move rows through the blocks this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .model import Model


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every input it wanted was seen."""


@dataclass
class BlockInputs:
    """One calibration batch at the input of a block: `hidden` `(b, L, d)` where the streams live
    (`capture` moves it into its `Streams` and leaves `None`), plus the other positional and keyword
    arguments the model passes to the block (attention mask, position ids, position embeddings, …), on the
    calibration device, shared by both streams. `per_block[i]` holds block `i`'s `(args, kwargs)`: models
    whose blocks differ in kind (Gemma 3's sliding-window and global layers, with their own masks and rotary
    tables) give each its own; `select(i)` makes `args`, `kwargs` block `i`'s."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    per_block: Optional[list] = None

    def select(self, i: int) -> None:
        if self.per_block is not None:
            self.args, self.kwargs = self.per_block[i]


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


class _Recorder(nn.Module):
    """Stands in for block `index` while the inputs are captured: keeps the arguments the model calls it
    with and returns its hidden states unchanged (the last one ends the forward)."""

    def __init__(self, index: int, seen: list, last: bool):
        super().__init__()
        self.index, self.seen, self.last = index, seen, last

    def forward(self, *args, **kwargs):
        self.seen.append((args, kwargs))
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


def _moved(obj: Any, device, memo: dict) -> Any:
    """`to_device` that moves each distinct tensor once (blocks of one kind share their masks and tables)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_moved(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_moved(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _moved(v, device, memo) for k, v in obj.items()}
    return obj


def _call(args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """`(hidden, other args, kwargs)` of one block call, without a cache to write into."""
    kwargs = dict(kwargs)
    if args:
        hidden, args = args[0], tuple(args[1:])
    else:
        hidden = kwargs.pop("hidden_states")
    for k in ("past_key_values", "past_key_value", "layer_past"):
        if k in kwargs:
            kwargs[k] = None
    return hidden, args, kwargs


@torch.no_grad()
def capture_block_inputs(adapter: Model, input_ids: torch.Tensor, batch_size: int, home="cpu",
                         device="cpu") -> list[BlockInputs]:
    """Run the model on `input_ids` `(S, L)` in batches with every block replaced by a `_Recorder`, and keep
    the first block's hidden states (on `home`: a device, or `"pinned"` host memory) and every block's other
    arguments (on `device`; `BlockInputs.per_block` where they differ between blocks). The model's front
    (embeddings, rotary tables, masks) runs where the model is; no block computes."""
    blocks = adapter.blocks()
    kept = list(blocks)
    model = adapter.model
    dev = model_device(model)
    seen: list = []
    out = []
    try:
        for j in range(len(blocks)):
            blocks[j] = _Recorder(j, seen, last=j == len(blocks) - 1)
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(dev)
            seen.clear()
            try:
                model(input_ids=ids, **adapter.call_kwargs())
            except _Stop:
                pass
            if len(seen) != len(blocks):
                raise RuntimeError(f"{type(model).__name__}'s forward called {len(seen)} of the {len(blocks)} "
                                   f"blocks of {adapter.blocks_path()}")
            memo: dict = {}
            calls = [_call(a, k) for a, k in seen]
            per_block = [(_moved(a, device, memo), _moved(k, device, memo)) for _, a, k in calls]
            same = all(_same(per_block[0], pb) for pb in per_block[1:])
            hidden = calls[0][0]
            out.append(BlockInputs(to_home(hidden.detach(), home), *per_block[0],
                                   per_block=None if same else per_block))
    finally:
        for j, block in enumerate(kept):
            blocks[j] = block
    return out


def _same(a: Any, b: Any) -> bool:
    """Whether two captured call arguments are the same objects (tensors by identity)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


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

"""Mixture-of-experts blocks as one linear module per expert.

transformers keeps the experts of a block fused: `gate_up_proj` `(E, 2I, H)` (each expert's gate rows,
then its up rows) and `down_proj` `(E, H, I)`, applied to the tokens the router sends to each expert:

    for each expert e with tokens t (position p in their top-k):
        y[t] += w[t, p] · down_e(act(gate_e x[t]) · up_e x[t])

The engine quantizes linear modules, so `unfuse` replaces each fused experts module by `Experts`: the
same computation, expert `e` an `Expert` holding three `RoutedLinear`s, named as the family's checkpoints
name them (`experts.<e>.gate_proj`/`up_proj`/`down_proj`, Mixtral's `block_sparse_moe.experts.<e>.w1`/`w3`/`w2`).
The state dict then carries the names of the checkpoint on disk, which is what a streamed run reads and
what GPTQModel and vLLM read back. Routers stay as they are (in full precision).

A `RoutedLinear` is called with the token positions of its rows (`tokens`, in the flattened batch), so
that the calibration engine can pair the rows of the two streams token by token (calibrate.statistics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import InputError

# fused experts classes whose forward is the loop above (gate rows before up rows, no biases); each is
# checked against its unfused form by tests/test_experts.py
FUSED = ("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts")

# per model_type: (the name the checkpoint gives the sparse block, or None to keep it; gate, up, down names)
NAMING = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
DEFAULT_NAMING = (None, ("gate_proj", "up_proj", "down_proj"))


class RoutedLinear(nn.Linear):
    """`nn.Linear` applied to the rows of the tokens routed to it; `tokens` `(N,)` int64 gives their
    positions in the flattened batch and does not change the result."""

    routed = True

    def forward(self, input: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().forward(input)


class Expert(nn.Module):
    """One expert: `down(act(gate x) · up x)`, its three projections named `names` (gate, up, down)."""

    def __init__(self, hidden: int, intermediate: int, act_fn, names=DEFAULT_NAMING[1], device=None, dtype=None):
        super().__init__()
        self.names = tuple(names)
        gate, up, down = self.names
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.add_module(gate, RoutedLinear(hidden, intermediate, **kw))
        self.add_module(up, RoutedLinear(hidden, intermediate, **kw))
        self.add_module(down, RoutedLinear(intermediate, hidden, **kw))
        self.act_fn = act_fn

    def projections(self) -> tuple[RoutedLinear, RoutedLinear, RoutedLinear]:
        return tuple(getattr(self, n) for n in self.names)

    def forward(self, x: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(x, tokens=tokens)) * up(x, tokens=tokens), tokens=tokens)


class Experts(nn.ModuleList):
    """The experts of one sparse block, `Expert` `e` at index `e`; called as the fused module is, with the
    flattened hidden states `(T, H)`, each token's top-k expert indices `(T, k)` and weights `(T, k)`.

    `capture_all`: experts that also see every token once per forward, before the routed call and with
    its output dropped (calibration statistics of "all tokens sent through the expert")."""

    def __init__(self, experts, num_experts: int):
        super().__init__(experts)
        self.num_experts = num_experts
        self.capture_all: frozenset = frozenset()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in sorted(self.capture_all):
            self[e](hidden_states, torch.arange(hidden_states.shape[0], device=hidden_states.device))
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:                # the index of a token no expert here takes
                continue
            pos, tokens = torch.where(mask[e])
            y = self[e](hidden_states[tokens], tokens) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def is_fused(module: nn.Module) -> bool:
    """Whether `module` is a fused experts module `unfuse` knows."""
    return type(module).__name__ in FUSED and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)


def unsupported(model: nn.Module) -> Optional[str]:
    """The class name of a fused experts module of `model` that `unfuse` does not know (None if none):
    its forward may differ from the loop above (biases, interleaved gate and up, clamped activations)."""
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("Experts") and name not in FUSED and isinstance(getattr(module, "down_proj", None), nn.Parameter):
            return name
    return None


def naming(model: nn.Module) -> tuple[Optional[str], tuple[str, str, str]]:
    config = getattr(model, "config", None)
    return NAMING.get(getattr(config, "model_type", None), DEFAULT_NAMING)


@torch.no_grad()
def unfused(fused: nn.Module, names=DEFAULT_NAMING[1]) -> Experts:
    """`Experts` holding the weights of a fused module (copies; on the meta device when it is there)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    E, two_i, H = gate_up.shape
    if down.shape != (E, H, two_i // 2) or two_i % 2:
        raise InputError(f"{type(fused).__name__}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                         f"{tuple(down.shape)} are not (E, 2I, H) and (E, H, I)")
    I = two_i // 2
    experts = []
    for e in range(E):
        ex = Expert(H, I, fused.act_fn, names, device=gate_up.device, dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            g, u, d = ex.projections()
            g.weight.copy_(gate_up[e, :I])
            u.weight.copy_(gate_up[e, I:])
            d.weight.copy_(down[e])
        experts.append(ex)
    return Experts(experts, E)


def unfuse(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by `Experts`, in place, and give the sparse block
    the name its checkpoints use (`NAMING`); returns how many were replaced (0 for a dense model, or
    one already unfused)."""
    block_name, names = naming(model)
    found = [(name, m) for name, m in model.named_modules() if is_fused(m)]
    for name, fused in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[attr] = unfused(fused, names)
        if block_name is None or not parent_name:
            continue
        owner_name, _, sparse = parent_name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if sparse != block_name:                 # registered under the checkpoint's name, called as before
            owner._modules.pop(sparse)
            owner._modules[block_name] = parent
            owner.__dict__[sparse] = parent
    return len(found)


def has_experts(model: nn.Module) -> bool:
    """Whether `model` has mixture-of-experts blocks split by `unfuse`."""
    return any(isinstance(m, Experts) for m in model.modules())


def sparse_blocks(block: nn.Module) -> list[tuple[str, Experts]]:
    """`(name, experts)` for each `Experts` inside `block` (names relative to it)."""
    return [(name, m) for name, m in block.named_modules() if isinstance(m, Experts)]


def routers(model: nn.Module) -> set[str]:
    """Full names of the modules beside each `Experts` with a 2-D weight (the router, a shared expert's
    gate): linear maps a loader may take for quantized unless the checkpoint lists them as full precision."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, Experts) and "." in name:
            parent = name.rpartition(".")[0]
            for child, c in model.get_submodule(parent).named_children():
                w = getattr(c, "weight", None)
                if not isinstance(c, Experts) and isinstance(w, torch.Tensor) and w.ndim == 2:
                    out.add(f"{parent}.{child}")
    return out

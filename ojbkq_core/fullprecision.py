"""The full-precision stream of one model on one set of calibration tokens, kept from one run to the next.

The full-precision stream `X̃` (calibrate.py) depends on the model's original weights and the calibration
tokens only, not on the recipe. `ojbkq compare` calibrates one model on one set of tokens once per row, so
every row that keeps the stream runs the same original blocks on the same inputs and sums the same
`G = X̃ X̃ᵀ`. A `FullPrecisionCache` keeps, per block, the full-precision pass over every batch (each
module's input and the block's output, `Streams.fp_pass`) and the `G` sum of each module's input, and a
later run takes them instead of computing them again. They are the same tensors, so every statistic, code
and objective is the same bit for bit.

What is kept holds host memory: at most `budget` bytes (by default `FULL_PRECISION_CACHE_BYTES`, or a quarter
of the memory the host has available when the cache is made, if that is less); a block that no longer fits
is computed again by every run. The cache is taken on the CPU only (on a CUDA device
the passes would hold device memory the engine sizes for its own work) and for dense models only (an
expert's `G` sums only the tokens that both streams' routers send to it, which depend on the recipe).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from .errors import InputError
from .experts import sparse_blocks
from .hostmemory import available_memory
from .model import Model
from .stats import Statistics

FULL_PRECISION_CACHE_BYTES = 4 << 30


def default_budget() -> int:
    """`FULL_PRECISION_CACHE_BYTES`, or a quarter of the available host memory where that is less."""
    available = available_memory()
    return min(FULL_PRECISION_CACHE_BYTES, available // 4) if available else FULL_PRECISION_CACHE_BYTES


def block_digest(block: nn.Module) -> str:
    """A digest of a block's weights (names, dtypes, shapes and bytes of its state), on the CPU."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(block.state_dict().items()):
        t = t.detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class FullPrecisionCache:
    """Full-precision passes (block index → batch → `(inputs, output)`) and `G` sums (block index, module
    name, dtype → the `(n, n)` sum over all batches) of one model on one set of calibration tokens."""

    def __init__(self, budget: Optional[int] = None):
        self.budget = default_budget() if budget is None else budget
        self.bytes = 0
        self.passes: dict[int, dict] = {}
        self.sums: dict[tuple, torch.Tensor] = {}
        self.taken = 0                               # blocks whose pass a run took from here
        self._key: Optional[tuple] = None
        self._ids: Optional[torch.Tensor] = None
        self.digests: dict[int, str] = {}            # block index → `block_digest` of the weights it was kept for

    @staticmethod
    def accepts(adapter: Model, device: torch.device) -> bool:
        """Whether a run on `device` may use a cache: on the CPU, for a model without experts."""
        return device.type == "cpu" and not any(sparse_blocks(b) for b in adapter.blocks())

    def bind(self, adapter: Model, input_ids: torch.Tensor, batch_size: int, device: torch.device) -> None:
        """Check that a run uses the tokens, batches, device and dtype of the kept passes (the first run sets them)."""
        first = next(adapter.model.parameters())
        key = (tuple(input_ids.shape), batch_size, str(device), first.dtype, type(adapter.model).__name__)
        if self._key is None:
            self._key, self._ids = key, input_ids.clone()
        elif key != self._key or not torch.equal(input_ids, self._ids):
            raise InputError(f"full-precision cache: this run's calibration {key[:4]} differs from the one its "
                             f"passes were kept for {self._key[:4]}; give each model and calibration its own cache")

    def check_block(self, index: int, block: nn.Module) -> None:
        """Check, before block `index` is calibrated, that its weights are those the kept passes and sums of
        that block were made from (the first run records them)."""
        digest = block_digest(block)
        kept = self.digests.setdefault(index, digest)
        if kept != digest:
            raise InputError(f"full-precision cache: block {index}'s weights differ from those its passes were "
                             f"kept for (digest {digest[:12]} against {kept[:12]}); give each model its own cache")

    def pass_of(self, block: int) -> Optional[dict]:
        """The kept full-precision pass of `block` (batch → `(inputs, output)`), or None."""
        kept = self.passes.get(block)
        if kept is not None:
            self.taken += 1
            return dict(kept)
        return None

    def keep_pass(self, block: int, fp_pass: dict) -> None:
        """Keep `block`'s pass unless it is kept already or does not fit in the budget."""
        if block in self.passes:
            return
        size = _tensor_bytes([t for got, out in fp_pass.values() for t in (*got.values(), out)])
        if self.bytes + size <= self.budget:
            self.passes[block] = dict(fp_pass)
            self.bytes += size

    def sums_of(self, block: int, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`{"G": sum}` kept for the input of module `name` of `block` in `dtype`, or `{}`."""
        G = self.sums.get((block, name, dtype))
        return {} if G is None else {"G": G}

    def keep_sums(self, block: int, stats: dict[str, Statistics]) -> None:
        """Keep the `G` sum of each module of `stats` (module name → its `Statistics`, complete) that computed it."""
        for name, st in stats.items():
            key = (block, name, st.dtype)
            if "G" not in st.needs or "G" in st.given or key in self.sums:
                continue
            G = st.sums["G"]
            size = 0 if any(G is kept for kept in self.sums.values()) else G.numel() * G.element_size()
            if self.bytes + size <= self.budget:
                self.sums[key] = G
                self.bytes += size

    def describe(self) -> dict:
        """What is kept, and how many block passes runs have taken from it in all."""
        return {"blocks_kept": len(self.passes), "sums_kept": len(self.sums), "bytes": self.bytes,
                "blocks_taken": self.taken}

"""Perplexity in the block-by-block pass: the evaluation windows travel through the blocks beside the
calibration rows, so no run needs the whole model to evaluate (docs/interfaces.md, "Evaluation").

Two evaluation streams, each `(windows, L, d)` in batches:

- `X_fp` — through each block as it was read, before any of its modules is quantized (`before`): the
  model's own perplexity;
- `X_q`  — through each block once it is quantized (`after`): the quantized model's.

At the end the head (final norm, output embeddings, any logit soft-capping) scores both (`score`) as
`perplexity.perplexity` scores a whole model: the same windows, the same mean NLL per window.

The head is the model's own forward with every block replaced by `Replay`, which returns the kept hidden
states: whatever the model does after its blocks, it does here too. The streams live where the calibration
streams live (`calibrate.stream_home` counts them: `2 × windows × L` rows beside the calibration's).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from .blocks import BlockInputs, capture_block_inputs, run_block, to_home
from .errors import InputError
from .model import Model
from .perplexity import summary, window_nll


class Replay(nn.Module):
    """Stands in for every block while the head scores: returns `hidden` `(b, L, d)` whatever it is given
    (as the real blocks return their output: a tensor, or a tuple starting with it)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@contextlib.contextmanager
def replayed(adapter: Model, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Every block of `adapter.model` replaced by one `Replay(hidden)` for the duration."""
    blocks = adapter.blocks()
    kept = list(blocks)
    stand_in = Replay(hidden, as_tuple)
    try:
        for j in range(len(blocks)):
            blocks[j] = stand_in
        yield
    finally:
        for j, block in enumerate(kept):
            blocks[j] = block


def outside_blocks(adapter: Model) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of every module outside the blocks holding parameters or buffers of its own (the
    embeddings, rotary tables, final norm and output head)."""
    path = adapter.blocks_path()
    return [(name, sub) for name, sub in adapter.model.named_modules()
            if not (name == path or name.startswith(path + "."))
            and (any(p is not None for p in sub._parameters.values()) or sub._buffers)]


@contextlib.contextmanager
def head_on(adapter: Model, device: torch.device) -> Iterator[None]:
    """The modules outside the blocks moved to `device` for the duration (tied parameters stay tied: the
    same `Parameter` objects get their data moved), and back afterwards."""
    moved = []
    for _, sub in outside_blocks(adapter):
        for store in (sub._parameters, sub._buffers):
            for k, t in store.items():
                if t is not None and t.device != device and t.device.type != "meta":
                    moved.append((store, k, t.device))
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(device)
                    else:
                        store[k] = t.to(device)
    try:
        yield
    finally:
        for store, k, home in moved:
            t = store[k]
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(home)
            else:
                store[k] = t.to(home)


@dataclass
class EvalStreams:
    """The evaluation windows of each source at the input of the current block: `ids[b]` the windows of
    batch `b` `(b, L)` int64 (CPU), `source[b]` their source's name, `batches[b]` the other arguments of the
    block call, `X_fp[b]` and `X_q[b]` `(b, L, d)` where the streams live. `as_tuple`: the blocks return a
    tuple (set when a block first runs)."""

    ids: list[torch.Tensor]
    source: list[str]
    batches: list[BlockInputs]
    X_fp: list[torch.Tensor]
    X_q: list[torch.Tensor]
    home: object = "cpu"
    as_tuple: bool = False
    order: list[str] = field(default_factory=list)

    @classmethod
    @torch.no_grad()
    def capture(cls, adapter: Model, windows: dict[str, torch.Tensor], batch_size: int, home="cpu",
                device="cpu") -> "EvalStreams":
        """The first block's inputs for each source's windows `(W, L)` int64, in batches of `batch_size`
        windows; both streams start equal."""
        ids, source, batches = [], [], []
        for name, w in windows.items():
            got = capture_block_inputs(adapter, w, batch_size, home=home, device=device)
            ids += [w[i:i + batch_size].cpu() for i in range(0, w.shape[0], batch_size)]
            source += [name] * len(got)
            batches += got
        X_fp = [b.hidden for b in batches]
        for b in batches:
            b.hidden = None
        X_q = [to_home(x.clone(), home) for x in X_fp]
        return cls(ids, source, batches, X_fp, X_q, home, order=list(windows))

    def restore(self, state: Optional[dict]) -> None:
        """Continue from `state()` of a run that stopped (the streams at the same block)."""
        if state is None or len(state["X_fp"]) != len(self.batches):
            raise InputError("--resume: the saved state holds no evaluation streams for this run's evaluation "
                             "windows; remove the output's .partial folder to start again")
        self.X_fp = [to_home(x, self.home) for x in state["X_fp"]]
        self.X_q = [to_home(x, self.home) for x in state["X_q"]]

    def state(self) -> dict:
        """The two streams, as `restore` takes them."""
        return {"X_fp": self.X_fp, "X_q": self.X_q}

    def _through(self, block: nn.Module, X: list, device) -> None:
        for b, batch in enumerate(self.batches):
            out = run_block(block, X[b], batch, device)
            self.as_tuple = isinstance(out, (tuple, list))
            out = out[0] if self.as_tuple else out
            X[b] = out.to(self.home) if self.home != "pinned" else X[b].copy_(out, non_blocking=True)
        if self.home == "pinned":                        # the host copies are read next (the saved state)
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def before(self, block: nn.Module, device) -> None:
        """`X_fp ← block(X_fp)`: call with the block as it was read, before any module is quantized."""
        self._through(block, self.X_fp, device)

    @torch.no_grad()
    def after(self, block: nn.Module, device) -> None:
        """`X_q ← block(X_q)`: call once the block is quantized."""
        self._through(block, self.X_q, device)

    @torch.no_grad()
    def score(self, adapter: Model, device) -> dict:
        """Each source's `{"fp", "quantized"}` results, as `perplexity.perplexity` gives them, from the
        streams at the output of the last block. The modules outside the blocks must be on `device`
        (`head_on`, or a streamed run's head loaded there)."""
        per = {name: {"fp": [], "quantized": []} for name in self.order}
        model = adapter.model
        for b, x in enumerate(self.ids):
            for w in range(x.shape[0]):                  # one window at a time: the logits of a batch of long
                xw = x[w:w + 1].to(device)               # windows over a large vocabulary would not fit
                for key, X in (("fp", self.X_fp), ("quantized", self.X_q)):
                    with replayed(adapter, X[b][w:w + 1].to(device), self.as_tuple):
                        logits = model(input_ids=xw, **adapter.call_kwargs()).logits
                    per[self.source[b]][key] += window_nll(logits, xw).tolist()
        L = self.ids[0].shape[1]
        return {name: {k: summary(v, L, 0.0) for k, v in d.items()} for name, d in per.items()}


"""Perplexity over non-overlapping windows (the WikiText-2 / C4 protocol of GPTQ and its successors).

The evaluation text is tokenized as one sequence and cut into `W = ⌊N / L⌋` windows of `L` tokens
(the remainder is dropped). Each window is scored on its own; with `nll_t = −log p(x_t | x_<t)`
summed over the `L − 1` predicted tokens of every window,

    ppl = exp( Σ nll_t / (W · (L − 1)) ).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import InputError


def windows(tokens: torch.Tensor, seqlen: int, samples: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows `(W, seqlen)` of `tokens` `(N,)`; at most `samples` of them."""
    tokens = tokens.reshape(-1)
    count = tokens.numel() // seqlen
    if count == 0:
        raise InputError(f"eval: the text has {tokens.numel()} tokens, fewer than seqlen={seqlen}; "
                         f"lower eval.seqlen or give more text")
    if samples is not None:
        count = min(count, samples)
    return tokens[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, samples: Optional[int] = None,
               device: str = "cpu", batch_size: int = 1, progress: bool = False,
               on_window: Optional[Callable[[int, int], None]] = None) -> dict:
    """Perplexity of a causal LM on `tokens` `(N,)`. The model is moved to `device` for the run and
    back afterwards; `on_window(done, total)` is called after each batch of windows. Returns `{"perplexity", "nll", "window_nll", "tokens", "windows", "seqlen", "seconds"}`
    with `nll` the mean negative log-likelihood (nats per predicted token, accumulated in float64) and
    `window_nll` each window's (whose mean is `nll`; `intervals.py` resamples them)."""
    t0 = time.perf_counter()
    ids = windows(tokens, seqlen, samples)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    model.to(device)
    model.eval()
    total, count, per_window = 0.0, 0, []
    try:
        for i in tqdm(range(0, ids.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
            x = ids[i:i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                  x[:, 1:].reshape(-1), reduction="none").view(x.shape[0], -1).double()
            per_window += (nll.sum(1) / nll.shape[1]).tolist()
            total += float(nll.sum())
            count += x[:, 1:].numel()
            if on_window is not None:
                on_window(len(per_window), ids.shape[0])
    finally:
        model.to(home)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "window_nll": per_window, "tokens": count,
            "windows": int(ids.shape[0]),
            "seqlen": seqlen, "seconds": time.perf_counter() - t0}

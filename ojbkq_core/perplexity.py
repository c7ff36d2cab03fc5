"""Perplexity over non-overlapping windows (the WikiText-2 / C4 protocol of GPTQ and its successors).

The evaluation text is tokenized as one sequence and cut into `W = ⌊N / L⌋` windows of `L` tokens
(the remainder is dropped). A model trained with a BOS token at the start of every sequence (Gemma,
Llama 3: `data.bos_id`) gets windows of BOS and `L − 1` text tokens, so that it runs in its own regime
and every text token of a window is predicted. Each window is scored on its own; with
`nll_t = −log p(x_t | x_<t)` summed over the `L − 1` predicted tokens of every window,

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


def window_count(tokens: torch.Tensor, seqlen: int, bos: Optional[int] = None) -> int:
    """How many windows `windows` cuts from `tokens` (before `samples` limits them)."""
    if tokens.ndim == 2:
        return tokens.shape[0]
    return tokens.numel() // (seqlen if bos is None else seqlen - 1)


def windows(tokens: torch.Tensor, seqlen: int, samples: Optional[int] = None, bos: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows `(W, seqlen)` of `tokens` `(N,)`, at most `samples` of them; with `bos`, each is
    `bos` and the next `seqlen − 1` text tokens. Windows already cut `(W, seqlen)` are taken as they are."""
    from .data import with_bos
    if tokens.ndim == 2:
        if tokens.shape[1] != seqlen:
            raise InputError(f"eval: windows of {tokens.shape[1]} tokens given for seqlen={seqlen}")
        return tokens[:samples] if samples is not None else tokens
    tokens = tokens.reshape(-1)
    text = seqlen if bos is None else seqlen - 1
    count = window_count(tokens, seqlen, bos)
    if count == 0 or text < 1:
        raise InputError(f"eval: the text has {tokens.numel()} tokens, fewer than seqlen={seqlen}; "
                         f"lower eval.seqlen or give more text")
    if samples is not None:
        count = min(count, samples)
    return with_bos(tokens[: count * text].view(count, text), bos)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, samples: Optional[int] = None,
               device: str = "cpu", batch_size: int = 1, progress: bool = False,
               on_window: Optional[Callable[[int, int], None]] = None, bos: Optional[int] = None) -> dict:
    """Perplexity of a causal LM on `tokens` `(N,)` (or windows already cut, `(W, seqlen)`), windows cut by
    `windows` (`bos`: the model's BOS token, `data.bos_id`). The model is moved to `device` for the run and
    back afterwards; `on_window(done, total)` is called after each batch of windows. Returns `{"perplexity", "nll", "window_nll", "tokens", "windows", "seqlen", "seconds"}`
    with `nll` the mean negative log-likelihood (nats per predicted token, accumulated in float64) and
    `window_nll` each window's (whose mean is `nll`; `intervals.py` resamples them)."""
    t0 = time.perf_counter()
    ids = windows(tokens, seqlen, samples, bos)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    model.to(device)
    model.eval()
    per_window = []
    try:
        for i in tqdm(range(0, ids.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
            x = ids[i:i + batch_size].to(device)
            per_window += window_nll(model(input_ids=x, use_cache=False).logits, x).tolist()
            if on_window is not None:
                on_window(len(per_window), ids.shape[0])
    finally:
        model.to(home)
    return summary(per_window, seqlen, time.perf_counter() - t0)


def window_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each window's mean negative log-likelihood of its `L − 1` predicted tokens: float64 `(b,)` from the
    logits `(b, L, vocab)` of windows `x` `(b, L)`."""
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1).to(logits.device),
                          reduction="none").view(x.shape[0], -1).double()
    return nll.sum(1).cpu() / nll.shape[1]


def summary(per_window: list, seqlen: int, seconds: float) -> dict:
    """`perplexity`'s result from each window's mean NLL (all windows predict `seqlen − 1` tokens)."""
    nll = math.fsum(per_window) / len(per_window)
    return {"perplexity": math.exp(nll), "nll": nll, "window_nll": list(per_window),
            "tokens": len(per_window) * (seqlen - 1), "windows": len(per_window), "seqlen": seqlen, "seconds": seconds}

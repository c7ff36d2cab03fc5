"""Embedding fidelity of a quantized encoder against its full-precision original.

Sentences are encoded in padded batches; with `h` `(b, L, d)` the last hidden states and `mask`
`(b, L)` the attention mask:

- sentence embedding: the mean of `h` over the real tokens (sentence-transformers' mean pooling);
- `cosine`: mean over sentences of `cos(e_q, e_fp)`;
- `rel_err`: `‖h_q − h_fp‖_F / ‖h_fp‖_F` over the real tokens of all sentences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class Encoded:
    """Last hidden states per batch (float32, CPU) with their attention masks."""

    hidden: list[torch.Tensor]
    mask: list[torch.Tensor]

    def pooled(self) -> torch.Tensor:
        """Mean-pooled sentence embeddings `(S, d)`."""
        return torch.cat([mean_pool(h, m) for h, m in zip(self.hidden, self.mask)])


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(b, L, d)`, `(b, L)` → `(b, d)`: the average over positions where `mask` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def batches(tokenizer, sentences: Sequence[str], max_length: int = 128, batch_size: int = 32) -> list[dict]:
    """Tokenized, padded and truncated batches of `sentences` (input_ids, attention_mask, …)."""
    return [dict(tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


@torch.no_grad()
def encode(model, inputs: list[dict], device: str = "cpu") -> Encoded:
    """Run an encoder on tokenized `inputs` and keep its last hidden states."""
    model.eval()
    hidden, mask = [], []
    for b in inputs:
        b = {k: v.to(device) for k, v in b.items()}
        out = model(**b)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden.append(h.float().cpu())
        mask.append(b["attention_mask"].cpu())
    return Encoded(hidden, mask)


def compare(ref: Encoded, out: Encoded) -> dict:
    """`{"cosine", "cosine_min", "rel_err"}` of `out` against the full-precision `ref`."""
    cos = F.cosine_similarity(out.pooled().double(), ref.pooled().double(), dim=-1)
    num = den = 0.0
    for hq, hf, m in zip(out.hidden, ref.hidden, ref.mask):
        keep = m.bool()
        num += float(((hq - hf)[keep].double() ** 2).sum())
        den += float((hf[keep].double() ** 2).sum())
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "rel_err": (num / den) ** 0.5}

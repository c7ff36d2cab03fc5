"""Adapters for transformers models, recognised by module structure (not by model name).

| adapter | block list | true-sequential groups |
|---|---|---|
| `llama` (Llama, Mistral, Qwen2, Qwen3, …) | `model.layers` | q/k/v → o → gate/up → down |
| `gpt2` (Conv1D, weight `(in, out)`) | `transformer.h` | c_attn → attn.c_proj → c_fc → mlp.c_proj |
| `bert` (BERT-style encoders) | `encoder.layer` | query/key/value → attention.output.dense → intermediate.dense → output.dense |

Each path is also tried without the task head's prefix (`LlamaModel.layers`, `GPT2Model.h`,
`BertModel.encoder.layer`).
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers.pytorch_utils import Conv1D

from ojbkq_core.model import Model, has_modules


class StructuredModel(Model):
    """An adapter defined by data: candidate block-list paths and the groups of one block."""

    stacks: ClassVar[tuple[str, ...]] = ()
    GROUPS: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @classmethod
    def _stack(cls, model: nn.Module):
        for path in cls.stacks:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return path
        return None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        path = cls._stack(model)
        if path is None:
            return False
        names = [n for g in cls.GROUPS for n in g]
        return all(has_modules(block, names) for block in model.get_submodule(path))

    def blocks_path(self) -> str:
        return self._stack(self.model)

    def groups(self, block: nn.Module) -> list[list[str]]:
        return [list(g) for g in self.GROUPS]


class LlamaLike(StructuredModel):
    name = "llama"
    description = "decoder-only with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj (Llama, Mistral, Qwen2, Qwen3)"
    stacks = ("model.layers", "layers")
    GROUPS = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )


class GPT2Like(StructuredModel):
    name = "gpt2"
    description = "decoder-only with attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (GPT-2, Conv1D weights)"
    stacks = ("transformer.h", "h")
    GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))

    def transposed(self, module: nn.Module) -> bool:
        return isinstance(module, Conv1D)


class BertLike(StructuredModel):
    name = "bert"
    causal = False
    description = "encoder with attention.self.{query,key,value}, attention.output.dense, intermediate.dense, output.dense"
    stacks = ("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer")
    GROUPS = (
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    )


ADAPTERS = (LlamaLike, GPT2Like, BertLike)

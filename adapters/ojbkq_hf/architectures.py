"""Adapters for transformers models, recognised by module structure (not by model name).

| adapter | block list | true-sequential groups |
|---|---|---|
| `llama` (Llama, Mistral, Qwen2, Qwen3, …) | `model.layers` | q/k/v → o → gate/up → down |
| `gpt2` (Conv1D, weight `(in, out)`) | `transformer.h` | c_attn → attn.c_proj → c_fc → mlp.c_proj |
| `bert` (BERT-style encoders) | `encoder.layer` | query/key/value → attention.output.dense → intermediate.dense → output.dense |
| `moe` (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) | `model.layers` | q/k/v → o → every expert's gate/up (and the shared expert's) → every expert's down (and the shared expert's) |

Each path is also tried without the task head's prefix (`LlamaModel.layers`, `GPT2Model.h`,
`BertModel.encoder.layer`).
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers.pytorch_utils import Conv1D

from ojbkq_core import experts as moe
from ojbkq_core.errors import InputError
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


class MixtureOfExperts(LlamaLike):
    """Llama-style attention with sparse mixture-of-experts MLPs (`experts.py`): the fused experts are
    split into one module per expert when the adapter is made, and each expert's projections are
    quantized on the tokens its router sends to it. Blocks with a dense MLP (Qwen3-MoE's
    `mlp_only_layers`) are quantized as `llama` blocks; a shared expert (`shared_expert`, DeepSeek-style
    `shared_experts`) joins the experts' groups; routers and the shared expert's gate stay in full precision."""

    name = "moe"
    description = ("Llama-style attention with mixture-of-experts MLPs (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE): "
                   "each expert's gate, up and down quantized on its routed tokens")
    ATTENTION = LlamaLike.GROUPS[:2]
    SHARED = ("shared_expert", "shared_experts")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        moe.unfuse(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        path = cls._stack(model)
        if path is None:
            return False
        blocks = list(model.get_submodule(path))
        attention = [n for g in cls.ATTENTION for n in g]
        odd = moe.unsupported(model)
        if odd is not None:
            raise InputError(f"{type(model).__name__}: its experts ({odd}) are not in a layout ojbkq splits into "
                             f"one module per expert (supported: {', '.join(moe.FUSED)})")
        sparse = [b for b in blocks if any(moe.is_fused(m) or isinstance(m, moe.Experts) for m in b.modules())]
        if not sparse:
            return False
        return all(has_modules(b, attention) for b in blocks) and all(
            b in sparse or has_modules(b, [n for g in LlamaLike.GROUPS[2:] for n in g]) for b in blocks)

    def groups(self, block: nn.Module) -> list[list[str]]:
        found = moe.sparse_blocks(block)
        if not found:
            return super().groups(block)
        (experts_name, experts), = found
        sparse = experts_name.rpartition(".")[0]
        gate_up, down = [], []
        for e, expert in enumerate(experts):
            g, u, d = expert.names
            gate_up += [f"{experts_name}.{e}.{g}", f"{experts_name}.{e}.{u}"]
            down.append(f"{experts_name}.{e}.{d}")
        for shared in self.SHARED:
            names = [f"{sparse}.{shared}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
            if has_modules(block, names):
                gate_up += names[:2]
                down.append(names[2])
        return [list(g) for g in self.ATTENTION] + [gate_up, down]


ADAPTERS = (LlamaLike, GPT2Like, BertLike, MixtureOfExperts)

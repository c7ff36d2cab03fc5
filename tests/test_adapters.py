"""Model adapters: registration, recognition by module structure, groups, Conv1D weights."""
import pytest
import torch
from torch import nn

from ojbkq_core.errors import InputError
from ojbkq_core.model import find_adapter
from ojbkq_core.registry import get_registry, load
from tiny_models import one_thread, tiny_bert, tiny_gpt2, tiny_llama  # noqa: F401 (autouse fixture)


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    return model_cls(cfg).eval()


def test_adapters_are_registered_through_the_plugin():
    reg = load()
    assert {"llama", "gpt2", "bert"} <= set(reg.adapters)
    assert {reg.adapters[n].plugin for n in ("llama", "gpt2", "bert")} == {"transformers"}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_llama_family_is_recognised_by_structure(family):
    import transformers as tf
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[family]
    model = _tiny(cfg_cls, model_cls)
    a = find_adapter(model)
    assert a.name == "llama" and a.causal
    assert a.blocks_path() == "model.layers"
    assert a.groups(a.blocks()[0]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    names = a.layer_names()
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    # the base model (no LM head) is recognised too
    assert find_adapter(model.model).blocks_path() == "layers"


def test_gpt2_groups_and_conv1d_weights_are_out_by_in():
    model = tiny_gpt2()
    a = find_adapter(model)
    assert a.name == "gpt2" and a.blocks_path() == "transformer.h"
    assert a.groups(a.blocks()[0]) == [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    W = a.weight(c_attn)
    assert W.shape == (3 * 64, 64) and c_attn.weight.shape == (64, 3 * 64)
    x = torch.randn(5, 64)
    torch.testing.assert_close(c_attn(x), x @ W.T + c_attn.bias)
    Q = torch.randn(3 * 64, 64)
    a.set_weight(c_attn, Q)
    torch.testing.assert_close(c_attn(x), x @ Q.T + c_attn.bias)
    with pytest.raises(InputError):
        a.set_weight(c_attn, Q.T)


def test_bert_encoder_adapter():
    model = tiny_bert()
    a = find_adapter(model)
    assert a.name == "bert" and not a.causal and a.blocks_path() == "encoder.layer"
    assert a.modules(a.blocks()[0]) == ["attention.self.query", "attention.self.key", "attention.self.value",
                                        "attention.output.dense", "intermediate.dense", "output.dense"]
    assert a.call_kwargs() == {}


def test_structure_not_name_decides():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, n, nn.Linear(8, 8))

    class MLP(nn.Module):
        def __init__(self, down=True):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
            if down:
                self.down_proj = nn.Linear(16, 8)

    class Block(nn.Module):
        def __init__(self, down=True):
            super().__init__()
            self.self_attn, self.mlp = Attn(), MLP(down)

    class Inner(nn.Module):
        def __init__(self, down=True):
            super().__init__()
            self.layers = nn.ModuleList([Block(down), Block(down)])

    class SomethingElse(nn.Module):
        def __init__(self, down=True):
            super().__init__()
            self.model = Inner(down)

    assert find_adapter(SomethingElse()).name == "llama"
    with pytest.raises(InputError, match="no model adapter recognises SomethingElse"):
        find_adapter(SomethingElse(down=False))


def test_named_adapter_must_fit():
    with pytest.raises(InputError, match="model.adapter='gpt2'"):
        find_adapter(tiny_llama(), "gpt2")
    with pytest.raises(InputError, match="unknown adapter"):
        find_adapter(tiny_llama(), "nonesuch")
    assert find_adapter(tiny_llama(), "llama", get_registry()).name == "llama"

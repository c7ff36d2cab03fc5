"""Tiny transformers models built locally (no downloads) and the test texts, for tests."""
from __future__ import annotations

import os

import pytest
import torch

from ojbkq_core.data import byte_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
CALIB_TXT = os.path.join(DATA, "calib.txt")
EVAL_TXT = os.path.join(DATA, "eval.txt")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tied_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    """A tiny Llama whose head is its embeddings and whose norms are not all ones (uniform in [0.5, 1.5]):
    folding the final norm into the head, as a rotation does, unties them."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, layers: int = 2):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=256)
    return BertModel(cfg).eval()


MOE = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")


def tiny_moe(family: str = "qwen3_moe", seed: int = 0, layers: int = 2, experts: int = 8, top_k: int = 2,
             hidden: int = 64):
    """A tiny random mixture-of-experts model of `family` (fused experts, as transformers builds them);
    expert widths are `hidden / 2`, dense widths `1.5 hidden`."""
    import transformers
    torch.manual_seed(seed)
    small, dense = hidden // 2, hidden * 3 // 2
    common = dict(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  num_experts_per_tok=top_k)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=dense, moe_intermediate_size=small, head_dim=hidden // 4,
                                          num_experts=experts, mlp_only_layers=[layers - 1] if layers > 2 else [])
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=small, num_local_experts=experts)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, intermediate_size=dense, moe_intermediate_size=small,
                                          shared_expert_intermediate_size=hidden, num_experts=experts)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, intermediate_size=small, num_experts=experts)
    else:
        raise ValueError(family)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def token_ids(samples: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    """`(samples, seqlen)` windows of the calibration text's bytes."""
    data = torch.tensor(list(open(CALIB_TXT, "rb").read()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seqlen, (samples,), generator=g)
    return torch.stack([data[s:s + seqlen] for s in starts.tolist()])


def save(model, folder: str) -> str:
    """`save_pretrained` the model and the byte tokenizer into `folder`."""
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost a lot of spinning:
    run these tests single-threaded (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access: model and dataset names that are not local folders fail as they would offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

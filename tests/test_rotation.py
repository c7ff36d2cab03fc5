"""Rotations absorbed into the weights (ojbkq_core/rotation.py): Hadamard constructions, and rotated
models giving the original logits, block by block as whole, and refusing what does not rotate exactly.

The float64 comparisons replace each RMSNorm's forward by its float64 formula (`exact_norms`):
transformers' RMSNorms round `rms(h)` through float32, which alone moves float64 logits by ~1e-7
relative. One test keeps the stock float32 model (≤ 1e-5 relative)."""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import transformers

from ojbkq_core.errors import InputError
from ojbkq_core.experts import unfuse
from ojbkq_core.rotation import (check_rotatable, family, fold_and_rotate_block, fold_and_rotate_head,
                                 fold_norms, hadamard, hadamard_factors, head_rotation, paley,
                                 random_orthogonal, residual_rotation, rotate_front, rotate_model)
from tiny_models import offline, one_thread, tiny_gpt2, tiny_llama, tiny_moe  # noqa: F401  (fixtures)

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------
# orthogonal matrices

ORDERS = [1, 2, 4, 12, 20, 24, 28, 36, 44, 48, 64, 128, 576, 640, 1536, 2048]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_is_orthonormal(n):
    H = hadamard(n)
    assert H.dtype == torch.float64 and H.shape == (n, n)
    assert torch.equal(H.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [4096, 14336])
def test_large_hadamard_rows_are_orthonormal(n):
    """Too large for a full `H Hᵀ` here: every entry ±1/sqrt(n), and 8 rows against all rows."""
    H = hadamard(n)
    entry = torch.tensor(1 / math.sqrt(n), dtype=torch.float64)
    assert H.shape == (n, n) and all(torch.all(rows.abs() == entry) for rows in H.split(512))
    rows = torch.randint(0, n, (8,), generator=torch.Generator().manual_seed(n))
    assert torch.allclose(H[rows] @ H.T, torch.eye(n, dtype=torch.float64)[rows], atol=1e-12)
    del H


def test_hadamard_constructions_and_gaps():
    assert hadamard_factors(576) == (72, 8) and hadamard_factors(14336) == (3584, 4)
    for kind, q in [("I", 3), ("I", 11), ("I", 19), ("II", 5), ("II", 13), ("II", 17)]:
        S = paley(kind, q).double()
        n = S.shape[0]
        assert n == (q + 1 if kind == "I" else 2 * (q + 1))
        assert torch.equal(S @ S.T, n * torch.eye(n, dtype=torch.float64))
    for n in (3, 6, 7, 10, 0):
        assert hadamard(n) is None
    assert hadamard(12) is not hadamard(12) and torch.equal(hadamard(12), hadamard(12))  # a fresh copy


def test_random_orthogonal_and_residual_rotation():
    Q = random_orthogonal(20, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, random_orthogonal(20, seed=3)) and not torch.equal(Q, random_orthogonal(20, seed=4))
    R, text = residual_rotation(48, "hadamard", seed=1)
    assert "Hadamard" in text and torch.equal(R.abs(), hadamard(48).abs())
    assert torch.allclose(R @ R.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.equal(R, residual_rotation(48, "hadamard", seed=1)[0])
    assert not torch.equal(R, residual_rotation(48, "hadamard", seed=2)[0])        # other signs
    R, text = residual_rotation(10, "hadamard", seed=1)                           # no Hadamard of order 10
    assert "no Hadamard" in text and torch.equal(R, random_orthogonal(10, 1))
    assert torch.equal(residual_rotation(10, "random", 5)[0], random_orthogonal(10, 5))
    with pytest.raises(InputError):
        residual_rotation(8, "haar", 0)


# ----------------------------------------------------------------------------------------------------
# models


def _exact_rms_norm(self, x):
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def exact_norms(model):
    """Every RMSNorm computed in the input's dtype (float64 here) instead of float32."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_exact_rms_norm, m)
    return model


def prepare(model, float64: bool = True, seed: int = 1):
    """Non-trivial norm weights and biases (fresh ones are 1 and 0, which would hide a wrong fold)."""
    if float64:
        model = exact_norms(model.double())
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")        # grouped_mm takes no float64
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def llama(hidden=64, heads=4, kv=2, layers=2, tied=False, bias=False, intermediate=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    return transformers.LlamaForCausalLM(cfg).eval()


def dense(family_name):
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if family_name == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16)).eval()
    if family_name == "qwen2":                              # q/k/v biases
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    return transformers.MistralForCausalLM(transformers.MistralConfig(**common)).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def routes(model):
    """The experts each router picks, per layer `(tokens, k)` sorted."""
    picked = []
    hooks = [m.register_forward_hook(lambda mod, i, out: picked.append(out[-1].sort(-1).values))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    logits(model)
    for h in hooks:
        h.remove()
    return picked


CASES = {
    "llama": lambda: llama(),
    "llama-tied": lambda: llama(tied=True),
    "llama-bias": lambda: llama(bias=True),
    "llama-paley-48": lambda: llama(hidden=48),                          # residual 48 (Paley I), heads 12
    "llama-no-head-hadamard": lambda: llama(hidden=40),                  # heads 10: no Hadamard, random
    "smollm2-shaped": lambda: llama(hidden=576, heads=9, kv=3, layers=1, intermediate=1536, tied=True),
    "mistral": lambda: dense("mistral"),
    "qwen2": lambda: dense("qwen2"),
    "qwen3": lambda: dense("qwen3"),
    "qwen3_moe": lambda: tiny_moe("qwen3_moe"),
    "mixtral": lambda: tiny_moe("mixtral"),
    "qwen2_moe": lambda: tiny_moe("qwen2_moe"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("residual,heads", [("hadamard", "hadamard"), ("random", None)])
def test_rotated_model_gives_the_original_logits(case, residual, heads):
    model = prepare(CASES[case]())
    before, before_routes = logits(model), routes(model)
    report = rotate_model(model, residual=residual, heads=heads, seed=7)
    assert rel_err(logits(model), before) < 1e-12
    assert [torch.equal(a, b) for a, b in zip(routes(model), before_routes)] == [True] * len(before_routes)
    assert report["residual"] == residual and report["heads"] == heads and report["seed"] == 7
    assert report["untied"] == (case in ("llama-tied", "smollm2-shaped"))
    if case == "llama-no-head-hadamard" and heads:
        assert "no Hadamard" in report["heads_description"]


def test_float32_model_within_1e5():
    model = prepare(tiny_llama(), float64=False)                  # stock transformers norms, float32
    before = logits(model)
    rotate_model(model)
    assert rel_err(logits(model), before) <= 1e-5


def test_residual_stream_is_rotated_and_norms_are_one():
    model = prepare(dense("qwen3"))
    q_norms = {n: p.clone() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    E = model.model.embed_tokens.weight.clone()
    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states
    rotate_model(model, seed=3)
    Q, _ = residual_rotation(64, "hadamard", 3)
    with torch.no_grad():
        rotated = model(IDS, output_hidden_states=True).hidden_states
    for h, h_rot in zip(hidden[:-1], rotated[:-1]):              # the last is after the final norm
        assert torch.allclose(h_rot, h @ Q, atol=1e-10) and not torch.allclose(h_rot, h)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name
        if name in q_norms:                                       # inside the heads: untouched
            assert torch.equal(p, q_norms[name]), name
    E_rot = model.model.embed_tokens.weight
    assert not torch.allclose(E_rot[5], E[5])
    assert torch.allclose(E_rot.norm(dim=1), E.norm(dim=1), rtol=1e-12)


@pytest.mark.parametrize("case", ["llama-tied", "qwen3_moe"])
def test_block_by_block_equals_whole_model(case):
    whole = prepare(CASES[case]())
    streamed = copy.deepcopy(whole)
    report = rotate_model(whole, residual="hadamard", heads="hadamard", seed=5)
    fam = family(streamed)
    Q, _ = residual_rotation(fam.hidden, "hadamard", 5)
    Hh, _ = head_rotation(fam.head_dim, "hadamard", 5)
    untied = rotate_front(streamed, Q)
    for block in streamed.model.layers:
        fold_and_rotate_block(block, fam, Q, Hh)
    untied = fold_and_rotate_head(streamed, Q) or untied
    assert untied == report["untied"]
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unfused_experts_rotate_like_fused():
    fused = prepare(tiny_moe("mixtral"))
    before, before_routes = logits(fused), routes(fused)
    split = copy.deepcopy(fused)
    unfuse(split)
    rotate_model(split)
    assert rel_err(logits(split), before) < 1e-12
    assert all(torch.equal(a, b) for a, b in zip(routes(split), before_routes))
    rotate_model(fused)
    unfuse(fused)
    a, b = fused.state_dict(), split.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)


def test_tied_head_untied_only_when_the_final_norm_folds(tmp_path):
    model = prepare(llama(tied=True))
    with torch.no_grad():
        model.model.norm.weight.fill_(1)
    before = logits(model)
    assert rotate_model(model)["untied"] is False
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert rel_err(logits(model), before) < 1e-12

    model = prepare(llama(tied=True))
    before = logits(model)
    assert rotate_model(model)["untied"] is True
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)                              # stays untied when read back
    back = exact_norms(transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval())
    assert back.lm_head.weight is not back.model.embed_tokens.weight
    assert rel_err(logits(back), before) < 1e-12


def test_fold_norms_alone():
    model = prepare(llama())
    before, E = logits(model), model.model.embed_tokens.weight.clone()
    assert fold_norms(model) is False
    assert rel_err(logits(model), before) < 1e-12
    assert torch.equal(model.model.embed_tokens.weight, E)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)


def gemma3():
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def llama_with_gemma_norm():
    """Names and shapes of a Llama, but an RMSNorm whose scale is `1 + weight`."""
    model = llama()
    model.model.layers[1].post_attention_layernorm = transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm(64)
    return model


def llama_with_extra_norm():
    model = llama()
    model.model.layers[0].post_mlp_norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(64)
    return model


@pytest.mark.parametrize("build,says", [(tiny_gpt2, "LayerNorm"), (gemma3, "post_feedforward_layernorm"),
                                        (llama_with_gemma_norm, "rms(x) * weight"),
                                        (llama_with_extra_norm, "post_mlp_norm")])
def test_refused_in_one_line_before_any_change(build, says):
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (check_rotatable, rotate_model, fold_norms):
        with pytest.raises(InputError) as err:
            call(model)
        message = str(err.value)
        assert "\n" not in message and says in message and "Llama" in message and "Mixtral" in message
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_kind_changes_nothing():
    model = llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError):
        rotate_model(model, residual="haar")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

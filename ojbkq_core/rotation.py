"""Rotations absorbed into the weights (QuaRot / SpinQuant R1 and R2), exact before quantizing.

Row vectors throughout; `nn.Linear` computes `y = x Wᵀ + b` with `W` `(out, in)`.

**Folding the norms.** A pre-norm block reads the residual stream `h` `(…, n)` through an RMSNorm,
`norm(h) = rms(h) ⊙ g` with `rms(h) = h / sqrt(mean(h²) + ε)`, and adds what it computes back into `h`.
A linear reading the norm's output computes `(rms(h) ⊙ g) Wᵀ = rms(h) (W diag(g))ᵀ`, so

    W ← W diag(g),   g ← 1                                  (fold_norms)

leaves every output unchanged. The final norm folds into `lm_head` the same way.

**R1, the residual rotation.** With `Q` `(n, n)` orthogonal, let the residual stream be `h' = h Q`.
`mean((h Q)²) = mean(h²)` (a rotation keeps the norm of a row), so `rms(h Q) = rms(h) Q`, and

    reader (q, k, v, gate, up, router, each expert's gate/up, lm_head):  W ← W Q         rms(h) Q (W Q)ᵀ = rms(h) Wᵀ
    writer (o_proj, down_proj, each expert's down):                     W ← Qᵀ W, b ← b Q   (x Wᵀ + b) Q
    embedding:                                                          E ← E Q

Every block then reads and writes `h Q`; the head reads `rms(h) Q` and gives the original logits, and a
router gives the original router logits (the same experts are chosen).

**R2, the head rotation.** With `Hh` `(d, d)` orthogonal (`d` the head width), each kv head's values become
`v_j Hh`: `W_v ← blockdiag(Hhᵀ) W_v` (bias `b_v ← b_v blockdiag(Hh)`). Attention mixes the rows of a head's
values (`o = A v`), so each query head's output becomes `o_i Hh` — with grouped-query attention query head
`i` reads kv head `i // group`, which carries the same `Hh` — and `W_o ← W_o blockdiag(Hh)` over all query
heads undoes it.

The norm must be a plain RMSNorm: LayerNorm's mean subtraction and bias, norms whose scale is `1 + g`
(Gemma) and norms between an output projection and the residual (Gemma 2/3's post-norms) do not commute
with `Q` this way; `check_rotatable` refuses such models before anything changes.

Hadamard matrices come from Kronecker products of Sylvester powers of two with Paley constructions
(Paley I: a prime `q ≡ 3 (mod 4)`, order `q + 1`; Paley II: a prime `q ≡ 1 (mod 4)`, order `2 (q + 1)`).
All matrices are float64 on the CPU; a weight is rotated in float64 and written back in its own dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from .errors import InputError
from .experts import Experts, is_fused

# the families whose decoder layers are `h += attn(norm1(h)); h += mlp(norm2(h))` with plain RMSNorms
ROTATABLE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
             "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral"}
KINDS = ("hadamard", "random")


# ---------------------------------------------------------------------------------------------------
# orthogonal matrices


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_prime(order: int) -> Optional[tuple[str, int]]:
    """`("I", q)` or `("II", q)` when a Paley construction of this order exists (q prime), else None."""
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return "I", order - 1
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return "II", order // 2 - 1
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """`J[i, j] = χ(j − i)` `(q, q)` int64, χ the quadratic character mod the prime `q`."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int64)
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def paley(kind: str, q: int) -> torch.Tensor:
    """The ±1 Hadamard matrix (int64) of Paley's construction I (`q ≡ 3 mod 4`, order `q + 1`:
    `I + [[0, 1ᵀ], [−1, J]]`) or II (`q ≡ 1 mod 4`, order `2 (q + 1)`: in the symmetric conference matrix
    `C = [[0, 1ᵀ], [1, J]]` each 0 becomes `[[1, −1], [−1, −1]]` and each ±1 becomes `±[[1, 1], [1, −1]]`)."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[1:, 1:] = _jacobsthal(q)
    S[0, 1:] = 1
    if kind == "I":
        S[1:, 0] = -1
        return S + torch.eye(q + 1, dtype=torch.int64)
    S[1:, 0] = 1
    one = torch.tensor([[1, 1], [1, -1]])
    zero = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(S, one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero)


@lru_cache(maxsize=None)
def hadamard_factors(n: int) -> Optional[tuple[int, ...]]:
    """Orders whose Kronecker product is a Hadamard matrix of order `n`: Paley orders (largest first)
    then one power of two; `()` for `n = 1`, None when no such product is known."""
    if _is_power_of_two(n):
        return (n,) if n > 1 else ()
    if n < 1 or n % 4:
        return None
    divisors = [p for p in range(n, 3, -1) if n % p == 0 and p % 4 == 0 and not _is_power_of_two(p)]
    for p in divisors:
        if _paley_prime(p) is not None:
            rest = hadamard_factors(n // p)
            if rest is not None:
                return (p,) + rest
    return None


@lru_cache(maxsize=8)
def _signs(n: int) -> Optional[torch.Tensor]:
    """The ±1 Hadamard matrix of order `n` (int8), or None."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    H = torch.ones(1, 1, dtype=torch.int8)
    for p in factors:
        if _is_power_of_two(p):
            F = torch.ones(1, 1, dtype=torch.int8)
            for _ in range(p.bit_length() - 1):
                F = torch.kron(F, torch.tensor([[1, 1], [1, -1]], dtype=torch.int8))
        else:
            F = paley(*_paley_prime(p)).to(torch.int8)
        H = torch.kron(H, F)
    return H


def hadamard(n: int) -> Optional[torch.Tensor]:
    """An orthonormal Hadamard matrix `(n, n)` float64 (entries ±1/sqrt(n), `H Hᵀ = I`), or None when no
    construction is known for `n` (`hadamard_factors`). The ±1 matrix is cached; each call returns a new
    tensor."""
    S = _signs(n)
    return None if S is None else S.to(torch.float64).mul_(1 / math.sqrt(n))


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix `(n, n)` float64: `Q R` of a seeded Gaussian, the columns of `Q`
    multiplied by `sign(diag R)`."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(torch.float64)
    return Q * sign[None, :]


def residual_rotation(n: int, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    """`(Q, description)`: `Q` `(n, n)` float64 orthogonal. `kind` `"hadamard"`: the randomized Hadamard
    `H diag(s)`, `s` seeded ±1 signs (a `random_orthogonal` with a note when `hadamard(n)` is None);
    `"random"`: `random_orthogonal(n, seed)`."""
    if kind not in KINDS:
        raise InputError(f"rotation kind '{kind}' is not one of {', '.join(KINDS)}")
    if kind == "hadamard":
        H = hadamard(n)
        if H is not None:
            g = torch.Generator().manual_seed(seed)
            s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
            factors = " x ".join(str(p) for p in hadamard_factors(n)) or "1"
            return H * s[None, :], f"randomized Hadamard of order {n} ({factors}), seed {seed}"
        return (random_orthogonal(n, seed),
                f"random orthogonal of order {n}, seed {seed} (no Hadamard matrix of order {n} is constructed)")
    return random_orthogonal(n, seed), f"random orthogonal of order {n}, seed {seed}"


def head_rotation(d: int, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    """`(Hh, description)` of the head width `d`: `residual_rotation(d, kind, seed + 1)` (its own draw)."""
    return residual_rotation(d, kind, seed + 1)


# ---------------------------------------------------------------------------------------------------
# which models rotate


@dataclass(frozen=True)
class Family:
    """What the per-block functions need of a model: its `model_type`, residual width `hidden`, query
    and kv head counts and the head width `head_dim`."""
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
DENSE_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}
SPARSE_MLP = {"gate", "experts", "shared_expert", "shared_expert_gate"}


def _norm_problem(norm, name: str, width: int) -> Optional[str]:
    """Why `norm` is not a plain RMSNorm `rms(x) ⊙ g` of `width`, or None. Weights that are not on the
    meta device are also probed on one vector (a `(1 + g)` scale or a mean subtraction fails)."""
    if isinstance(norm, nn.LayerNorm) or not type(norm).__name__.endswith("RMSNorm"):
        return f"{name} is a {type(norm).__name__}, not an RMSNorm"
    g = getattr(norm, "weight", None)
    if not isinstance(g, torch.Tensor) or tuple(g.shape) != (width,):
        return f"{name} has no weight of shape ({width},)"
    if getattr(norm, "bias", None) is not None:
        return f"{name} has a bias"
    if g.device.type == "meta":
        return None
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    x = torch.linspace(-1.0, 2.0, width, dtype=torch.float32, device=g.device)
    with torch.no_grad():
        got = norm(x.to(g.dtype)).float()
    want = g.detach().float() * x / torch.sqrt(x.pow(2).mean() + eps)
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()) + 1e-6):
        return f"{name} ({type(norm).__name__}) does not compute rms(x) * weight"
    return None


def _linear_problem(m, name: str, shape: tuple[int, int]) -> Optional[str]:
    if not isinstance(m, nn.Linear):
        return f"{name} is a {type(m).__name__}, not a linear module"
    if tuple(m.weight.shape) != shape:
        return f"{name} has weight {tuple(m.weight.shape)}, expected {shape}"
    return None


def _extra(module: nn.Module, allowed: set[str], *aliases: nn.Module) -> list[str]:
    """Children of `module` beyond `allowed` (a child that is one of `aliases` counts as allowed)."""
    return [n for n, c in module.named_children() if n not in allowed and not any(c is a for a in aliases)]


def _mlp_problem(mlp, name: str, hidden: int) -> Optional[str]:
    """Why `mlp` is not a dense gate/up/down MLP or a sparse block of fused (transformers) or unfused
    (`experts.Experts`) experts with a router (and maybe a shared expert), or None."""
    if mlp is None:
        return f"{name} is missing"
    children = dict(mlp.named_children())
    if {"gate_proj", "up_proj", "down_proj"} <= set(children):
        extra = _extra(mlp, DENSE_MLP)
        if extra:
            return f"{name} has {', '.join(extra)} besides gate_proj, up_proj, down_proj"
        I = mlp.gate_proj.weight.shape[0] if isinstance(mlp.gate_proj, nn.Linear) else -1
        return (_linear_problem(mlp.gate_proj, f"{name}.gate_proj", (I, hidden))
                or _linear_problem(mlp.up_proj, f"{name}.up_proj", (I, hidden))
                or _linear_problem(mlp.down_proj, f"{name}.down_proj", (hidden, I)))
    if not {"gate", "experts"} <= set(children):
        return f"{name} ({type(mlp).__name__}) is neither a gate/up/down MLP nor a router with experts"
    extra = _extra(mlp, SPARSE_MLP)
    if extra:
        return f"{name} has {', '.join(extra)} besides the router, the experts and a shared expert"
    router, experts = mlp.gate, mlp.experts
    w = getattr(router, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[1] != hidden:
        return f"{name}.gate ({type(router).__name__}) has no router weight (experts, {hidden})"
    if getattr(router, "bias", None) is not None:
        return f"{name}.gate has a bias"
    E = w.shape[0]
    if isinstance(experts, Experts):
        for e, ex in enumerate(experts):
            gate, up, down = ex.projections()
            I = gate.weight.shape[0]
            problem = (_linear_problem(gate, f"{name}.experts.{e} gate", (I, hidden))
                       or _linear_problem(up, f"{name}.experts.{e} up", (I, hidden))
                       or _linear_problem(down, f"{name}.experts.{e} down", (hidden, I)))
            if problem:
                return problem
    elif is_fused(experts):
        gate_up, down = experts.gate_up_proj, experts.down_proj
        I = gate_up.shape[1] // 2
        layout = (getattr(experts, "is_transposed", False), getattr(experts, "is_concatenated", True),
                  getattr(experts, "has_bias", False), getattr(experts, "has_post_expert_norm", False))
        if layout != (False, True, False, False) or _extra(experts, {"act_fn"}):
            return f"{name}.experts ({type(experts).__name__}) is not gate_up_proj (E, 2I, H), down_proj (E, H, I)"
        if tuple(gate_up.shape) != (E, 2 * I, hidden) or tuple(down.shape) != (E, hidden, I):
            return (f"{name}.experts has gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)}, "
                    f"not ({E}, 2I, {hidden}) and ({E}, {hidden}, I)")
    else:
        return f"{name}.experts is a {type(experts).__name__}, not fused or unfused experts known here"
    if "shared_expert" in children:
        problem = _mlp_problem(mlp.shared_expert, f"{name}.shared_expert", hidden)
        if problem or "shared_expert_gate" not in children:
            return problem or f"{name} has a shared expert without shared_expert_gate"
        return _linear_problem(mlp.shared_expert_gate, f"{name}.shared_expert_gate", (1, hidden))
    return None


def _block_problem(block, name: str, fam: Family) -> Optional[str]:
    mlp = getattr(block, "mlp", None)
    extra = _extra(block, BLOCK, *([mlp] if mlp is not None else []))
    if extra:
        return (f"{name} has {', '.join(extra)} besides input_layernorm, self_attn, post_attention_layernorm "
                f"and mlp (norms on the way back into the residual do not commute with a rotation)")
    attn = getattr(block, "self_attn", None)
    if attn is None:
        return f"{name} has no self_attn"
    extra = _extra(attn, ATTENTION)
    if extra:
        return f"{name}.self_attn has {', '.join(extra)} besides q/k/v/o projections and q/k norms"
    h, q, kv = fam.hidden, fam.heads * fam.head_dim, fam.kv_heads * fam.head_dim
    return (_norm_problem(getattr(block, "input_layernorm", None), f"{name}.input_layernorm", h)
            or _norm_problem(getattr(block, "post_attention_layernorm", None), f"{name}.post_attention_layernorm", h)
            or _linear_problem(getattr(attn, "q_proj", None), f"{name}.self_attn.q_proj", (q, h))
            or _linear_problem(getattr(attn, "k_proj", None), f"{name}.self_attn.k_proj", (kv, h))
            or _linear_problem(getattr(attn, "v_proj", None), f"{name}.self_attn.v_proj", (kv, h))
            or _linear_problem(getattr(attn, "o_proj", None), f"{name}.self_attn.o_proj", (h, q))
            or _mlp_problem(mlp, f"{name}.mlp", h))


def _problem(model) -> tuple[Optional[str], Optional[Family]]:
    """`(why model does not rotate, None)` or `(None, its Family)`."""
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            return f"{name} is a LayerNorm (its mean subtraction and bias do not commute with a rotation)", None
    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if inner is None or not isinstance(head, nn.Linear) or _extra(model, {"model", "lm_head"}):
        return f"{type(model).__name__} is not a causal LM of model.embed_tokens, model.layers, model.norm and lm_head", None
    if _extra(inner, {"embed_tokens", "layers", "norm", "rotary_emb"}) or not isinstance(
            getattr(inner, "embed_tokens", None), nn.Embedding) or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return f"{type(inner).__name__} is not embed_tokens, layers, norm (and rotary_emb)", None
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return f"{type(model).__name__} has no config with num_attention_heads", None
    hidden = inner.embed_tokens.weight.shape[1]
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    fam = Family(getattr(config, "model_type", ""), hidden, heads, kv, head_dim)
    if not inner.embed_tokens.weight.dtype.is_floating_point:
        return f"the embeddings are {inner.embed_tokens.weight.dtype}, not floating point", None
    problem = None
    for i, block in enumerate(inner.layers):
        problem = problem or _block_problem(block, f"model.layers.{i}", fam)
    problem = (problem or _norm_problem(getattr(inner, "norm", None), "model.norm", hidden)
               or _linear_problem(head, "lm_head", (head.out_features, hidden)))
    if problem is None and fam.model_type not in ROTATABLE:
        problem = f"model_type '{fam.model_type}' is not a family whose blocks are known to be pre-norm RMSNorm blocks"
    return problem, (None if problem else fam)


def family(model) -> Family:
    """The model's `Family`, or `InputError` (one line) when it cannot be rotated exactly."""
    problem, fam = _problem(model)
    if problem:
        names = ", ".join(ROTATABLE.values())
        raise InputError(f"cannot rotate {type(model).__name__}: {problem}; rotations fold into {names} models")
    return fam


def check_rotatable(model) -> None:
    """Raise `InputError` in one line unless `model` is a family that rotates exactly (`ROTATABLE`) with
    the module layout this module reads (checked module by module, norms probed when loaded)."""
    family(model)


# ---------------------------------------------------------------------------------------------------
# folding and rotating (float64, written back in each weight's dtype, in place)


def _pieces(W: torch.Tensor):
    """`W` itself, or each expert's matrix of a 3-D `(E, ·, ·)` tensor (one float64 copy at a time)."""
    return [W] if W.ndim == 2 else list(W)


@torch.no_grad()
def _read(W: torch.Tensor, g: Optional[torch.Tensor], Q: Optional[torch.Tensor]) -> None:
    """A linear reading the residual (its input axis is the last): `W ← W diag(g) Q` in place."""
    for w in _pieces(W):
        x = w.double()
        if g is not None:
            x = x * g.double().to(x.device)[None, :]
        if Q is not None:
            x = x @ Q.to(x.device)
        w.copy_(x)


@torch.no_grad()
def _write(W: torch.Tensor, b: Optional[torch.Tensor], Q: torch.Tensor) -> None:
    """A linear writing into the residual (its output axis is second to last): `W ← Qᵀ W`, `b ← b Q`."""
    for w in _pieces(W):
        w.copy_(Q.to(w.device).T @ w.double())
    if b is not None:
        b.copy_(b.double() @ Q.to(b.device))


def _readers_writers(mlp) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, Optional[torch.Tensor]]]]:
    """The weights of `mlp` whose last axis reads the residual, and `(weight, bias)` writing into it."""
    if hasattr(mlp, "gate_proj"):
        return [mlp.gate_proj.weight, mlp.up_proj.weight], [(mlp.down_proj.weight, mlp.down_proj.bias)]
    readers, writers = [mlp.gate.weight], []
    if isinstance(mlp.experts, Experts):
        for ex in mlp.experts:
            gate, up, down = ex.projections()
            readers += [gate.weight, up.weight]
            writers.append((down.weight, down.bias))
    else:
        readers.append(mlp.experts.gate_up_proj)            # (E, 2I, H)
        writers.append((mlp.experts.down_proj, None))       # (E, H, I)
    if hasattr(mlp, "shared_expert"):
        shared_readers, shared_writers = _readers_writers(mlp.shared_expert)
        readers += shared_readers + [mlp.shared_expert_gate.weight]
        writers += shared_writers
    return readers, writers


@torch.no_grad()
def rotate_heads(attn, fam: Family, Hh: torch.Tensor) -> None:
    """R2 on one attention module: `W_v ← blockdiag(Hhᵀ) W_v` per kv head (`b_v ← b_v blockdiag(Hh)`),
    `W_o ← W_o blockdiag(Hh)` over the query heads. `Hh` `(d, d)` float64."""
    d, v, o = fam.head_dim, attn.v_proj, attn.o_proj
    Hh = Hh.to(v.weight.device)
    W_v = v.weight.double().view(fam.kv_heads, d, -1)                       # (kv, d, H)
    v.weight.copy_((Hh.T @ W_v).reshape(v.weight.shape))
    if v.bias is not None:
        v.bias.copy_((v.bias.double().view(fam.kv_heads, d) @ Hh).reshape(-1))
    W_o = o.weight.double().view(o.weight.shape[0], fam.heads, d)           # (H, heads, d)
    o.weight.copy_((W_o @ Hh.to(o.weight.device)).reshape(o.weight.shape))


@torch.no_grad()
def fold_and_rotate_block(block, fam: Family, Q: Optional[torch.Tensor] = None,
                          Hh: Optional[torch.Tensor] = None) -> None:
    """One decoder layer, in place: fold `input_layernorm` into q/k/v and `post_attention_layernorm`
    into the MLP's readers (gate/up, router, each expert's gate/up, a shared expert and its gate), set
    both to 1; with `Q` `(hidden, hidden)` rotate readers `W ← W Q` and writers `W ← Qᵀ W`, `b ← b Q`
    (R1); with `Hh` `(head_dim, head_dim)` rotate v and o per head (R2). Both float64 orthogonal."""
    for M, width, what in ((Q, fam.hidden, "residual"), (Hh, fam.head_dim, "head")):
        if M is not None and tuple(M.shape) != (width, width):
            raise InputError(f"the {what} rotation is {tuple(M.shape)}, the {what} is {width} wide")
    attn, mlp = block.self_attn, block.mlp
    g_attn, g_mlp = block.input_layernorm.weight, block.post_attention_layernorm.weight
    mlp_readers, mlp_writers = _readers_writers(mlp)
    for W in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
        _read(W, g_attn, Q)
    for W in mlp_readers:
        _read(W, g_mlp, Q)
    if Q is not None:
        for W, b in [(attn.o_proj.weight, attn.o_proj.bias)] + mlp_writers:
            _write(W, b, Q)
    g_attn.fill_(1)
    g_mlp.fill_(1)
    if Hh is not None:
        rotate_heads(attn, fam, Hh)


def _tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def _untie(model) -> None:
    """Give `lm_head` its own parameter (a copy) and record in the config that it is not tied."""
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for cfg in configs:
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied_keys, dict):
        tied_keys.pop("lm_head.weight", None)


def _ones(g: torch.Tensor) -> bool:
    return g.device.type != "meta" and bool(torch.all(g == 1))


@torch.no_grad()
def rotate_front(model, Q: torch.Tensor) -> bool:
    """R1 on the embeddings, `E ← E Q` (`Q` `(hidden, hidden)` float64). When `lm_head` is tied to them
    and the final norm is not all ones (or not loaded), unties it first: folding that norm will make the
    head differ. Returns whether it untied. Call before `fold_and_rotate_head`."""
    untie = _tied(model) and not _ones(model.model.norm.weight)
    if untie:
        _untie(model)
    E = model.model.embed_tokens.weight
    E.copy_(E.double() @ Q.to(E.device))
    return untie


@torch.no_grad()
def fold_and_rotate_head(model, Q: Optional[torch.Tensor] = None) -> bool:
    """The final norm folded into `lm_head` and set to 1, then `W_head ← W_head Q` (when `Q` is given):
    `W_head ← W_head diag(g) Q`. A head still tied to the embeddings was rotated with them by
    `rotate_front` (the norm is then all ones); without `Q`, a tied head is untied when the norm is not
    all ones. Returns whether it untied."""
    g, untied = model.model.norm.weight, False
    if _tied(model) and not _ones(g):
        if Q is not None:
            raise InputError("lm_head is tied to the embeddings and model.norm is not all ones: "
                             "call rotate_front first (it unties the head)")
        _untie(model)
        untied = True
    if not _tied(model):
        _read(model.lm_head.weight, g, Q)
    g.fill_(1)
    return untied


def fold_norms(model) -> bool:
    """Fold every RMSNorm into the linears reading it (no rotation), in place; returns whether the head
    was untied from the embeddings."""
    fam = family(model)
    for block in model.model.layers:
        fold_and_rotate_block(block, fam)
    return fold_and_rotate_head(model)


def rotate_model(model, residual: Optional[str] = "hadamard", heads: Optional[str] = "hadamard", seed: int = 0) -> dict:
    """Fold the norms and rotate `model` in place: R1 `residual_rotation(hidden, residual, seed)` unless
    `residual` is None and, unless `heads` is None, R2 `head_rotation(head_dim, heads, seed)`. Refuses
    (InputError, nothing changed) models `check_rotatable` refuses. Returns the report: `residual`,
    `residual_description`, `heads`, `heads_description`, `seed`, `untied`."""
    r = Rotator.plan(model, residual, heads, seed)
    r.front(model)
    for block in model.model.layers:
        r.block(block)
    r.report["untied"] = fold_and_rotate_head(model, r.Q) or r.report["untied"]
    return r.report


@dataclass
class Rotator:
    """The rotations of one run, applied piece by piece where a streamed run reads the weights: `front`
    after the embeddings are read, `block` after each block is read, `head` whenever the modules outside the
    blocks are read again (to score the evaluation, to write them). `report` is `rotate_model`'s."""

    fam: Family
    Q: Optional[torch.Tensor]
    Hh: Optional[torch.Tensor]
    report: dict
    tied: bool = False                          # the head was the embeddings when the run began

    @classmethod
    def plan(cls, model, residual: Optional[str], heads: Optional[str], seed: int = 0) -> "Rotator":
        """The matrices `rotate_model(model, residual, heads, seed)` would use (`model` may be on the meta
        device); refuses what `check_rotatable` refuses."""
        fam = family(model)
        Q, description = residual_rotation(fam.hidden, residual, seed) if residual is not None else (None, None)
        Hh, head_description = head_rotation(fam.head_dim, heads, seed) if heads is not None else (None, None)
        return cls(fam, Q, Hh, {"residual": residual, "residual_description": description, "heads": heads,
                                "heads_description": head_description, "seed": seed, "untied": False}, _tied(model))

    def front(self, model) -> None:
        """The head untied from the embeddings where folding the final norm makes it differ (decided once,
        from the tie the model was built with: a streamed run's reads give every tensor its own parameter),
        then `E ← E Q`."""
        if self.tied and not self.report["untied"] and not _ones(model.model.norm.weight):
            _untie(model)
            self.report["untied"] = True
        if self.Q is not None:
            rotate_front(model, self.Q)

    def block(self, block) -> None:
        fold_and_rotate_block(block, self.fam, self.Q, self.Hh)

    def head(self, model) -> None:
        """The embeddings, final norm and head as read from the checkpoint, rotated as `rotate_model` does."""
        self.front(model)
        self.report["untied"] = fold_and_rotate_head(model, self.Q) or self.report["untied"]

"""The GPTQ ("gptq", v1) packed checkpoint format.

GPTQ v1 layout, per quantized linear with `m` outputs, `n` inputs and `G` groups (the layout that
transformers, vLLM and GPTQModel load as `quant_method: gptq`, `checkpoint_format: gptq`):

    <module>.qweight  int32   (n·bits/32, m)   codes, packed along the input dimension
    <module>.qzeros   int32   (G, m·bits/32)   zero points minus one, packed along the output dimension
    <module>.scales   float16 (G, m)
    <module>.g_idx    int32   (n,)             the group of each input column
    <module>.bias     (when the module has one)

Packing reads each run of 32 values as one little-endian bit stream of `32·bits` bits: value `i`
occupies bits `[bits·i, bits·(i+1))`, so word `k` holds bits `[32k, 32k + 32)`. For 2, 4 and 8 bits a
word holds `32/bits` whole values; for 3 bits 32 values fill 3 words and values 10 and 21 straddle a
word boundary. The dequantized weight is `W[:, j] = scales[g_idx[j]] · (codes[:, j] − zeros[g_idx[j]])`.

v1 stores `zero − 1`; a zero point of 0 is stored as `2^bits − 1` and read back here modulo `2^bits`.
Loaders that add one without wrapping read it as `2^bits`, so `save_quantized` shifts such groups to
zero 1 (codes + 1) whenever no code of the group is already `2^bits − 1`, which leaves the weights
unchanged, and warns about any group it cannot shift.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Optional

import torch

from ..errors import InputError
from ..experts import routers
from ..grid import QuantSpec
from .base import Format, as_module_weight, is_conv1d, layer_shape, load_packed, save_config, write_json

log = logging.getLogger("ojbkq")

GPTQ_BITS = (2, 3, 4, 8)


# --- bit packing ----------------------------------------------------------------------------------

def _check_bits(bits: int) -> int:
    if bits not in GPTQ_BITS:
        raise InputError(f"bits={bits!r}: the gptq format packs {', '.join(map(str, GPTQ_BITS))} bits; "
                         f"use one of those or the fake (dequantized) format")
    return bits


def _slots(bits: int):
    """For each of the 32 values of a run: (word, shift, spill) — the value starts at bit `shift` of
    `word` and its top `spill` bits continue at bit 0 of `word + 1`."""
    out = []
    for i in range(32):
        start = bits * i
        word, shift = divmod(start, 32)
        out.append((word, shift, max(0, shift + bits - 32)))
    return out


def pack_dim0(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `x` `(k, c)` integers in `[0, 2^bits)` along dim 0 into int32 `(k·bits/32, c)`."""
    _check_bits(bits)
    k, c = x.shape
    if (k * bits) % 32:
        raise InputError(f"cannot pack {k} values of {bits} bits into whole 32-bit words "
                         f"(need a multiple of {32 // math.gcd(32, bits)})")
    if 32 % bits == 0:                     # whole values per word: one shifted OR per slot, in int32
        per = 32 // bits
        xs = x.to(torch.int32).view(k // per, per, c)
        words = xs[:, 0].clone()
        for i in range(1, per):
            words |= xs[:, i] << (bits * i)
        return words
    x = x.to(torch.int64)
    runs = -(-k // 32)
    xp = torch.zeros(runs * 32, c, dtype=torch.int64, device=x.device)
    xp[:k] = x
    xp = xp.view(runs, 32, c)
    words = torch.zeros(runs, bits, c, dtype=torch.int64, device=x.device)
    mask32 = 0xFFFFFFFF
    for i, (w, s, spill) in enumerate(_slots(bits)):
        words[:, w] |= (xp[:, i] << s) & mask32
        if spill:
            words[:, w + 1] |= xp[:, i] >> (bits - spill)
    words = words.reshape(runs * bits, c)[: k * bits // 32]
    words = torch.where(words >= 2**31, words - 2**32, words)     # two's complement in int32
    return words.to(torch.int32)


def unpack_dim0(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_dim0`: int32 `(k·bits/32, c)` → int64 `(k, c)`."""
    _check_bits(bits)
    rows, c = words.shape
    if rows * 32 != k * bits:
        raise InputError(f"packed tensor has {rows} rows; {k} values of {bits} bits need {k * bits / 32:g}")
    runs = -(-k // 32)
    w64 = torch.zeros(runs * bits, c, dtype=torch.int64)
    w64[:rows] = words.to(torch.int64) & 0xFFFFFFFF
    w64 = w64.view(runs, bits, c)
    mask = (1 << bits) - 1
    out = torch.empty(runs, 32, c, dtype=torch.int64)
    for i, (w, s, spill) in enumerate(_slots(bits)):
        v = w64[:, w] >> s
        if spill:
            v = v | (w64[:, w + 1] << (bits - spill))
        out[:, i] = v & mask
    return out.reshape(runs * 32, c)[:k]


def pack(codes: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ v1 packing of one layer.

    `codes` `(m, n)` integers in `[0, 2^bits)`; `zeros` `(m, G)` integer-valued in `[0, 2^bits)`.
    Returns `qweight` int32 `(n·bits/32, m)` and `qzeros` int32 `(G, m·bits/32)` holding `zero − 1`
    modulo `2^bits`.
    """
    _check_bits(bits)
    maxq = 2**bits - 1
    if codes.ndim != 2 or zeros.ndim != 2 or zeros.shape[0] != codes.shape[0]:
        raise InputError(f"pack: codes (m, n) and zeros (m, n_groups) expected, got {tuple(codes.shape)} "
                         f"and {tuple(zeros.shape)}")
    codes = codes.detach()
    zeros = zeros.detach().to(codes.device)
    if codes.is_floating_point():
        if not torch.equal(codes, codes.round()):
            raise InputError("pack: codes must be integers")
    if zeros.is_floating_point() and not torch.equal(zeros, zeros.round()):
        raise InputError("pack: zeros must be integer-valued")
    codes, zeros = codes.round().to(torch.int64), zeros.round().to(torch.int64)
    for name, t in (("codes", codes), ("zeros", zeros)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > maxq):
            raise InputError(f"pack: {name} lie in [{int(t.min())}, {int(t.max())}], outside [0, {maxq}] "
                             f"for {bits} bits")
    qweight = pack_dim0(codes.T.contiguous(), bits)
    qzeros = pack_dim0(((zeros - 1) & maxq).contiguous(), bits).T.contiguous()
    return qweight, qzeros


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: codes int64 `(m, n)` and zeros int64 `(m, G)`."""
    maxq = 2**bits - 1
    if qweight.shape[1] != m:
        raise InputError(f"unpack: qweight {tuple(qweight.shape)} has {qweight.shape[1]} columns, expected m={m}")
    codes = unpack_dim0(qweight.cpu(), bits, n).T.contiguous()
    zeros = (unpack_dim0(qzeros.cpu().T.contiguous(), bits, m) + 1) & maxq
    return codes, zeros


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """`scales[:, g_idx] · (codes − zeros[:, g_idx])` in float32, `(m, n)`; `scales`, `zeros` `(m, G)`."""
    g = g_idx.long()
    return scales.float()[:, g] * (codes.float() - zeros.float()[:, g])



def check_packable(model, names, bits: int) -> None:
    """Raise `InputError` before any work when a module in `names` cannot be stored in the gptq format
    with `bits` (both its input and output sizes times `bits` must fill whole 32-bit words)."""
    _check_bits(bits)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise InputError(f"layer '{name}' is not a module of {type(model).__name__}")
        m, n = layer_shape(name, modules[name])
        for what, k in (("inputs", n), ("outputs", m)):
            if (k * bits) % 32:
                raise InputError(f"layer '{name}': {k} {what} × {bits} bits do not fill whole 32-bit words, so "
                                 f"the gptq format cannot store it; add it to quant.skip or use output.format=fake")


# --- the checkpoint -------------------------------------------------------------------------------

def _v1_zeros(codes: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, maxq: int):
    """Shift groups whose zero point is 0 to zero 1 (codes + 1) when that stays in range; returns
    `(codes, zeros, unshiftable)` — the count of (row, group) pairs still at zero 0."""
    at0 = zeros == 0
    if not bool(at0.any()):
        return codes, zeros, 0
    m, n = codes.shape
    idx = g_idx.long().view(1, n).expand(m, n)
    gmax = torch.full_like(zeros, -1).scatter_reduce(1, idx, codes, reduce="amax")
    shift = at0 & (gmax < maxq)
    codes = codes + shift.gather(1, idx).long()
    zeros = torch.where(shift, torch.ones_like(zeros), zeros)
    return codes, zeros, int((at0 & ~shift).sum())


def _gptq_tensors(name: str, module, res, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """The layer's packed tensors (on the CPU), computed on a GPU when there is one."""
    m, n = layer_shape(name, module)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    codes = res.codes.detach().to(dev).round().long()
    zeros = res.zeros.detach().to(dev).round().long()
    scales = res.scales.detach().to(dev).float()
    g_idx = res.g_idx.detach().to(dev).long()
    if tuple(codes.shape) != (m, n):
        raise InputError(f"layer '{name}': codes {tuple(codes.shape)} do not match the module's (out, in) = {(m, n)}")
    G = scales.shape[1]
    if tuple(zeros.shape) != (m, G) or scales.shape[0] != m or tuple(g_idx.shape) != (n,):
        raise InputError(f"layer '{name}': scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, g_idx "
                         f"{tuple(g_idx.shape)} do not fit (m, n_groups) and (n,) for (m, n) = {(m, n)}")
    expect = 1 if group_size == -1 else -(-n // group_size)
    if G != expect or int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
        raise InputError(f"layer '{name}': {G} groups with g_idx in [{int(g_idx.min())}, {int(g_idx.max())}]; "
                         f"group_size={group_size} over n={n} needs {expect}")
    maxq = 2**bits - 1
    codes, zeros, stuck = _v1_zeros(codes, zeros, g_idx, maxq)
    if stuck:
        log.warning("layer %s: %d (row, group) zero points are 0 with a code at %d; the gptq v1 format "
                    "stores them as %d, which loaders without wrap-around read as %d", name, stuck, maxq, maxq,
                    maxq + 1)
    scales16 = scales.to(torch.float16)
    if not torch.isfinite(scales16).all() or bool(((scales16 == 0) & (scales != 0)).any()):
        raise InputError(f"layer '{name}': scales in [{float(scales.min()):.3g}, {float(scales.max()):.3g}] "
                         f"do not fit float16; use the fake format")
    try:
        qweight, qzeros = pack(codes, zeros, bits)
    except InputError as exc:
        raise InputError(f"layer '{name}': {exc}; leave it in full precision (quant.skip) or use the fake "
                         f"format") from None
    return {f"{name}.qweight": qweight.cpu(), f"{name}.qzeros": qzeros.cpu(),
            f"{name}.scales": scales16.T.contiguous().cpu(), f"{name}.g_idx": g_idx.to(torch.int32).cpu()}


def _block_layout(model, quantized: set[str]) -> dict:
    """Config entries naming the linear modules inside repeated blocks that stay in full precision:
    GPTQModel's `dynamic` (`"-:<regex>"` skips a module) and, when every block quantizes the same
    modules, `block_name_to_quantize` / `modules_in_block_to_quantize`."""
    pat = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
    blocks: dict[str, dict[str, set]] = {}
    skipped = []
    linear = routers(model)                       # mixture-of-experts routers: linear layers in vLLM
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) or is_conv1d(mod) or name in linear):
            continue
        mt = pat.match(name)
        if not mt:
            continue
        if name not in quantized:
            skipped.append(name)
        prefix, idx, rel = mt.groups()
        blocks.setdefault(prefix, {}).setdefault(idx, set())
        if name in quantized:
            blocks[prefix][idx].add(rel)
    if not skipped:
        return {}
    out: dict[str, Any] = {"dynamic": {f"-:^{re.escape(s)}$": {} for s in sorted(skipped)}}
    used = {p: b for p, b in blocks.items() if any(b.values())}
    if len(used) == 1:
        prefix, per_block = next(iter(used.items()))
        sets = {frozenset(s) for s in per_block.values()}
        if len(sets) == 1:
            out["block_name_to_quantize"] = prefix
            out["modules_in_block_to_quantize"] = [sorted(next(iter(sets)))]
    return out


def quantization_config(quant: QuantSpec, model=None, quantized: Optional[set] = None,
                        provenance: Optional[dict] = None) -> dict:
    """The `quantization_config` of a GPTQ v1 checkpoint for `quant`; what GPTQ's keys do not hold
    (the scale rule, the skipped patterns, the `provenance`) goes to the `ojbkq` sub-dict.

    `desc_act` says whether `g_idx` orders the groups by activation: true for act-order with dynamic
    groups. With static groups the columns were decoded in activation order but each group is
    `group_size` consecutive columns (`g_idx[j] = j // group_size`), so `desc_act` is false, which every
    loader reads the same way and vLLM serves (it refuses `desc_act: true`); `ojbkq.act_order` records
    the decoding order."""
    qc = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "bits": quant.bits,
        "group_size": quant.group_size,
        "desc_act": quant.act_order and not quant.static_groups and quant.group_size != -1,
        "sym": quant.sym,
        "static_groups": quant.static_groups,
        "damp_percent": quant.damp,
        "true_sequential": quant.true_sequential,
        "lm_head": bool(quantized and "lm_head" in quantized),
        "meta": {"quantizer": [f"ojbkq:{_version()}"]},
        "ojbkq": {"scale_method": quant.scale_method, "skip": list(quant.skip),
                  **({"act_order": True} if quant.act_order else {}), **(provenance or {})},
    }
    if model is not None and quantized is not None:
        qc.update(_block_layout(model, quantized))
    return qc


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("ojbkq")
    except Exception:
        return "0"


class GPTQ(Format):
    """Packed GPTQ v1 tensors for the quantized layers, every other tensor from the model, and
    `config.json` with `quantization_config` (also written as `quantize_config.json`)."""

    name = "gptq"

    def check_quant(self, quant: QuantSpec) -> None:
        if quant.grid != "int":
            raise InputError(f"quant.grid={quant.grid}: the gptq format stores integer codes; use "
                             f"output.format=compressed-tensors (its {quant.grid}-pack-quantized layout) or fake")
        if quant.bits not in GPTQ_BITS:
            raise InputError(f"quant.bits={quant.bits}: the gptq format packs {', '.join(map(str, GPTQ_BITS))} "
                             f"bits; use one of those or output.format=fake")

    def check(self, model, layer_names, quant: QuantSpec) -> None:
        super().check(model, layer_names, quant)
        check_packable(model, layer_names, quant.bits)

    def layer_tensors(self, name: str, module, res) -> dict[str, torch.Tensor]:
        return _gptq_tensors(name, module, res, self.quant.bits, self.quant.group_size)

    def write_config(self, model, folder: str, untie: bool, provenance: dict) -> None:
        qc = quantization_config(self.quant, model, self.quantized, provenance)
        save_config(model, folder, qc, untie)
        write_json(os.path.join(folder, "quantize_config.json"), qc)

    def detect(self, config: dict) -> bool:
        qc = config.get("quantization_config") or {}
        return qc.get("quant_method") == "gptq" and qc.get("checkpoint_format", "gptq") == "gptq"

    def load(self, path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
        """`info["packed"]`: module name → its `qweight`, `qzeros`, `scales`, `g_idx` as stored."""
        model, qc, packed = load_packed(path, dtype, ("qweight", "qzeros", "scales", "g_idx"))
        for name, p in packed.items():
            if len(p) != 4:
                raise InputError(f"{path}: module {name} lacks some of qweight, qzeros, scales, g_idx")
            mod = model.get_submodule(name)
            m, n = layer_shape(name, mod)
            codes, zeros = unpack(p["qweight"], p["qzeros"], int(qc["bits"]), m, n)
            W = dequantize(codes, zeros, p["scales"].T, p["g_idx"])
            mod.weight = torch.nn.Parameter(as_module_weight(mod, W), requires_grad=False)
        model.to(device).eval()
        return model, {"quantization_config": qc, "packed": packed}

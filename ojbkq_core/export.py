"""Quantized checkpoints: the GPTQ ("gptq", v1) packed format and dequantized ("fake") weights.

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

import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any, Optional, Union

import torch

from .errors import InputError

log = logging.getLogger("ojbkq")

GPTQ_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "fake")
SAFETENSORS_METADATA = {"format": "pt"}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


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
    x = x.to(torch.int64)
    runs = -(-k // 32)
    xp = torch.zeros(runs * 32, c, dtype=torch.int64)
    xp[:k] = x
    xp = xp.view(runs, 32, c)
    words = torch.zeros(runs, bits, c, dtype=torch.int64)
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
    codes = codes.detach().cpu()
    zeros = zeros.detach().cpu()
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


# --- modules --------------------------------------------------------------------------------------

def _is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _layer_shape(name: str, module) -> tuple[int, int]:
    """`(m, n)` = (outputs, inputs) of a linear module (nn.Linear stores `(m, n)`, Conv1D `(n, m)`)."""
    w = getattr(module, "weight", None)
    if w is None or w.ndim != 2:
        raise InputError(f"layer '{name}': {type(module).__name__} has no 2-D weight; only linear layers are packed")
    if _is_conv1d(module):
        return w.shape[1], w.shape[0]
    if isinstance(module, torch.nn.Linear):
        return tuple(w.shape)
    raise InputError(f"layer '{name}': {type(module).__name__} is not nn.Linear or Conv1D")


def _as_module_weight(module, W: torch.Tensor) -> torch.Tensor:
    """A `(m, n)` weight in the module's own layout and dtype."""
    return (W.T if _is_conv1d(module) else W).contiguous().to(module.weight.dtype)


# --- writing ----------------------------------------------------------------------------------------

def _state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, one name per storage (tied weights are saved once)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.device.type == "meta":
            raise InputError(f"tensor '{k}' is on the meta device; load the model's weights before saving")
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def check_packable(model, names, bits: int) -> None:
    """Raise `InputError` before any work when a module in `names` cannot be stored in the gptq format
    with `bits` (both its input and output sizes times `bits` must fill whole 32-bit words)."""
    _check_bits(bits)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise InputError(f"layer '{name}' is not a module of {type(model).__name__}")
        m, n = _layer_shape(name, modules[name])
        for what, k in (("inputs", n), ("outputs", m)):
            if (k * bits) % 32:
                raise InputError(f"layer '{name}': {k} {what} × {bits} bits do not fill whole 32-bit words, so "
                                 f"the gptq format cannot store it; add it to quant.skip or use output.format=fake")


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
    m, n = _layer_shape(name, module)
    codes = res.codes.detach().cpu().round().long()
    zeros = res.zeros.detach().cpu().round().long()
    scales = res.scales.detach().cpu().float()
    g_idx = res.g_idx.detach().cpu().long()
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
    return {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
            f"{name}.scales": scales16.T.contiguous(), f"{name}.g_idx": g_idx.to(torch.int32)}


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: str, max_shard_size: int) -> None:
    """`model.safetensors`, or shards `model-0000i-of-0000N.safetensors` with an index, names sorted."""
    from safetensors.torch import save_file
    names = sorted(tensors)
    size = lambda k: tensors[k].numel() * tensors[k].element_size()  # noqa: E731
    shards, cur, cur_size = [], [], 0
    for k in names:
        if cur and cur_size + size(k) > max_shard_size:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(k)
        cur_size += size(k)
    shards.append(cur)
    if len(shards) == 1:
        save_file({k: tensors[k] for k in names}, os.path.join(folder, WEIGHTS_NAME), metadata=SAFETENSORS_METADATA)
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, os.path.join(folder, fname), metadata=SAFETENSORS_METADATA)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": sum(size(k) for k in names)}, "weight_map": weight_map}
    _write_json(os.path.join(folder, INDEX_NAME), index)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _block_layout(model, quantized: set[str]) -> dict:
    """Config entries naming the linear modules inside repeated blocks that stay in full precision:
    GPTQModel's `dynamic` (`"-:<regex>"` skips a module) and, when every block quantizes the same
    modules, `block_name_to_quantize` / `modules_in_block_to_quantize`."""
    pat = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
    blocks: dict[str, dict[str, set]] = {}
    skipped = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) or _is_conv1d(mod)):
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


def quantization_config(quant: dict, model=None, quantized: Optional[set] = None) -> dict:
    """The `quantization_config` of a GPTQ v1 checkpoint from a `quant` section (config.py keys; any
    other keys, e.g. `objective`, `decoder`, go to the `ojbkq` sub-dict)."""
    from .grid import QUANT_DEFAULTS
    q = {**QUANT_DEFAULTS, **quant}
    known = ("bits", "group_size", "sym", "act_order", "static_groups", "damp", "true_sequential")
    qc = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "bits": int(q["bits"]),
        "group_size": int(q["group_size"]),
        "desc_act": bool(q["act_order"]),
        "sym": bool(q["sym"]),
        "static_groups": bool(q["static_groups"]),
        "damp_percent": float(q["damp"]),
        "true_sequential": bool(q["true_sequential"]),
        "lm_head": bool(quantized and "lm_head" in quantized),
        "meta": {"quantizer": [f"ojbkq:{_version()}"]},
        "ojbkq": {k: v for k, v in q.items() if k not in known},
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


def _check_target(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output {out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise InputError(f"output {out_dir}: exists and is not empty; choose another folder or overwrite it "
                         f"(output.overwrite: true)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise InputError(f"output {out_dir}: parent folder {parent} does not exist")


def _extra_path(folder: str, rel: str) -> str:
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm.startswith("..") or norm in (".", ""):
        raise InputError(f"extra file name {rel!r}: give a relative path inside the output folder")
    return os.path.join(folder, norm)


def _publish(tmp: str, out_dir: str) -> None:
    """Move the finished `tmp` folder to `out_dir`, replacing an existing one."""
    if os.path.isdir(out_dir):
        target = os.path.abspath(out_dir)
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_quantized(model, layers: dict, out_dir: str, fmt: str = "gptq", quant: Optional[dict] = None,
                   tokenizer=None, extra_files: Optional[dict[str, Union[str, bytes]]] = None,
                   overwrite: bool = False, max_shard_size: int = 4 * 2**30) -> str:
    """Write a quantized checkpoint to `out_dir` and return its path.

    `model`: the transformers model; `layers`: module name (from `model.named_modules()`) →
    `LayerResult` (`codes`, `scales`, `zeros`, `g_idx`, `qweight`, all `(m=out, n=in)` based).
    `fmt="gptq"`: packed GPTQ v1 tensors for the quantized layers, every other tensor from `model`,
    `config.json` with `quantization_config` (also written as `quantize_config.json`).
    `fmt="fake"`: `save_pretrained` with the dequantized weights `LayerResult.qweight`.
    `quant`: the config's `quant` section (plus anything to record under `quantization_config.ojbkq`).

    The folder is written under a temporary sibling name and renamed into place at the end, so an
    error or an interrupt leaves no partial `out_dir`. An existing non-empty `out_dir` is refused
    unless `overwrite`. The same inputs give byte-identical files.
    """
    if fmt not in FORMATS:
        raise InputError(f"output.format={fmt!r}: choose gptq or fake")
    out_dir = os.fspath(out_dir)
    _check_target(out_dir, overwrite)
    quant = dict(quant or {})
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise InputError(f"layer '{name}' is not a module of {type(model).__name__}")
        _layer_shape(name, modules[name])
    bits = int(quant.get("bits", 4))
    group_size = int(quant.get("group_size", -1))
    if fmt == "gptq":
        _check_bits(bits)

    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        if fmt == "gptq":
            _save_gptq(model, layers, modules, tmp, quant, bits, group_size, max_shard_size)
        else:
            _save_fake(model, layers, modules, tmp, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for rel, content in sorted((extra_files or {}).items()):
            path = _extra_path(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else bytes(content))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s checkpoint with %d quantized layers to %s", fmt, len(layers), out_dir)
    return out_dir


def _save_config(model, folder: str, quantization: Optional[dict], untie: bool) -> None:
    cfg = copy.deepcopy(model.config)
    if getattr(cfg, "architectures", None) is None:
        cfg.architectures = [type(model).__name__]
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if quantization is not None:
        cfg.quantization_config = quantization
    if untie:
        cfg.tie_word_embeddings = False
    cfg.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(folder)


def _quantized_tied(model, layers) -> bool:
    """Whether a quantized module's weight shares storage with a tensor that stays in full precision."""
    sd = model.state_dict()
    qptr = {sd[f"{n}.weight"].untyped_storage().data_ptr() for n in layers if f"{n}.weight" in sd}
    return any(v.untyped_storage().data_ptr() in qptr for k, v in sd.items()
               if k.endswith(".weight") and k[: -len(".weight")] not in layers)


def _save_gptq(model, layers, modules, folder, quant, bits, group_size, max_shard_size) -> None:
    quant = {**quant, "bits": bits, "group_size": group_size}
    untie = _quantized_tied(model, layers)
    tensors = {k: v for k, v in _state_dict(model).items()
               if not (k.endswith(".weight") and k[: -len(".weight")] in layers)}
    if untie:  # the full-precision twin of a quantized tied weight
        for n in layers:
            tensors.pop(f"{n}.weight", None)
    for name in sorted(layers):
        tensors.update(_gptq_tensors(name, modules[name], layers[name], bits, group_size))
    _write_safetensors(tensors, folder, max_shard_size)
    qc = quantization_config(quant, model, set(layers))
    _save_config(model, folder, qc, untie)
    _write_json(os.path.join(folder, "quantize_config.json"), qc)


def _save_fake(model, layers, modules, folder, max_shard_size) -> None:
    sd = _state_dict(model)
    untie = _quantized_tied(model, layers)
    for name, res in layers.items():
        m, n = _layer_shape(name, modules[name])
        Q = res.qweight.detach().cpu()
        if tuple(Q.shape) != (m, n):
            raise InputError(f"layer '{name}': qweight {tuple(Q.shape)} does not match (out, in) = {(m, n)}")
        sd[f"{name}.weight"] = _as_module_weight(modules[name], Q)
    _write_safetensors(sd, folder, max_shard_size)
    _save_config(model, folder, None, untie)


# --- reading ----------------------------------------------------------------------------------------

def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (`model.safetensors` or its shards)."""
    from safetensors.torch import load_file
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        files = [WEIGHTS_NAME]
    else:
        raise InputError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    out = {}
    for fname in files:
        try:
            out.update(load_file(os.path.join(path, fname)))
        except Exception as exc:
            raise InputError(f"{os.path.join(path, fname)}: cannot read safetensors ({exc})") from None
    return out


def _model_class(config):
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in arch or "LMHead" in arch:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_quantized(path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """Load a folder written by `save_quantized` (or any GPTQ v1 checkpoint of a transformers model)
    with the dequantized weights `scales[g_idx] · (codes − zeros[g_idx])`.

    Returns `(model, info)`: `info["quantization_config"]` (or None for dequantized checkpoints) and
    `info["packed"]`: module name → its `qweight`, `qzeros`, `scales`, `g_idx` as stored.
    `dtype`: the model's dtype (default: the config's, else float32).
    """
    import transformers
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{path}: not a checkpoint folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if qc is not None and (qc.get("quant_method") != "gptq" or qc.get("checkpoint_format", "gptq") != "gptq"):
        raise InputError(f"{path}: quantization_config is {qc.get('quant_method')!r}/"
                         f"{qc.get('checkpoint_format')!r}; this loader reads gptq (v1) checkpoints")
    if dtype is None:
        dtype = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
        dtype = dtype or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, torch.float32)
    cls = _model_class(config)
    model = (cls._from_config(config, dtype=dtype) if hasattr(cls, "_from_config")
             else cls.from_config(config, dtype=dtype))
    tensors = read_tensors(path)
    qnames = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if qnames and qc is None:
        raise InputError(f"{path}: packed tensors ({qnames[0]}.qweight) but no quantization_config in config.json")
    packed = {}
    for name in qnames:
        packed[name] = {s: tensors.pop(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")
                        if f"{name}.{s}" in tensors}
        if len(packed[name]) != 4:
            raise InputError(f"{path}: module {name} lacks some of qweight, qzeros, scales, g_idx")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise InputError(f"{path}: tensors the model does not have: {', '.join(result.unexpected_keys[:5])}")
    sd = model.state_dict()
    loaded_ptrs = {sd[k].untyped_storage().data_ptr() for k in tensors}
    qweights = {f"{n}.weight" for n in qnames}
    missing = [k for k in result.missing_keys
               if k not in qweights and sd[k].untyped_storage().data_ptr() not in loaded_ptrs]
    if missing:
        raise InputError(f"{path}: missing tensors: {', '.join(missing[:5])}")
    modules = dict(model.named_modules())
    for name in qnames:
        if name not in modules:
            raise InputError(f"{path}: packed module {name} is not part of {type(model).__name__}")
        mod = modules[name]
        m, n = _layer_shape(name, mod)
        p = packed[name]
        codes, zeros = unpack(p["qweight"], p["qzeros"], int(qc["bits"]), m, n)
        W = dequantize(codes, zeros, p["scales"].T, p["g_idx"])
        mod.weight = torch.nn.Parameter(_as_module_weight(mod, W), requires_grad=False)
    model.to(device).eval()
    return model, {"quantization_config": qc, "packed": packed}

"""Quantized checkpoints: `save_quantized` writes one in a registered format, `load_quantized` reads
one back in whichever registered format its `config.json` names.

Each format is a `Format` (base.py) in a module of its own — `gptq` (packed GPTQ v1), `fake`
(dequantized weights) — registered by name through the plugin hook `register_formats`, the way
decoders are; a plugin adds a format by registering its class.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Mapping, Optional, Union

import torch

from ..errors import InputError
from ..grid import QuantSpec
from .base import (MAX_SHARD_BYTES, Format, ShardWriter, check_target, extra_path, layer_shape, publish, read_config,
                   read_tensors, remove_leftovers, temporary_folder, write_safetensors)
from .gptq import GPTQ_BITS, check_packable, dequantize, pack, pack_dim0, quantization_config, unpack, unpack_dim0

log = logging.getLogger("ojbkq")

__all__ = ["Format", "GPTQ_BITS", "MAX_SHARD_BYTES", "ShardWriter", "as_quant", "check_packable", "dequantize",
           "find_format", "get_format", "layer_shape",
           "load_quantized", "pack", "pack_dim0", "quantization_config", "read_tensors", "save_quantized", "unpack",
           "unpack_dim0", "write_safetensors"]


def get_format(name: str) -> Format:
    """The registered format called `name` (InputError naming the choices otherwise)."""
    from ..registry import get_registry
    return get_registry().format(name)()


def find_format(config: dict, path: str = "") -> Format:
    """The registered format whose `detect` accepts a checkpoint's `config.json` (as a dict)."""
    from ..registry import get_registry
    for entry in get_registry().formats.values():
        fmt = entry.obj()
        if fmt.detect(config):
            return fmt
    qc = config.get("quantization_config") or {}
    raise InputError(f"{path}: quantization_config is {qc.get('quant_method')!r}/{qc.get('checkpoint_format')!r}; "
                     f"no registered format reads it (formats: {', '.join(get_registry().formats)})")


def as_quant(quant: Union[None, QuantSpec, Mapping]) -> tuple[QuantSpec, dict]:
    """`(QuantSpec, provenance)` from a `QuantSpec` or a mapping of `quant` keys; a mapping's other keys
    (e.g. `objective`, `decoder`) are the provenance a format records beside the grid."""
    if quant is None:
        return QuantSpec(), {}
    if isinstance(quant, QuantSpec):
        return quant, {}
    known = {k: v for k, v in quant.items() if k in QuantSpec.KEYS}
    return QuantSpec(**known), {k: v for k, v in quant.items() if k not in QuantSpec.KEYS}


def save_quantized(model, layers: dict, out_dir: str, fmt: str = "gptq", quant: Union[None, QuantSpec, Mapping] = None,
                   tokenizer=None, extra_files: Optional[dict[str, Union[str, bytes]]] = None,
                   overwrite: bool = False, max_shard_size: int = MAX_SHARD_BYTES, provenance: Optional[dict] = None) -> str:
    """Write a quantized checkpoint to `out_dir` and return its path.

    `model`: the transformers model; `layers`: module name (from `model.named_modules()`) →
    `LayerResult` (`codes`, `scales`, `zeros`, `g_idx`, `qweight`, all `(m=out, n=in)` based).
    `fmt`: a registered format name (`gptq`: packed GPTQ v1 with `quantization_config`; `fake`:
    the dequantized weights `LayerResult.qweight`). `quant`: the run's `QuantSpec` (or a mapping of its
    keys, see `as_quant`); `provenance`: what the format records about how the codes were found (the
    objective and decoder). `tokenizer` and `extra_files` (relative name → text or bytes) are written
    beside the weights.

    The folder is written under a temporary sibling name and renamed into place at the end (`publish`),
    so an error, an interrupt or a kill leaves the previous `out_dir` or none, never a partial one; the
    temporary siblings of killed runs are removed first (`remove_leftovers`). An existing non-empty
    `out_dir` is refused unless `overwrite`. The same inputs give byte-identical files.
    """
    form = get_format(fmt)
    out_dir = os.fspath(out_dir)
    check_target(out_dir, overwrite)
    quant, given = as_quant(quant)
    provenance = {**given, **(provenance or {})}
    form.check(model, list(layers), quant)
    for path in remove_leftovers(out_dir):
        log.info("removed %s, left by a run that was killed", path)

    tmp = temporary_folder(out_dir)
    try:
        form.save(model, layers, tmp, quant, max_shard_size, provenance)
        write_extra(tmp, tokenizer, extra_files)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s checkpoint with %d quantized layers to %s", fmt, len(layers), out_dir)
    return out_dir


def write_extra(folder: str, tokenizer=None, extra_files: Optional[dict[str, Union[str, bytes]]] = None) -> None:
    """The files beside the weights: the tokenizer's, and `extra_files` (relative name → text or bytes)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for rel, content in sorted((extra_files or {}).items()):
        path = extra_path(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else bytes(content))


def load_quantized(path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """Load a folder written by `save_quantized` (or any checkpoint of a transformers model in a
    registered format, e.g. GPTQ v1) with dequantized weights.

    Returns `(model, info)`: `info["quantization_config"]` (None for dequantized checkpoints) and
    `info["packed"]`: module name → the packed tensors as stored (gptq: `qweight`, `qzeros`,
    `scales`, `g_idx`). `dtype`: the model's dtype (default: the config's, else float32).
    """
    path = os.fspath(path)
    return find_format(read_config(path), path).load(path, device, dtype)

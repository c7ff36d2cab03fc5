"""The "fake" format: a plain transformers checkpoint whose quantized layers hold their dequantized
weights (`LayerResult.qweight`), readable by any loader; no `quantization_config`."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from .base import (Format, as_module_weight, empty_model, layer_shape, load_state, quantized_tied, read_tensors,
                   save_config, state_dict, write_safetensors)


class Fake(Format):
    name = "fake"

    def save(self, model, layers: dict, folder: str, quant, max_shard_size: int, provenance: dict) -> None:
        modules = dict(model.named_modules())
        sd = state_dict(model)
        untie = quantized_tied(model, layers)
        for name, res in layers.items():
            m, n = layer_shape(name, modules[name])
            Q = res.qweight.detach().cpu()
            if tuple(Q.shape) != (m, n):
                raise InputError(f"layer '{name}': qweight {tuple(Q.shape)} does not match (out, in) = {(m, n)}")
            sd[f"{name}.weight"] = as_module_weight(modules[name], Q)
        write_safetensors(sd, folder, max_shard_size)
        save_config(model, folder, None, untie)

    def detect(self, config: dict) -> bool:
        return not config.get("quantization_config")

    def load(self, path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
        model, qc = empty_model(path, dtype)
        tensors = read_tensors(path)
        packed = sorted(k for k in tensors if k.endswith(".qweight"))
        if packed:
            raise InputError(f"{path}: packed tensors ({packed[0]}) but no quantization_config in config.json")
        load_state(model, tensors, path)
        model.to(device).eval()
        return model, {"quantization_config": None, "packed": {}}

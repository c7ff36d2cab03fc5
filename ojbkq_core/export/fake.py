"""The "fake" format: a plain transformers checkpoint whose quantized layers hold their dequantized
weights (`LayerResult.qweight`), readable by any loader; no `quantization_config`."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from .base import Format, as_module_weight, empty_model, layer_shape, load_state, read_tensors, save_config


class Fake(Format):
    name = "fake"

    def layer_tensors(self, name: str, module, res) -> dict[str, torch.Tensor]:
        m, n = layer_shape(name, module)
        Q = res.qweight.detach().cpu()
        if tuple(Q.shape) != (m, n):
            raise InputError(f"layer '{name}': qweight {tuple(Q.shape)} does not match (out, in) = {(m, n)}")
        return {f"{name}.weight": as_module_weight(module, Q)}

    def write_config(self, model, folder: str, untie: bool, provenance: dict) -> None:
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

"""The compressed-tensors checkpoint format (`output.format: compressed-tensors`): the pack-quantized
layout llm-compressor writes and vLLM serves, made with the compressed-tensors library's own
`PackedQuantizationCompressor` and `QuantizationConfig`.

Per quantized linear with `m` outputs, `n` inputs, `G` groups and `h = 2^(bits−1)`:

    <module>.weight_packed      int32  (m, ⌈n·bits/32⌉)   codes − h, 32 values to `bits` words along the inputs
    <module>.weight_scale       dtype  (m, G)             the module's dtype
    <module>.weight_zero_point  int32  (⌈m·bits/32⌉, G)   zeros − h, packed along the outputs (asymmetric only)
    <module>.weight_shape       int64  (2,)               (m, n)

so that `W[:, j] = weight_scale[:, g(j)] · ((codes − h) − (zeros − h))[:, g(j)]` is the project's
`scales · (codes − zeros)` with `g(j) = j // group_size`. `config.json` carries `quantization_config`
with `quant_method: compressed-tensors`, `format: pack-quantized` and one config group whose `weights`
are `{num_bits, type: int, symmetric, strategy: group | channel, group_size}` (docs/interfaces.md).

FP4 grids (`quant.grid: nvfp4 | mxfp4`) are written in the library's `nvfp4-pack-quantized` and
`mxfp4-pack-quantized` layouts, with its `NVFP4A16` and `MXFP4A16` weight schemes:

    <module>.weight_packed        uint8  (m, n/2)   two E2M1 values a byte (the library's pack_fp4_to_uint8)
    <module>.weight_scale         float8_e4m3fn (nvfp4) or uint8 E8M0 exponent (mxfp4)  (m, G)
    <module>.weight_global_scale  float32 (1,)      nvfp4 only: W = a(c) · weight_scale / weight_global_scale

What it can store: 2–8 bits; groups of `group_size` consecutive columns dividing every layer's input
size, or one group per row (`group_size: -1`, strategy channel); symmetric grids (zero point `h`, not
stored) and asymmetric ones; act-order with static groups (`actorder: static`: columns are decoded in
activation order but the groups stay consecutive). Act-order without static groups needs a map from
columns to groups (`g_idx`), which compressed-tensors no longer stores: refused before calibrating.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from ..experts import routers
from ..grid import QuantSpec
from .base import Format, as_module_weight, is_conv1d, layer_shape, load_packed, save_config

PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale")
FP4_FORMATS = {"nvfp4": ("NVFP4A16", "nvfp4-pack-quantized"), "mxfp4": ("MXFP4A16", "mxfp4-pack-quantized")}


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise InputError("output.format=compressed-tensors: the compressed-tensors library is not installed; "
                         "pip install 'ojbkq[compressed-tensors]' (or choose output.format=gptq)") from None
    import compressed_tensors.compressors as compressors
    import compressed_tensors.quantization as quantization
    return compressors, quantization


def scheme(quant: QuantSpec, ignore: list[str]):
    """The library's `QuantizationConfig` for `quant`: one group targeting `Linear` modules, the linear
    modules kept in full precision listed in `ignore`."""
    _, q = _library()
    if quant.grid in FP4_FORMATS:
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
        preset, fmt = FP4_FORMATS[quant.grid]
        group = q.QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
        return q.QuantizationConfig(config_groups={"group_0": group}, format=fmt,
                                    quantization_status="compressed", ignore=ignore)
    group_size = quant.group_size
    weights = q.QuantizationArgs(
        num_bits=quant.bits, type="int", symmetric=quant.sym,
        strategy="group" if group_size > 0 else "channel", group_size=group_size if group_size > 0 else None,
        actorder="static" if quant.act_order else None)
    group = q.QuantizationScheme(targets=["Linear"], weights=weights)
    return q.QuantizationConfig(config_groups={"group_0": group}, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)


def quantization_config(quant: QuantSpec, ignore: list[str]) -> dict:
    """The `quantization_config` of config.json, as the library's `ModelCompressor.update_config`
    writes it (its version, method and the config's fields)."""
    import compressed_tensors
    from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_METHOD, QUANTIZATION_METHOD_NAME,
                                         SPARSITY_CONFIG_NAME, TRANSFORM_CONFIG_NAME)
    qcfg = scheme(quant, ignore)
    return {COMPRESSION_VERSION_NAME: compressed_tensors.__version__, QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
            SPARSITY_CONFIG_NAME: {}, TRANSFORM_CONFIG_NAME: {}, **qcfg.model_dump(exclude=["quant_method"])}


def _ignored(model, quantized) -> list[str]:
    """The linear modules that stay in full precision (the library's targets are all `Linear`), and the
    routers of mixture-of-experts blocks, which vLLM builds as linear layers too."""
    linear = routers(model)
    return sorted(name for name, mod in model.named_modules()
                  if (isinstance(mod, torch.nn.Linear) or name in linear) and name not in quantized)


def _compressed(name: str, module, res, scheme_, quant: QuantSpec) -> dict[str, torch.Tensor]:
    """The library's compressed tensors of one layer, named `<module>.<tensor>`."""
    compressors, _ = _library()
    m, n = layer_shape(name, module)
    if quant.grid in FP4_FORMATS:
        return _fp4(name, (m, n), res, quant)
    bits, group_size = quant.bits, quant.group_size
    h = 2 ** (bits - 1)
    codes = res.codes.detach().cpu().round().long()
    zeros = res.zeros.detach().cpu().round().long()
    g_idx = res.g_idx.detach().cpu().long()
    consecutive = torch.arange(n) // group_size if group_size > 0 else torch.zeros(n, dtype=torch.long)
    if tuple(codes.shape) != (m, n) or zeros.shape[0] != m or not torch.equal(g_idx, consecutive):
        raise InputError(f"layer '{name}': codes {tuple(codes.shape)}, zeros {tuple(zeros.shape)} and g_idx do not "
                         f"fit (out, in) = {(m, n)} with consecutive groups of {group_size}")
    if quant.sym and bool((zeros != h).any()):
        raise InputError(f"layer '{name}': a symmetric grid needs every zero point at {h}; quantize with "
                         f"quant.sym=false or store it in the gptq format")
    scale = res.scales.detach().cpu().to(module.weight.dtype)
    W = scale.float()[:, g_idx] * (codes - zeros[:, g_idx]).float()
    local = {"weight": W, "weight_scale": scale, "weight_zero_point": (zeros - h).to(torch.int8)}
    out = compressors.PackedQuantizationCompressor.compress(local, scheme_)
    return {f"{name}.{k}": v.contiguous() for k, v in out.items()}


def _fp4(name: str, shape: tuple, res, quant: QuantSpec) -> dict[str, torch.Tensor]:
    """An FP4 layer's tensors: its E2M1 values packed by the library, the scales in the format's type."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    m, n = shape
    g_idx = res.g_idx.detach().cpu().long()
    if (tuple(res.codes.shape) != (m, n) or res.alphabet.name != "fp4_e2m1"
            or not torch.equal(g_idx, torch.arange(n) // quant.group_size)):
        raise InputError(f"layer '{name}': codes {tuple(res.codes.shape)} on alphabet {res.alphabet.name} do not fit "
                         f"(out, in) = {(m, n)} with FP4 values in consecutive groups of {quant.group_size}")
    values = res.alphabet.value(res.codes.detach().cpu().float())
    out = {"weight_packed": pack_fp4_to_uint8(values)}
    scales = res.scales.detach().cpu().float()
    if quant.grid == "nvfp4":
        g = torch.tensor([res.global_scale], dtype=torch.float32)
        out["weight_scale"] = (scales * g).to(torch.float8_e4m3fn)
        out["weight_global_scale"] = g
    else:
        out["weight_scale"] = compress_mx_scale(scales, torch.uint8)
    return {f"{name}.{k}": v.contiguous() for k, v in out.items()}


def _fp4_weight(reader, local: dict, args) -> torch.Tensor:
    """An FP4 layer's weight in float32, by the library's unpacking, scale decoding and dequantization (its
    own `decompress` works in bfloat16)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    packed = local["weight_packed"]
    values = unpack_fp4_from_uint8(packed, packed.shape[0], 2 * packed.shape[1], dtype=torch.float32)
    scale = reader._decompress_scale(local["weight_scale"], torch.float32)
    return dequantize(x_q=values, scale=scale, args=args, global_scale=local.get("weight_global_scale"),
                      dtype=torch.float32)


class CompressedTensors(Format):
    """pack-quantized int weights with group (or channel) scales and zero points."""

    name = "compressed-tensors"

    def check_quant(self, quant: QuantSpec) -> None:
        if quant.act_order and not quant.static_groups and quant.group_size != -1:
            raise InputError("quant.act_order=true with quant.static_groups=false: groups follow the activation "
                             "order (a g_idx), which the compressed-tensors format does not store; set "
                             "quant.static_groups=true or use output.format=gptq")

    def check(self, model, layer_names, quant: QuantSpec) -> None:
        _library()                                    # a run that writes needs the library; reading a recipe does not
        super().check(model, layer_names, quant)
        group_size = quant.group_size
        modules = dict(model.named_modules())
        for name in layer_names:
            if is_conv1d(modules[name]):
                raise InputError(f"layer '{name}': a Conv1D module, which compressed-tensors loaders do not "
                                 f"target; use output.format=gptq or fake")
            m, n = layer_shape(name, modules[name])
            if group_size > 0 and n % group_size:
                raise InputError(f"layer '{name}': {n} inputs are not a multiple of quant.group_size={group_size}, "
                                 f"which the compressed-tensors format needs; choose a group size dividing {n}, "
                                 f"or add the layer to quant.skip")

    def begin(self, model, quantized: set, quant: QuantSpec) -> None:
        super().begin(model, quantized, quant)
        self.ignore = _ignored(model, self.quantized)
        self.scheme = scheme(quant, self.ignore).config_groups["group_0"]

    def layer_tensors(self, name: str, module, res) -> dict[str, torch.Tensor]:
        return _compressed(name, module, res, self.scheme, self.quant)

    def write_config(self, model, folder: str, untie: bool, provenance: dict) -> None:
        save_config(model, folder, quantization_config(self.quant, self.ignore), untie)

    def detect(self, config: dict) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"

    def load(self, path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
        """Decompress each module with the library's compressor (scales in float32).
        `info["packed"]`: module name → its stored `weight_packed`, `weight_scale`, ..."""
        compressors, q = _library()
        from compressed_tensors.utils.match import is_match
        model, qc, packed = load_packed(path, dtype, PACKED)
        cfg = q.QuantizationConfig.model_validate(qc)
        readers = {"pack-quantized": compressors.PackedQuantizationCompressor,
                   "nvfp4-pack-quantized": compressors.NVFP4PackedCompressor,
                   "mxfp4-pack-quantized": compressors.MXFP4PackedCompressor}
        if cfg.format not in readers:
            raise InputError(f"{path}: compressed-tensors format {cfg.format!r}; this loader reads "
                             f"{', '.join(readers)} checkpoints (load others with "
                             f"transformers.AutoModelForCausalLM.from_pretrained)")
        for name, local in packed.items():
            mod = model.get_submodule(name)
            groups = [s for s in cfg.config_groups.values() if is_match(name, mod, s.targets, cfg.ignore)]
            if not groups:
                raise InputError(f"{path}: module {name} is packed but no config group targets it")
            local = dict(local)
            if cfg.format == "pack-quantized":
                local["weight_scale"] = local["weight_scale"].float()
                W = compressors.PackedQuantizationCompressor.decompress(local, groups[0])["weight"]
            else:
                need = ("weight_scale", "weight_global_scale") if cfg.format.startswith("nvfp4") else ("weight_scale",)
                missing = [n for n in need if n not in local]
                if missing:
                    raise InputError(f"{path}: module {name} stores no {', '.join(missing)}, which "
                                     f"{cfg.format} needs: the checkpoint is incomplete; write it again")
                W = _fp4_weight(readers[cfg.format], local, groups[0].weights)
            mod.weight = torch.nn.Parameter(as_module_weight(mod, W), requires_grad=False)
        model.to(device).eval()
        return model, {"quantization_config": qc, "packed": packed}

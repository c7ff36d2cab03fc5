"""The Python API: a whole model in memory (or a folder) quantized, saved and loaded back.

    import ojbkq_core as oq
    q = oq.quantize(model, tokenizer, recipe="ojbkq", overrides={"quant.bits": 3}, calibration=texts)
    q.model                          # the quantized model: dequantized weights in place, ready to evaluate
    q.report                         # the run report (what `ojbkq quantize` writes as ojbkq_report.json)
    q.save("out", format="gptq")     # any registered format; the files `ojbkq quantize` writes
    m = oq.load("out")               # a folder ojbkq or GPTQModel wrote, dequantized

The same recipe, overrides and seed give the bytes `ojbkq quantize` gives.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .errors import InputError
from .layer import LayerResult
from .spec import RunSpec, load_spec


@dataclass
class Quantized:
    """A quantized model: `model` (quantized in place), its `tokenizer`, the `spec` it was quantized
    with, the run `report` and the per-layer results `layers` (full module name → `LayerResult`)."""

    model: Any
    tokenizer: Any
    spec: RunSpec
    report: dict
    layers: dict[str, LayerResult] = field(repr=False)

    def save(self, path: str, format: Optional[str] = None, overwrite: bool = False) -> str:
        """Write the checkpoint to the folder `path` in `format` (a registered format; default: the
        recipe's `output.format`), with the tokenizer, `ojbkq_config.yaml` and `ojbkq_report.json`, as
        `ojbkq quantize` does: atomically, refusing a non-empty folder unless `overwrite`. Returns `path`."""
        from .export import save_quantized
        from .model import find_adapter
        from .experts import has_experts
        from .pipeline import check_format, provenance, run_files, serving
        spec = self.spec.with_overrides({"output.dir": str(path), "output.format": format or self.spec.output.format,
                                         "output.overwrite": bool(overwrite)})
        spec.output.prepare()
        check_format(spec, self.model, find_adapter(self.model, spec.model.adapter))
        # `quantize` warned already for the recipe's own format
        serving(spec, warn=spec.output.format != self.spec.output.format, experts=has_experts(self.model))
        out = spec.output
        return save_quantized(self.model, self.layers, out.dir, out.format, quant=spec.quant, tokenizer=self.tokenizer,
                              extra_files=run_files(spec, self.report), overwrite=out.overwrite,
                              provenance=provenance(self.report))


def quantize(model, tokenizer=None, recipe: str = "ojbkq", overrides: Union[None, Mapping[str, Any], Sequence[str]] = None,
             calibration=None, progress: bool = True) -> Quantized:
    """Quantize `model` as `recipe` says.

    `model`: a transformers model in memory (quantized in place, in its own dtype and device; pass a
    copy to keep the original) or the path of a model folder (loaded as `ojbkq quantize` loads it).
    `tokenizer`: needed to read calibration text (loaded from the folder when `model` is a path).
    `recipe`: a name (`ojbkq recipes`) or a recipe file. `overrides`: the dotted keys of `--set`, as a
    mapping (`{"quant.bits": 3}`) or `"key=value"` strings. `calibration`: texts (a list of strings,
    tokenized and cut into the recipe's `calibration.samples` windows of `calibration.seqlen` tokens at
    seeded starts), token ids (`(samples, seqlen)` int tensor or list of equal-length lists), or None
    for the recipe's calibration section. The recipe's `eval` section is scored in the calibration pass as
    `ojbkq quantize` scores it (the report's `perplexity`); `eval.perplexity=[]` turns it off.
    """
    from .experts import has_experts
    from .model import find_adapter
    from .pipeline import calibrate_model, check_format, evaluation_for, load_model, perplexity_report, serving
    t0 = time.perf_counter()
    overrides = _as_mapping(overrides)
    in_memory = not isinstance(model, (str, bytes)) and not hasattr(model, "__fspath__")
    if in_memory:
        overrides.setdefault("model.path", _name_of(model))
    else:
        overrides.setdefault("model.path", str(model))
    spec = load_spec(recipe, overrides)
    if not in_memory:
        loaded, tok = load_model(spec.model.path, spec.dtype, spec.model.trust_remote_code)
        model, tokenizer = loaded, tokenizer if tokenizer is not None else tok
    ids = None if calibration is None else calibration_ids(calibration, tokenizer, spec)
    if ids is None and tokenizer is None:
        raise InputError("quantize: calibration text needs a tokenizer; pass tokenizer=..., or calibration as "
                         "token ids")
    adapter = find_adapter(model, spec.model.adapter)
    check_format(spec, model, adapter)                  # what `ojbkq quantize` checks, before any calibration
    if spec.eval.sources() and tokenizer is None:
        raise InputError("quantize: the recipe's evaluation (eval.perplexity, eval.path) needs a tokenizer; pass "
                         "tokenizer=..., or set eval.perplexity=[] and eval.path=None")
    experts = has_experts(model)
    serving(spec, warn=True, experts=experts)
    evaluation = evaluation_for(spec, model, tokenizer, adapter, main=True)
    _, res = calibrate_model(model, tokenizer, spec, input_ids=ids, progress=progress, evaluation=evaluation)
    report = {"model": spec.model.path, "architecture": type(model).__name__, **res.report,
              "serving": serving(spec, experts=experts)}
    if "perplexity" in report:
        report["perplexity"] = perplexity_report(report["perplexity"])
    report["seconds"]["run"] = time.perf_counter() - t0
    return Quantized(model, tokenizer, spec, report, res.layers)


def load(path: str, device: str = "cpu"):
    """The model in the folder `path` on `device`: a quantized checkpoint (any registered format: what
    ojbkq or GPTQModel wrote) with dequantized weights, or a plain transformers folder."""
    from .pipeline import load_dir
    return load_dir(str(path), device)[0].to(device)


def calibration_ids(calibration, tokenizer, spec: RunSpec) -> torch.Tensor:
    """Calibration windows int64 `(samples, seqlen)` from texts or token ids (see `quantize`)."""
    from .data import bos_id, random_windows, tokenize
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, torch.Tensor):
        ids = calibration
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(t, str) for t in calibration):
        if tokenizer is None:
            raise InputError("quantize: calibration texts need a tokenizer; pass tokenizer=...")
        cal = spec.calibration
        return random_windows(tokenize(tokenizer, calibration), cal.samples, cal.seqlen, cal.seed,
                              bos=bos_id(tokenizer))
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(t, (list, tuple)) for t in calibration):
        if len({len(t) for t in calibration}) != 1:
            raise InputError("quantize: calibration token ids must be lists of one length (samples, seqlen)")
        ids = torch.tensor(calibration)
    else:
        raise InputError(f"quantize: calibration={type(calibration).__name__}: give a list of texts, or token ids "
                         f"as a (samples, seqlen) tensor or list of lists")
    if ids.ndim != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise InputError(f"quantize: calibration token ids of shape {tuple(ids.shape)}, dtype {ids.dtype}: "
                         f"give integers of shape (samples, seqlen)")
    return ids.long()


def _as_mapping(overrides) -> dict:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    from .config import parse_override
    return dict(parse_override(o) for o in overrides)


def _name_of(model) -> str:
    """What a report calls an in-memory model: the folder or hub name it came from, else its class."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else type(model).__name__

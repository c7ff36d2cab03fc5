"""A whole model from a run configuration: load → calibrate → (evaluate) → export.

    quantize_from_config(CONFIG, overrides)   # `ojbkq quantize CONFIG --set k=v`
    evaluate_dir(MODEL_DIR, dataset, seqlen)  # `ojbkq eval MODEL_DIR`

The output folder holds the checkpoint (`output.format`: packed GPTQ or dequantized weights), the
tokenizer, the resolved config (`ojbkq_config.yaml`) and the run report (`ojbkq_report.json`: per-layer
losses, sampled α, timings and, with `eval.perplexity`, the perplexity of the original and the
quantized model side by side). It is written atomically; the same config and seed give the same
checkpoint files byte for byte.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional, Sequence

import torch

from . import distributed
from .calibrate import CalibrationResult, calibrate, default_batch_size, quantized_names
from .errors import InputError
from .model import Model, find_adapter

log = logging.getLogger("ojbkq")

CONFIG_FILE = "ojbkq_config.yaml"
REPORT_FILE = "ojbkq_report.json"


# --- loading -------------------------------------------------------------------------------------

def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _is_causal(config) -> bool:
    archs = " ".join(getattr(config, "architectures", None) or [])
    return any(s in archs for s in ("ForCausalLM", "LMHeadModel")) or (
        not archs and getattr(config, "is_decoder", False))


TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def check_folder(path: str) -> None:
    """A local model folder before transformers reads it: `config.json` parses and the weights are
    there with readable headers (`InputError` naming the file otherwise)."""
    from .export.base import read_config, weight_files
    read_config(path)
    weight_files(path)


def load_tokenizer(path: str, key: str = "model.path", **opts):
    """The tokenizer saved in `path`; one that does not load is an `InputError` naming the file (its
    JSON files are parsed first) or the folder."""
    import transformers

    from .export.base import read_json
    files = [n for n in TOKENIZER_JSON if os.path.isfile(os.path.join(path, n))] if os.path.isdir(path) else []
    for name in files:
        read_json(os.path.join(path, name))
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **opts)
    except Exception as exc:                      # tokenizers and sentencepiece raise their own types
        why = " ".join(str(exc).split())[:160]
        raise InputError(f"{key}={path!r}: the tokenizer ({', '.join(files) or 'no tokenizer files'}) does not "
                         f"load ({type(exc).__name__}: {why}); save one beside the model "
                         f"(tokenizer.save_pretrained)") from None


def load_model(path: str, dtype: str = "bfloat16", trust_remote_code: bool = False, key: str = "model.path"):
    """A transformers model and its tokenizer from a local folder or a hub name.

    Causal LMs (architectures `*ForCausalLM`, `*LMHeadModel`) load with `AutoModelForCausalLM`, other
    models with `AutoModel`. `dtype`: bfloat16, float16, float32 or auto (the checkpoint's).
    A hub name with `HF_HUB_OFFLINE=1`, or without a network, is an `InputError`; so is a local folder
    whose config.json, weights or tokenizer do not read (`check_folder`, `load_tokenizer`).
    """
    import transformers
    local = os.path.isdir(path)
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{key}={path!r}: the folder has no config.json; give a transformers model folder")
    if not local and (path.startswith((".", "/", "~")) or os.sep in path.strip("/").replace("/", "", 1)):
        raise InputError(f"{key}={path!r}: no such folder")
    if local:
        try:
            check_folder(path)
        except InputError as exc:
            raise InputError(f"{key}={path!r}: {exc}") from None
    opts = {"trust_remote_code": trust_remote_code}
    if local or _hub_offline():
        opts["local_files_only"] = True
    try:
        config = transformers.AutoConfig.from_pretrained(path, **opts)
    except (OSError, ValueError, KeyError) as exc:
        if local:
            raise InputError(f"{key}={path!r}: config.json is not a transformers model config "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub cannot be reached or has no such model"
        raise InputError(f"{key}={path!r}: not a local folder, and {why} ({type(exc).__name__}); "
                         f"download the model and set {key} to its folder") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    cls = transformers.AutoModelForCausalLM if _is_causal(config) else transformers.AutoModel
    try:
        model = cls.from_pretrained(path, dtype=torch_dtype, **opts)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{key}={path!r}: cannot load the model ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    tokenizer = load_tokenizer(path, key, **opts)
    model.eval()
    return model, tokenizer


# --- calibration from a config -------------------------------------------------------------------

def calibrate_model(model, tokenizer, cfg: dict, input_ids: Optional[torch.Tensor] = None,
                    progress: bool = True, world: Optional[distributed.World] = None,
                    hooks: Optional[dict] = None) -> tuple[Model, CalibrationResult]:
    """Quantize `model` in place as the resolved config `cfg` says; returns its adapter and the result.
    `input_ids` `(samples, seqlen)` replaces the calibration text when given. `world`: this process's
    place in a distributed run: it calibrates its shard of the samples through `distributed.Engine`
    (statistics in float64 unless `calibration.stats_dtype` says otherwise); rank 0's report gains
    `world_size` and `ranks`. `hooks`: steps of `calibrate` replaced in a single-process run (e.g. a
    `quantize_group` that also keeps what it quantized)."""
    from .config import build_decoder, build_grid, build_objective, resolve_device
    from .data import calibration_ids
    device = resolve_device(cfg) if world is None else world.device
    adapter = find_adapter(model, cfg["model"]["adapter"])
    stats_dtype = cfg["calibration"]["stats_dtype"]
    if stats_dtype == "auto":
        stats_dtype = "float32" if world is None else "float64"
    if input_ids is None:
        input_ids = calibration_ids(tokenizer, cfg["calibration"])
    samples, batch_size = input_ids.shape[0], default_batch_size(input_ids.shape[1], device)
    engine = None if world is None else distributed.Engine(world)
    if engine is not None:
        input_ids = engine.shard(input_ids, batch_size)
    spec, score = build_objective(cfg)
    q = cfg["quant"]
    res = calibrate(adapter, input_ids, spec, build_grid(cfg), build_decoder(cfg, device), damp=q["damp"],
                    seed=cfg["decoder"]["seed"], device=device, score_objective=score,
                    true_sequential=q["true_sequential"], skip=q["skip"], batch_size=batch_size,
                    progress=progress and (world is None or world.main), stats_dtype=getattr(torch, stats_dtype),
                    **(engine.hooks() if engine is not None else hooks or {}))
    res.report["world_size"] = 1
    if engine is not None:
        engine.annotate(res.report, samples)
    return adapter, res


def eval_sources(ev: dict) -> list[tuple[str, Optional[object]]]:
    """`(label, local path or None)` for each perplexity source of an `eval` section: the name `text`
    (added when only `eval.path` is given) reads `eval.path`, other names are datasets."""
    names = list(ev.get("perplexity") or [])
    if ev.get("path") and "text" not in names:
        names.append("text")
    return [(n, ev.get("path") if n == "text" else None) for n in names]


def _perplexities(model, tokenizer, ev: dict, device: str, tokens_cache: dict) -> dict:
    from .data import evaluation_ids
    from .perplexity import perplexity
    out = {}
    for name, path in eval_sources(ev):
        if name not in tokens_cache:
            tokens_cache[name] = evaluation_ids(tokenizer, None if path else name, path)
        out[name] = perplexity(model, tokens_cache[name], ev["seqlen"], ev.get("samples"), device=device)
    return out


# --- the two commands ----------------------------------------------------------------------------

def quantize_from_config(path: str, overrides: Sequence[str] = ()) -> dict:
    """`ojbkq quantize`: load, calibrate, evaluate (when `eval.perplexity`/`eval.path` is set) and
    export. Returns the run report (also saved as `ojbkq_report.json` beside the checkpoint).
    Started by torchrun, every rank calibrates its part (`distributed.py`) and rank 0 alone evaluates
    and writes; the other ranks return the report without `layers`."""
    from .config import load_config, resolve_device
    cfg = load_config(path, overrides)
    if not distributed.launched():
        return _quantize(cfg, None)
    world = distributed.init(resolve_device(cfg))
    if not world.main:
        log.setLevel(logging.WARNING)
    try:
        return _quantize(cfg, world)
    finally:
        distributed.close()


def _quantize(cfg: dict, world: Optional[distributed.World]) -> dict:
    from .config import dump_yaml, resolve_device
    from .export import get_format, save_quantized
    t0 = time.perf_counter()
    main = world is None or world.main
    device = resolve_device(cfg) if world is None else str(world.device)
    model, tokenizer = load_model(cfg["model"]["path"], cfg["model"]["dtype"], cfg["model"]["trust_remote_code"])
    adapter = find_adapter(model, cfg["model"]["adapter"])
    fmt = get_format(cfg["output"]["format"])
    fmt.check(model, quantized_names(adapter, cfg["quant"]["skip"]), cfg["quant"])    # before any calibration
    log.info("%s: %s with adapter %s, %d quantized layers, device %s", cfg["model"]["path"],
             type(model).__name__, adapter.name, len(adapter.layer_names()), device)

    ppl_fp, tokens_cache = {}, {}
    evaluate = main and bool(eval_sources(cfg["eval"]))
    if evaluate and not adapter.causal:
        log.warning("eval: %s is an encoder; perplexity applies to causal models only, skipped", type(model).__name__)
        evaluate = False
    if evaluate:
        ppl_fp = _perplexities(model, tokenizer, cfg["eval"], device, tokens_cache)

    _, res = calibrate_model(model, tokenizer, cfg, world=world)
    report = {"model": cfg["model"]["path"], "architecture": type(model).__name__, **res.report}
    if evaluate:
        ppl_q = _perplexities(model, tokenizer, cfg["eval"], device, tokens_cache)
        report["perplexity"] = {k: {"fp": ppl_fp[k]["perplexity"], "quantized": ppl_q[k]["perplexity"],
                                    "windows": ppl_q[k]["windows"], "seqlen": ppl_q[k]["seqlen"]} for k in ppl_q}
        for k, v in report["perplexity"].items():
            log.info("perplexity %s: fp %.4f  quantized %.4f  (%d windows of %d)", k, v["fp"], v["quantized"],
                     v["windows"], v["seqlen"])
    report["seconds"]["run"] = time.perf_counter() - t0
    if not main:
        return report
    out_cfg = cfg["output"]
    quant = {**cfg["quant"], "objective": res.report["objective"], "decoder": res.report["decoder"]}
    out = save_quantized(model, res.layers, out_cfg["dir"], out_cfg["format"], quant=quant, tokenizer=tokenizer,
                         extra_files={CONFIG_FILE: dump_yaml(cfg),
                                      REPORT_FILE: json.dumps(report, indent=2, sort_keys=False) + "\n"},
                         overwrite=out_cfg["overwrite"])
    report["output"] = out
    log.info("%d layers, objective summed %.6g, %.1fs -> %s", len(res.layers), res.report["objective_sum"],
             report["seconds"]["run"], out)
    return report


def load_dir(model_dir: str, device: str = "cpu"):
    """A model folder for evaluation: a checkpoint with a `quantization_config` in config.json through
    `load_quantized` (the registered format that detects it), anything else through `from_pretrained`."""
    from .export import load_quantized, read_config
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise InputError(f"{model_dir}: not a model folder (no config.json)")
    if read_config(model_dir).get("quantization_config"):
        model, _ = load_quantized(model_dir, device="cpu")
        tokenizer = load_tokenizer(model_dir, "MODEL_DIR", local_files_only=True)
    else:
        model, tokenizer = load_model(model_dir, "auto", key="MODEL_DIR")
    return model, tokenizer


def evaluate_dir(model_dir: str, dataset: Optional[str] = "wikitext2", seqlen: int = 2048, path=None,
                 samples: Optional[int] = None, device: str = "cpu") -> dict:
    """`ojbkq eval`: perplexity of the model in `model_dir` on `dataset` (or local files `path`)."""
    from .data import evaluation_ids
    from .perplexity import perplexity
    if not isinstance(seqlen, int) or seqlen < 2:
        raise InputError(f"--seqlen {seqlen!r}: must be an integer ≥ 2")
    model, tokenizer = load_dir(model_dir, device)
    if not _is_causal(model.config):
        raise InputError(f"{model_dir}: {type(model).__name__} is an encoder; perplexity needs a causal LM")
    label = "text" if path else dataset
    tokens = evaluation_ids(tokenizer, None if path else dataset, path)
    res = perplexity(model, tokens, seqlen, samples, device=device)
    res["dataset"] = label
    print(f"{label}: perplexity {res['perplexity']:.4f} ({res['windows']} windows of {seqlen} tokens, "
          f"{res['seconds']:.1f}s)")
    return res

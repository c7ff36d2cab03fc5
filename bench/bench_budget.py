"""The whole-matrix and the column-blocked form of one wide layer (ojbkq_core/budget.py): the memory each
holds above what was there before it started, its time, and whether the codes agree.

Each (shape, form) runs in a child process of its own: the child builds the layer's statistics, resets its
peak resident memory (`/proc/self/clear_refs`), quantizes the layer (`quantize_layer`, babai, 4 bits, groups
of 128, GPTQ's symmetric objective or, `--objective jta`, OJBKQ's) in the form asked for, and reports the peak
resident memory above its level before the call (`VmHWM − VmRSS`). On a GPU (`--device cuda`) the peak is
torch's `max_memory_allocated` above the level before the call; `peak_total_bytes` is the peak with the weight
and whatever statistics stayed on the device. `--as-engine` runs the blocked form as a run would on that
device with no block held (the budget is half its total memory): the rows the budget gives, and the statistics
moved to the host when they do not fit beside it (`statistics_on_host`). On a GPU, the 405B-shaped `down_proj`
with OJBKQ's statistics:

    python3 bench/bench_budget.py --device cuda --shapes 16384x53248 --objective jta --forms blocked --as-engine

    .venv/bin/python bench/bench_budget.py --shapes 2048x4096 2048x8192 --out bench/results/budget_cpu.json

Prints a table and writes one record per (shape, form) with the device, dtype and TF32 setting.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def child(m: int, n: int, form: str, device: str, out: str, objective: str = "symmetric",
          as_engine: bool = False) -> None:
    from ojbkq_core import budget
    from ojbkq_core.decoders import Babai
    from ojbkq_core.grid import GridSpec
    from ojbkq_core.hostmemory import host_memory_bytes
    from ojbkq_core.layer import quantize_layer
    from ojbkq_core.objectives import PRESETS, preset
    from ojbkq_core.stats import Statistics

    dev = torch.device(device)
    g = torch.Generator(dev).manual_seed(0)                   # drawn where they are used
    X = torch.randn(n + 512, n, generator=g, device=dev) * torch.logspace(0, -1, n, device=dev)
    spec = preset(objective, *PRESETS[objective])
    stats = Statistics(n, needs=spec.build(np.random.default_rng(0))[0].needs, device=dev)
    X_fp = X + 0.1 * torch.randn(X.shape, generator=g, device=dev) if stats.needs - {"H"} else None
    stats.add(X, X_fp)
    del X, X_fp
    W = torch.randn(m, n, generator=g, device=dev)
    hosted = False
    if form == "whole":
        plan = budget.WHOLE
    elif as_engine:                                          # the plan and the sums' place a run would take here
        if not budget.keeps_statistics(m, n, dev, stats.bytes_on(dev)):
            stats.move("cpu")
            hosted = True
        plan = budget.plan(m, n, dev, statistics=stats.bytes_on(dev))
        if not plan.blocked:
            raise SystemExit(f"{m}x{n} takes the whole-matrix form on {dev}: no blocked form to measure")
    else:
        plan = budget.Plan(True, budget.COLUMN_BLOCK, min(m, 1024))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        with open("/proc/self/clear_refs", "w") as f:     # the peak (VmHWM) starts again from here
            f.write("5")
        before = host_memory_bytes("VmRSS")
    t0 = time.perf_counter()
    res = quantize_layer(W, stats, spec, GridSpec(bits=4, group_size=128), Babai(), plan=plan)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        total = torch.cuda.max_memory_allocated(dev)
        peak = total - before
    else:
        total = host_memory_bytes("VmHWM")
        peak = total - before
    seconds = time.perf_counter() - t0
    torch.save({"codes": res.codes.long().cpu()}, out + ".codes")
    Path(out).write_text(json.dumps({"peak_bytes": peak, "peak_total_bytes": total, "seconds": seconds,
                                     "loss": res.loss, "square_bytes": n * n * 4, "blocked": res.report.get("blocked"),
                                     "statistics_on_host": hosted}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["2048x4096", "2048x8192"], metavar="MxN")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "budget_cpu.json"))
    ap.add_argument("--objective", default="symmetric", choices=["symmetric", "jta"],
                    help="GPTQ's objective (H only), or OJBKQ's (H, C, G and the targets W (M − H))")
    ap.add_argument("--label", default="", help="kept in each record (e.g. the revision measured)")
    ap.add_argument("--forms", default="whole,blocked", help="the forms to run, of whole,blocked")
    ap.add_argument("--as-engine", action="store_true",
                    help="the blocked form with the plan and the statistics' place (device or host) that a run "
                         "takes on this device (budget.plan, budget.keeps_statistics), not a fixed 1024 rows")
    ap.add_argument("--child", nargs=4, metavar=("M", "N", "FORM", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = set(args.forms.split(",")) - {"whole", "blocked"}
    if bad:
        ap.error(f"--forms {args.forms}: unknown {', '.join(sorted(bad))}; give whole, blocked or whole,blocked")
    for shape in args.shapes:
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", shape):
            ap.error(f"--shapes {shape}: give rows x columns, e.g. 4096x8192")
    if args.child:
        m, n, form, out = args.child
        child(int(m), int(n), form, args.device, out, args.objective, args.as_engine)
        return 0
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    records = []
    tmp = Path(args.out).with_suffix(".part")
    for shape in args.shapes:
        m, n = (int(x) for x in shape.split("x"))
        runs = {}
        for form in args.forms.split(","):
            subprocess.run([sys.executable, __file__, "--device", args.device, "--objective", args.objective,
                            *(["--as-engine"] if args.as_engine else []), "--child", str(m), str(n), form, str(tmp)],
                           check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                               [str(ROOT), str(ROOT / "plugins" / "ojbkq-cpu"), os.environ.get("PYTHONPATH", "")])})
            runs[form] = json.loads(tmp.read_text())
            runs[form]["codes"] = torch.load(str(tmp) + ".codes")["codes"]
        differ = (float((runs["whole"]["codes"] != runs["blocked"]["codes"]).float().mean())
                  if len(runs) == 2 else None)
        for form, r in runs.items():
            records.append({"label": args.label, "shape": [m, n], "form": form, "objective": args.objective, "device": name, "dtype": "float32",
                            "tf32": bool(torch.backends.cuda.matmul.allow_tf32), "threads": torch.get_num_threads(),
                            "peak_bytes": r["peak_bytes"], "peak_squares": r["peak_bytes"] / r["square_bytes"],
                            "peak_total_bytes": r["peak_total_bytes"], "statistics_on_host": r["statistics_on_host"],
                            "seconds": r["seconds"], "loss": r["loss"], "blocked": r["blocked"],
                            "codes_differing_from_whole": differ, "command": " ".join(["bench/bench_budget.py", *(argv or sys.argv[1:])])})
    tmp.unlink(missing_ok=True)
    Path(str(tmp) + ".codes").unlink(missing_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    print(f"{'shape':<12} {'form':<8} {'peak GiB':>9} {'(n, n) units':>13} {'seconds':>8} {'codes ≠ whole':>14}")
    for r in records:
        print(f"{'x'.join(map(str, r['shape'])):<12} {r['form']:<8} {r['peak_bytes'] / 2**30:9.2f} "
              f"{r['peak_squares']:13.2f} {r['seconds']:8.2f} "
              + ("" if r['codes_differing_from_whole'] is None else f"{r['codes_differing_from_whole']:14.2e}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

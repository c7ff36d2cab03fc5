"""bfloat16 against float32 on this CPU: the matrix product of a SmolLM2 MLP input projection on one
512-token window, `(512, 576) @ (576, 1536)`, and one window's forward pass of SmolLM2-135M, in each dtype.

Where the CPU has no native bfloat16 (AVX2 only, or torch run at AVX2 with `ATEN_CPU_CAPABILITY=avx2`),
bfloat16 products run in emulation: this measures how much slower, which is why `model.dtype: device`
runs float32 there (docs/which-cpu.md).

    .venv/bin/python bench/bench_cpu_dtype.py [--threads 1 2] [--repeats 5] [--label NAME]
        [--out bench/results/cpu_dtype.json]

Prints a table and adds one record per (dtype, threads) to `--out` under `--label` (default: the torch
capability, e.g. AVX512 or AVX2), with the CPU's model name, torch's capability and flags.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import common
from ojbkq_core.precision import cpu_capability

SHAPE = (512, 576, 1536)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def best_of(fn, repeats: int) -> float:
    fn()                                               # warm-up: kernels chosen, memory touched
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_window(dtype: torch.dtype):
    """One 512-token window through SmolLM2-135M in `dtype` (None when the model is not installed)."""
    from ojbkq_core.assets import smollm2_folder
    from ojbkq_core.pipeline import load_model
    try:
        folder = smollm2_folder(common.CACHE)
    except Exception:                                  # noqa: BLE001 - the product is still measured
        return None
    model, _ = load_model(folder, str(dtype).removeprefix("torch."))
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run():
        model(input_ids=ids, use_cache=False)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--label", default=None)
    p.add_argument("--no-forward", action="store_true", help="time the product only")
    p.add_argument("--out", default=os.path.join(common.RESULTS, "cpu_dtype.json"))
    args = p.parse_args(argv)
    caps = cpu_capability()
    label = args.label or caps["capability"]
    m, k, n = SHAPE
    records = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
            product = best_of(lambda: a @ b, args.repeats)
            # the forward pass at the most threads only, one timed run (a minute in emulated bfloat16)
            fwd = None if args.no_forward or threads != max(args.threads) else forward_window(dtype)
            forward = best_of(fwd, 1) if fwd is not None else None
            records.append({"dtype": str(dtype).removeprefix("torch."), "threads": threads,
                            "product_ms": product * 1e3, "product_gflops": 2 * m * k * n / product / 1e9,
                            "forward_window_s": forward})
    base = {(r["threads"]): r for r in records if r["dtype"] == "float32"}
    print(f"{cpu_name()}; torch {torch.__version__}, capability {caps['capability']}, bfloat16 "
          f"{'native' if caps['bf16_native'] else 'not native'}; ATEN_CPU_CAPABILITY="
          f"{os.environ.get('ATEN_CPU_CAPABILITY', '')!r}")
    print(f"{'dtype':<9} {'threads':>7} {'product ms':>11} {'GFLOP/s':>8} {'× float32':>9} {'window fwd s':>12}")
    for r in records:
        slow = r["product_ms"] / base[r["threads"]]["product_ms"]
        fwd = "-" if r["forward_window_s"] is None else f"{r['forward_window_s']:.3f}"
        print(f"{r['dtype']:<9} {r['threads']:>7} {r['product_ms']:>11.2f} {r['product_gflops']:>8.1f} {slow:>9.1f} "
              f"{fwd:>12}")
    data = json.load(open(args.out, encoding="utf-8")) if os.path.isfile(args.out) else {"runs": {}}
    data["runs"][label] = {"device": "cpu", "cpu": cpu_name(), "torch": torch.__version__, "capability": caps,
                           "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
                           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "tf32": None,
                           "shape": list(SHAPE), "repeats": args.repeats, "records": records}
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"-> {args.out} [{label}]")
    return 0


if __name__ == "__main__":
    common.run_script(main, "bench_cpu_dtype.py")

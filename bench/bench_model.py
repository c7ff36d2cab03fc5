"""Model benchmark: a Llama-3-8B-shaped model (random weights, a few blocks) quantized through the project's
calibration engine (`ojbkq_core.calibrate`), seconds per block extrapolated to the 32 blocks of the model.

The model is built from its configuration (hidden 4096, intermediate 14336, 32 heads, 8 key/value heads,
vocabulary 128256) with `--blocks` decoder blocks, in bf16 on the device. Calibration: `--samples` random
token sequences of `--seqlen` tokens. Recipes: GPTQ (symmetric objective, babai) and OJBKQ (jta objective,
klein k = 16), both 4 bits, group 128, asymmetric min-max grid (configs/gptq.yaml, configs/ojbkq.yaml).

    python bench/bench_model.py --out bench/results/model.json
    python bench/bench_model.py --device cpu --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \
        --vocab 256 --samples 4 --seqlen 32 --out /tmp/model.json            # smoke

Records (`model.json`): `shape` (hidden, intermediate), `bits`, `group_size`, `decoder`, `params`,
`objective`, `seconds` (the engine's total), `seconds_per_block` (statistics + quantization + propagation,
divided by the blocks), `projected_seconds` (capture + 32 × seconds_per_block), `peak_bytes`, `device`,
and the engine's own split of the time (`engine_seconds`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

import ojbkq_core.calibrate as engine  # noqa: E402
from ojbkq_core.calibrate import calibrate  # noqa: E402
from ojbkq_core.grid import GridSpec  # noqa: E402
from ojbkq_core.model import find_adapter  # noqa: E402
from ojbkq_core.registry import load  # noqa: E402

RECIPES = {
    "gptq": ("symmetric", {}, "babai", {}),
    "ojbkq": ("jta", {"mu": 0.6, "lam": 0.6}, "klein", {"k": 16, "seed": 0}),
}
FULL_BLOCKS = 32


PRESETS = {     # hidden, intermediate, heads, key/value heads
    "8b": (4096, 14336, 32, 8),
    "70b": (8192, 28672, 64, 8),
    "405b": (16384, 53248, 128, 8),
}


def build(args, dev, home=None):
    """The model with random bf16 weights, initialised on `dev` and kept on `home` (default `dev`): a Llama,
    or with `args.experts` a Qwen3-MoE (`args.top_k` experts per token of width `args.moe_intermediate`), a
    Qwen2-MoE with `args.shared_expert` (one shared expert of that width beside them)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)
    if getattr(args, "experts", 0) and getattr(args, "shared_expert", 0):
        cls = Qwen2MoeForCausalLM
        cfg = Qwen2MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                             num_experts_per_tok=args.top_k, shared_expert_intermediate_size=args.shared_expert,
                             num_hidden_layers=args.blocks, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, max_position_embeddings=8192, rope_theta=1000000.0,
                             rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16")
    elif getattr(args, "experts", 0):
        cls = Qwen3MoeForCausalLM
        cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                             num_experts_per_tok=args.top_k, num_hidden_layers=args.blocks,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             head_dim=args.head_dim or args.hidden // args.heads, max_position_embeddings=8192,
                             rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             torch_dtype="bfloat16")
    else:
        cls = LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=args.blocks, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=8192, rope_theta=500000.0,
                          rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(home or dev).eval()


@torch.no_grad()
def forward_seconds(adapter, ids, batch_size, dev, need_fp, true_sequential=True) -> float:
    """The bare block forwards the engine runs for one block (block 0, on its captured inputs): per
    stream, one forward up to each group's modules and one whole forward, the runtime stream's reusing
    the outputs of its final modules as the engine's do (`ojbkq_core.reuse`); the full-precision
    stream's last group and its propagation are one forward."""
    from ojbkq_core.blocks import capture_block_inputs, module_inputs, run_block
    from ojbkq_core.calibrate import reuse_budget
    from ojbkq_core.reuse import Reuse
    block = adapter.blocks()[0]
    home = next(block.parameters()).device
    block.to(dev)
    X = capture_block_inputs(adapter, ids, batch_size, home=dev, device=dev)
    groups = adapter.groups(block)
    if not true_sequential:
        groups = [[n for g in groups for n in g]]
    partial = groups if not need_fp else groups + groups[:-1]
    for _ in range(2):                                     # the first round warms up
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        reuse = Reuse(block, [n for g in groups for n in g], reuse_budget(torch.device(dev)))
        for gi, names in enumerate(partial):
            pending = [n for g in groups[gi:] for n in g] if gi < len(groups) else None
            for i, b in enumerate(X):
                if pending is None:                            # the full-precision stream
                    module_inputs(block, names, b.hidden, b, dev)
                    continue
                with reuse.around(block, i, pending):
                    module_inputs(block, names, b.hidden, b, dev)
        for i, b in enumerate(X):
            with reuse.around(block, i, ()):
                run_block(block, b.hidden, b, dev)
        if need_fp:
            for b in X:
                run_block(block, b.hidden, b, dev)
        torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
    block.to(home)
    return dt


@contextlib.contextmanager
def profiled(path, title: str, append: bool = False, rows: int = 30):
    """Run the body under torch.profiler (CPU and CUDA) when `path` is given and write its operators and
    kernels by total CUDA time there (by CPU time without a GPU; appended after the first recipe)."""
    if not path:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        yield
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                                      row_limit=rows, max_name_column_width=60)
    with open(path, "a" if append else "w") as f:
        f.write(f"== {title}\n{table}\n\n")


def add_moe_args(ap: argparse.ArgumentParser) -> None:
    """A mixture-of-experts model instead of a Llama (`build`)."""
    ap.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE model with this many experts per block")
    ap.add_argument("--top-k", type=int, default=8, help="experts per token (with --experts)")
    ap.add_argument("--moe-intermediate", type=int, default=768, help="each expert's width (with --experts)")
    ap.add_argument("--shared-expert", type=int, default=0,
                    help="a Qwen2-MoE with one shared expert of this width (with --experts)")
    ap.add_argument("--head-dim", type=int, default=0, help="attention head width (default hidden / heads)")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model, calibration and recipe options (`build` reads the model's)."""
    add_moe_args(ap)
    ap.add_argument("--decode-experts", choices=("auto", "together", "alone"), default="auto",
                    help="a group's experts decoded together (one call on their stack) or alone (one call each); "
                         "auto: as the engine does on the device (calibrate.STACK_DEVICES)")
    ap.add_argument("--forwards", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the bare block forwards the engine needs (--no-forwards: skip, for the largest shapes)")
    ap.add_argument("--project", type=int, default=FULL_BLOCKS, metavar="N",
                    help=f"blocks of the whole model the time is projected to (default {FULL_BLOCKS})")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="shape of Llama-3-8B or -70B (sets hidden, intermediate, heads, kv-heads)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--model-device", default=None,
                    help="where the model lives between blocks (default: the device; cpu: one block at a time on the device)")
    ap.add_argument("--append", action="store_true", help="add the records to those already in --out")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--static-groups", action="store_true",
                    help="groups' scales fitted once before decoding (the recipes' quant.static_groups)")
    ap.add_argument("--recipes", default="gptq,ojbkq")
    ap.add_argument("--profile", default=None, metavar="TXT",
                    help="run each recipe's calibration under torch.profiler and write its kernels by CUDA time here")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "model.json"))
    add_model_args(ap)
    args = ap.parse_args(argv)
    if args.preset:
        args.hidden, args.intermediate, args.heads, args.kv_heads = PRESETS[args.preset]
    dev = torch.device(args.device)
    model_home = torch.device(args.model_device or args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    reg = load(extra_plugins=("ojbkq_hf.plugin", "ojbkq_cuda.plugin"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.samples, args.seqlen), generator=g)
    grid = GridSpec(bits=args.bits, group_size=args.group_size, static_groups=args.static_groups)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if args.append and out.exists() else []
    for recipe in args.recipes.split(","):
        obj_name, obj_params, dec_name, dec_params = RECIPES[recipe]
        model = build(args, dev, model_home)
        adapter = find_adapter(model, registry=reg)
        objective = reg.objective(obj_name, obj_params)
        params = {k: v for k, v in dec_params.items() if k != "seed"}
        decoder = reg.decoder(dec_name, params, device=str(dev))
        how = getattr(args, "decode_experts", "auto")
        if how == "alone":
            type(decoder).stackable = False
        elif how == "together":
            engine.STACK_DEVICES = (*engine.STACK_DEVICES, dev.type)
        together = dev.type in engine.STACK_DEVICES and decoder.stackable
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with profiled(args.profile, f"{recipe}: {args.blocks} blocks {args.hidden}x{args.intermediate}, "
                      f"{args.samples}x{args.seqlen} tokens, {name}, tf32 {tf32}", append=recipe != args.recipes.split(",")[0]):
            res = calibrate(adapter, ids, objective, grid, decoder, damp=0.01, seed=dec_params.get("seed", 0),
                            device=dev, batch_size=args.batch_size, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        total = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
        sec = res.report["seconds"]
        per_block = (sec["statistics"] + sec["quantize"] + sec["propagate"]) / args.blocks
        need_fp = res.report["full_precision_stream"]
        fwd = (forward_seconds(adapter, ids, res.report["batch_size"], dev, need_fp)
               if dev.type == "cuda" and args.forwards else None)
        rec = {
            "recipe": recipe, "shape": [args.hidden, args.intermediate], "blocks": args.blocks,
            "heads": [args.heads, args.kv_heads], "dtype": "bfloat16", "tf32": tf32,
            "trailing_products": os.environ.get("OJBKQ_CUDA_PRODUCTS", "fp32"),
            "model_device": str(model_home), "streams": res.report["streams"],
            "batch_size": res.report["batch_size"],
            "bits": args.bits, "group_size": args.group_size, "static_groups": args.static_groups, "decoder": dec_name, "params": params,
            "implementation": (", ".join(decoder.primitives.plugins) or "reference"), "objective": res.report["objective"],
            "samples": args.samples, "seqlen": args.seqlen, "device": name,
            "seconds": total, "seconds_per_block": per_block,
            "projected_seconds": sec["capture"] + args.project * per_block, "projected_blocks": args.project,
            "peak_bytes": peak, "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "engine_seconds": sec, "statistics_passes": res.report["statistics_passes"],
            "blocked_layers": {k: v["blocked"] for k, v in res.report["layers"].items() if "blocked" in v},
            "stacked_layers": sum(1 for v in res.report["layers"].values() if v.get("stacked")),
            "experts": args.experts, "top_k": args.top_k if args.experts else None,
            "experts_decoded": None if not args.experts else "together" if together else "alone",
            "moe_intermediate": args.moe_intermediate if args.experts else None, "shared_expert": args.shared_expert,
            "objective_sum": res.report["objective_sum"],
            "layer_seconds": {k: v["seconds"] for k, v in res.report["layers"].items()},
        }
        # steady state: the last block's quantization (the first block's also compiles the kernels)
        last = f"{adapter.blocks_path()}.{args.blocks - 1}."
        q_last = sum(v for k, v in rec["layer_seconds"].items() if k.startswith(last))
        rec["seconds_per_block_steady"] = (sec["statistics"] + sec["propagate"]) / args.blocks + q_last
        rec["projected_seconds_steady"] = sec["capture"] + args.project * rec["seconds_per_block_steady"]
        # statistics + propagation against the bare forwards they need
        rec["forward_seconds_per_block"] = fwd
        rec["statistics_propagate_over_forwards"] = (
            None if not fwd else (sec["statistics"] + sec["propagate"]) / args.blocks / fwd)
        records.append(rec)
        out.write_text(json.dumps(records, indent=1))
        print(f"{recipe}: {args.blocks} blocks in {total:.1f}s; per block {per_block:.2f}s "
              f"(statistics {sec['statistics'] / args.blocks:.2f}, quantize {sec['quantize'] / args.blocks:.2f}, "
              f"propagate {sec['propagate'] / args.blocks:.2f}); capture {sec['capture']:.2f}s; "
              f"{args.project} blocks ≈ {rec['projected_seconds'] / 60:.1f} min (steady {rec['seconds_per_block_steady']:.2f} s/block, "
              f"{rec['projected_seconds_steady'] / 60:.1f} min); peak {peak / 2**30:.1f} GiB; "
              f"(statistics + propagate) / forwards = {rec['statistics_propagate_over_forwards'] or 0:.2f}", flush=True)
        del model, adapter, res
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{'recipe':<6} {'shape':<11} {'decoder':<10} {'s/block':>8} {'steady':>7} {'stats':>7} {'quant':>7} "
          f"{'prop':>7} {'fwd':>6} {'ratio':>6} {str(args.project) + ' blocks':>10} {'peak GiB':>9}")
    for r in records:
        if "implementation" not in r:           # records of other benchmarks (bench_run.py)
            continue
        e = r["engine_seconds"]
        b = r["blocks"]
        print(f"{r['recipe']:<6} {'x'.join(map(str, r['shape'])):<11} {r['implementation']:<10} {r['seconds_per_block']:8.2f} "
              f"{r['seconds_per_block_steady']:7.2f} {e['statistics'] / b:7.2f} {e['quantize'] / b:7.2f} "
              f"{e['propagate'] / b:7.2f} {r.get('forward_seconds_per_block') or 0:6.2f} "
              f"{r.get('statistics_propagate_over_forwards') or 0:6.2f} {r['projected_seconds'] / 60:8.1f}m "
              f"{r['peak_bytes'] / 2**30:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

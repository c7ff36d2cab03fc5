"""Layer benchmark: statistics, factorisation and decoding of Llama-3-8B-shaped layers on one GPU.

For each shape `m×n` and bit width: calibration inputs `X = Z A` (bf16, generated on the device; `A` has a
decaying spectrum) give `H` through the project's `Statistics`; then every decoder quantizes the layer
through `quantize_layer` (symmetric objective, group 128, the min-max grid), and a straightforward GPTQ
(the classic column loop with lazy blocks of 128, written below) runs on the same `H` as the baseline.

Each time is set against the device's ceilings measured at the start of the run (a large bf16 and float32
matrix product, a device-to-device copy): `floor_seconds = max(flops / rate, bytes / bandwidth)` with the
flops and bytes counted below for each stage. Correctness checks (the plugin against the reference path)
go to `checks.json` beside the records.

    python bench/bench_layers.py --out bench/results/layers.json
    python bench/bench_layers.py --device cpu --shapes 64x128 --tokens 4096 --decoders babai,klein:k=4   # smoke

Records (`layers.json`): `shape`, `bits`, `group_size`, `decoder`, `params`, `objective`, `seconds` (statistics
+ layer quantization), `peak_bytes` (the largest peak over the stages, above what was allocated before
the stage), `device`, `objective_value` (`tr((W − Q) H (W − Q)ᵀ)`, float64), `stages` (seconds and peak
bytes of statistics, factorisation, decode, layer), `flops`, `bytes`, `floor_seconds`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from ojbkq_core.grid import GridSpec, minmax, quantize  # noqa: E402
from ojbkq_core.layer import quantize_layer  # noqa: E402
from ojbkq_core.linalg import inverse_cholesky  # noqa: E402
from ojbkq_core.objectives import PRESETS, preset  # noqa: E402
from ojbkq_core.registry import load  # noqa: E402
from ojbkq_core.stats import Statistics  # noqa: E402

LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
DECODERS = "rtn,babai,klein:k=1,klein:k=4,klein:k=16,klein:k=64,beam:width=2,beam:width=4,beam:width=8,baseline"


# --- timing ---------------------------------------------------------------------------------------

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(fn, dev):
    """`(result, seconds, peak_bytes)`: wall time with the device synchronised before and after, and
    the peak of allocated memory above what was allocated before the call."""
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else 0
    return out, dt, peak


def median_time(fn, dev, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _, dt, _ = measure(fn, dev)
        times.append(dt)
    return sorted(times)[len(times) // 2]


def ceilings(dev) -> dict:
    """Measured rates: bf16 and float32 matrix products (8192³, random data), device copy (read + write)."""
    if dev.type != "cuda":
        return {"bf16_flops": 1e11, "fp32_flops": 1e11, "copy_bytes": 1e10}
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t_bf16 = median_time(lambda: a @ b, dev)
    a, b = a.float(), b.float()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    t_fp32 = median_time(lambda: a @ b, dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    t_tf32 = median_time(lambda: a @ b, dev)
    torch.backends.cuda.matmul.allow_tf32 = old
    del a, b
    x = torch.randn(1 << 28, device=dev)          # 1 GiB
    y = torch.empty_like(x)
    t_copy = median_time(lambda: y.copy_(x), dev)
    del x, y
    return {"bf16_flops": 2 * n**3 / t_bf16, "fp32_flops": 2 * n**3 / t_fp32, "tf32_flops": 2 * n**3 / t_tf32,
            "copy_bytes": 2 * 4 * (1 << 28) / t_copy}


# --- counted work -----------------------------------------------------------------------------------

def work(stage: str, m: int, n: int, N: int, decoder: str = "", params: dict | None = None) -> tuple[float, float, str]:
    """`(flops, bytes, unit)` of a stage: the matrix-product flops (at the rate of `unit`) and the fewest
    bytes it must move through device memory."""
    params = params or {}
    if stage == "statistics":                    # H += Xᵀ X, bf16 in, float32 accumulated
        return 2.0 * N * n * n, 2.0 * N * n + 4.0 * n * n, "bf16"
    if stage == "factorization":                 # Cholesky, its inverse, Cholesky again: ≈ 4n³/3 multiply-adds
        return 8.0 / 3.0 * n**3, 4.0 * 4 * n * n, "fp32"
    P = {"klein": params.get("k", 16), "beam": params.get("width", 4) + 1}.get(decoder, 1)
    if decoder == "rtn":                        # one triangular solve for the path objective
        return 1.0 * m * n * n, 4.0 * (3 * m * n + n * n), "fp32"
    if decoder == "beam":                       # beams' trailing products + the Babai path
        walk_flops = (P - 1) * m * n * n + m * n * n
    else:
        walk_flops = P * m * n * n              # Σ_blocks 2·P·m·128·(n − i2)
    # the trailing columns are read and written once per block of 128 columns
    walk_bytes = 4.0 * 2 * P * m * n * n / 2 / 128 + 4.0 * n * n
    # candidates ranked from their path objectives: one pass over each one's codes and the weights
    score_bytes = 5.0 * P * m * n if P > 1 else 0.0
    return walk_flops, walk_bytes + score_bytes, "fp32"


def floor(flops, nbytes, unit, ceil) -> float:
    return max(flops / ceil[f"{unit}_flops"], nbytes / ceil["copy_bytes"])


# --- inputs -------------------------------------------------------------------------------------------

def make_inputs(n: int, N: int, dev, seed: int, chunk: int = 8192) -> list[torch.Tensor]:
    """Token rows `X = Z A` `(N, n)` in bf16 chunks; `A = G diag(σ)` with `σ` decaying from 1 to 1e-2 over
    the columns and a few heavier columns, so that `H` is correlated and ill-conditioned like a real
    layer's."""
    g = torch.Generator(device=dev).manual_seed(seed)
    sigma = torch.logspace(0, -2, n, device=dev)
    sigma[torch.randperm(n, generator=g, device=dev)[: max(1, n // 256)]] *= 20
    A = (torch.randn(n, n, generator=g, device=dev) / math.sqrt(n) * sigma).to(torch.bfloat16)
    out = []
    for i in range(0, N, chunk):
        Z = torch.randn(min(chunk, N - i), n, generator=g, device=dev, dtype=torch.bfloat16)
        out.append(Z @ A)
    return out


def statistics_upcast(chunks, n, dev) -> torch.Tensor:
    """`Σ Xᵀ X` with every chunk converted to float32 first (a float32 matrix product)."""
    H = torch.zeros(n, n, device=dev)
    for X in chunks:
        Xf = X.float()
        H += Xf.T @ Xf
    return H


# --- the straightforward GPTQ ------------------------------------------------------------------------

def gptq_baseline(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, blocksize: int = 128,
                  percdamp: float = 0.01, timings: dict | None = None):
    """The classic GPTQ loop: damped `H⁻¹`'s upper Cholesky factor, then column by column inside blocks of
    `blocksize` (quantize, error, rank-1 update of the block), one matrix product for the columns after
    each block. Asymmetric min-max grid per group of `group_size` fitted when the walk enters the group.
    Returns the dequantized weights and the codes."""
    dev = W.device
    W = W.clone().float()
    H = H.clone().float()
    maxq = 2**bits - 1
    m, n = W.shape
    t0 = time.perf_counter()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(n, device=dev)
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    sync(dev)
    t1 = time.perf_counter()
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % group_size == 0:
                scale, zero = minmax(W[:, i1 + i:i1 + i + group_size] if i == 0 else
                                     W1[:, i:i + group_size], maxq, False)
            c = quantize(w, scale, zero, maxq)
            q = scale * (c - zero)
            Q1[:, i] = q
            C1[:, i] = c
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    sync(dev)
    if timings is not None:
        timings["factorization"] = t1 - t0
        timings["decode"] = time.perf_counter() - t1
    return Q, codes


# --- decoders ---------------------------------------------------------------------------------------

class Timed:
    """A decoder wrapper for `quantize_layer` that times `decode` with the device synchronised."""

    def __init__(self, decoder, dev):
        self.decoder, self.dev = decoder, dev
        self.progressive = decoder.progressive
        self.seconds = 0.0
        self.peak = 0

    def decode(self, *args, **kw):
        res, dt, peak = measure(lambda: self.decoder.decode(*args, **kw), self.dev)
        self.seconds += dt
        self.peak = max(self.peak, peak)
        return res

    def __repr__(self):
        return repr(self.decoder)


def parse_decoders(text: str):
    out = []
    for item in text.split(","):
        name, *kv = item.split(":")
        params = {}
        for pair in kv:
            k, v = pair.split("=")
            params[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        out.append((name, params))
    return out


def sub_statistics(st: Statistics, k: int) -> Statistics:
    """The statistics of the first `k` input columns (for a cheap warm-up on the same rows)."""
    sub = Statistics(k, needs=st.needs, device=st.device)
    sub.count = st.count
    sub._sum = {key: v[:k, :k].contiguous() for key, v in st._sum.items()}
    return sub


def objective_value(W, Q, H) -> float:
    E = (W.double() - Q.double())
    return float(((E @ H.double()) * E).sum())


# --- checks: the plugin against the reference path --------------------------------------------------

def run_checks(reg, dev, shapes, H_of, W_of, stats_of, spec, checks: list):
    from ojbkq_core.decoders import Babai, Beam, Klein, Successive
    for (m, n) in shapes:
        for bits in (4, 3):
            grid = GridSpec(bits=bits, group_size=128)
            W, st = W_of[(m, n)], stats_of[n]
            ref = quantize_layer(W, st, spec, grid, Babai(), seed=0)
            dec = quantize_layer(W, st, spec, grid, reg.decoder("babai", {}, device=str(dev)), seed=0)
            frac = float((ref.codes != dec.codes).float().mean())
            checks.append({"check": "babai plugin vs reference (same device)", "shape": [m, n], "bits": bits,
                           "differing_codes": frac, "loss_reference": ref.loss, "loss_plugin": dec.loss})
            print(f"check babai {m}x{n} {bits}b: differing codes {frac:.2e}", flush=True)
    # klein: the same seed twice on the same backend; and against the reference on a row slice
    m, n = min(shapes, key=lambda s: s[0] * s[1])
    grid = GridSpec(bits=3, group_size=128)
    W, st = W_of[(m, n)], stats_of[n]
    runs = [quantize_layer(W, st, spec, grid, reg.decoder("klein", {"k": 16}, device=str(dev)), seed=7)
            for _ in range(2)]
    same = bool(torch.equal(runs[0].codes, runs[1].codes))
    checks.append({"check": "klein k=16 twice, same seed, same backend", "shape": [m, n], "bits": 3,
                   "identical": same, "loss": [r.loss for r in runs]})
    print(f"check klein twice: identical={same}", flush=True)
    rows = min(m, 512)
    Wr = W[:rows].contiguous()
    for name, ref_cls, params in [("klein", Klein, {"k": 16}), ("beam", Beam, {"width": 4}),
                                  ("successive", Successive, {})]:
        a = quantize_layer(Wr, st, spec, grid, ref_cls(**params), seed=7)
        b = quantize_layer(Wr, st, spec, grid, reg.decoder(name, params, device=str(dev)), seed=7)
        frac = float((a.codes != b.codes).float().mean())
        checks.append({"check": f"{name} plugin vs reference (same device)", "shape": [rows, n], "bits": 3,
                       "params": params, "differing_codes": frac, "loss_reference": a.loss, "loss_plugin": b.loss})
        print(f"check {name} {rows}x{n}: differing codes {frac:.2e} loss ref {a.loss:.6g} plugin {b.loss:.6g}", flush=True)


# --- main -------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "layers.json"))
    ap.add_argument("--checks", default=None, help="where the correctness checks go (default: checks.json beside --out)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in LLAMA3_8B))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--static-groups", action="store_true",
                    help="groups' scales fitted once before decoding (the recipes' quant.static_groups) instead of during the walk")
    ap.add_argument("--tokens", type=int, default=128 * 2048)
    ap.add_argument("--decoders", default=DECODERS)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--tf32", action="store_true", help="also time klein k=16 and beam B=4 with TF32 matrix products")
    ap.add_argument("--tf32x3", action="store_true", help="also time babai, klein k=16 and beam B=4 with the walk's trailing "
                    "products as three TF32 products (OJBKQ_CUDA_PRODUCTS=tf32x3), their codes set against the float32 run's")
    ap.add_argument("--profile", default=None, help="decoders (as --decoders) to run once under torch.profiler on the "
                    "first shape and bits; the kernel table goes to profile.txt beside --out")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    decoders = parse_decoders(args.decoders)
    reg = load(extra_plugins=("ojbkq_cuda.plugin",))
    spec = preset("symmetric", *PRESETS["symmetric"])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    ceil = ceilings(dev)
    print(f"device {name}: bf16 {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s, fp32 {ceil['fp32_flops'] / 1e12:.1f} TFLOP/s, "
          f"copy {ceil['copy_bytes'] / 1e9:.0f} GB/s", flush=True)
    records, checks = [], [{"check": "device ceilings (measured)", "device": name, **ceil}]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checks_path = Path(args.checks) if args.checks else out.parent / "checks.json"

    stats_of, H_of, W_of, stage_of = {}, {}, {}, {}
    for n in sorted({n for _, n in shapes}):
        chunks = make_inputs(n, args.tokens, dev, seed=n)
        sync(dev)
        def project_stats():
            st = Statistics(n, needs=("H",), device=dev)
            for X in chunks:
                st.add(X)
            return st
        project_stats()                                                    # warm-up (handles, kernels)
        st, t_stats, p_stats = measure(project_stats, dev)
        H_up, t_up, p_up = measure(lambda: statistics_upcast(chunks, n, dev), dev)
        H = st.H
        rel = float((H * st.count - H_up).norm() / H_up.norm())
        fl, by, unit = work("statistics", 0, n, args.tokens)
        stage_of[n] = {"statistics": {"seconds": t_stats, "peak_bytes": p_stats, "flops": fl, "bytes": by,
                                      "floor_seconds": floor(fl, by, unit, ceil)}}
        checks.append({"check": "statistics: project path vs float32 upcast", "n": n, "tokens": args.tokens,
                       "input_dtype": str(chunks[0].dtype), "seconds_project": t_stats, "seconds_upcast": t_up,
                       "peak_bytes_project": p_stats, "peak_bytes_upcast": p_up, "relative_difference": rel})
        print(f"statistics n={n}: project {t_stats:.3f}s, float32 upcast {t_up:.3f}s, rel diff {rel:.2e}", flush=True)
        del chunks, H_up
        _, t_fact, p_fact = measure(lambda: inverse_cholesky(H, 0.01), dev)
        _, t_fact, p_fact = measure(lambda: inverse_cholesky(H, 0.01), dev)
        fl, by, unit = work("factorization", 0, n, 0)
        stage_of[n]["factorization"] = {"seconds": t_fact, "peak_bytes": p_fact, "flops": fl, "bytes": by,
                                        "floor_seconds": floor(fl, by, unit, ceil)}
        stats_of[n], H_of[n] = st, H
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for (m, n) in shapes:
        g = torch.Generator(device=dev).manual_seed(m * 7 + n)
        W_of[(m, n)] = torch.randn(m, n, generator=g, device=dev) * 0.02

    if not args.no_checks:
        try:
            run_checks(reg, dev, shapes, H_of, W_of, stats_of, spec, checks)
        except Exception as exc:
            checks.append({"check": "error", "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"checks failed: {type(exc).__name__}: {exc}", flush=True)
        checks_path.write_text(json.dumps(checks, indent=1))

    if args.profile:
        profile(reg, dev, shapes[0], W_of[shapes[0]], stats_of[shapes[0][1]], spec,
                GridSpec(bits=bits_list[0], group_size=args.group_size, static_groups=args.static_groups), parse_decoders(args.profile),
                out.parent / "profile.txt")
    runs = [(nm, p, "fp32") for nm, p in decoders if nm]
    if args.tf32:
        runs += [("klein", {"k": 16}, "tf32"), ("beam", {"width": 4}, "tf32")]
    if args.tf32x3:
        runs += [("babai", {}, "tf32x3"), ("klein", {"k": 16}, "tf32x3"), ("beam", {"width": 4}, "tf32x3")]
    for (m, n) in shapes:
        W, st, H = W_of[(m, n)], stats_of[n], H_of[n]
        fp32_runs = {}                                   # (decoder, params, bits) → its float32 result
        for bi, bits in enumerate(bits_list):
            grid = GridSpec(bits=bits, group_size=args.group_size, static_groups=args.static_groups)
            for dname, params, matmul in runs:
                rec = {"shape": [m, n], "bits": bits, "group_size": args.group_size, "static_groups": args.static_groups, "decoder": dname,
                       "params": params, "objective": "symmetric", "device": name, "tokens": args.tokens,
                       "matmul": matmul, "tf32": matmul == "tf32"}
                torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
                products = os.environ.get("OJBKQ_CUDA_PRODUCTS")
                os.environ["OJBKQ_CUDA_PRODUCTS"] = "tf32x3" if matmul == "tf32x3" else "fp32"
                key = (dname, json.dumps(params, sort_keys=True), bits)
                try:
                    if dname == "baseline":
                        def go():
                            tm = {}
                            Q, codes = gptq_baseline(W, H, bits, args.group_size, timings=tm)
                            return Q, codes, tm
                        (Q, codes, tm), dt, peak = measure(go, dev)
                        rec["objective_value"] = objective_value(W, Q, H)
                        stages = {"factorization": {"seconds": tm["factorization"]},
                                  "decode": {"seconds": tm["decode"]}, "layer": {"seconds": dt, "peak_bytes": peak}}
                        babai = fp32_runs.get(("babai", "{}", bits))
                        if babai is not None:
                            rec["differing_codes_vs_babai"] = float((codes.long() != babai.codes).float().mean())
                    else:
                        dec = reg.decoder(dname, params, device=str(dev))
                        rec["implementation"] = (", ".join(dec.primitives.plugins) or "reference")
                        if bi == 0:          # warm-up: compile the kernels for these rows on 256 columns
                            k = min(n, 256)
                            quantize_layer(W[:, :k].contiguous(), sub_statistics(st, k), spec, grid, dec, seed=0)
                        timed = Timed(dec, dev)
                        res, dt, peak = measure(lambda: quantize_layer(W, st, spec, grid, timed, seed=0), dev)
                        rec["objective_value"] = res.loss
                        if matmul == "fp32":
                            fp32_runs[key] = res
                        elif key in fp32_runs:
                            ref = fp32_runs[key]
                            rec["differing_codes_vs_fp32"] = float((res.codes != ref.codes).float().mean())
                            rec["objective_vs_fp32"] = res.loss / ref.loss - 1.0
                        if "candidate_histogram" in res.report:
                            hist = res.report["candidate_histogram"]
                            rec["rows_improved_over_candidate0"] = 1.0 - hist[0] / max(1, sum(hist))
                        stages = {"decode": {"seconds": timed.seconds, "peak_bytes": timed.peak},
                                  "layer": {"seconds": dt, "peak_bytes": peak}}
                        stages["factorization"] = dict(stage_of[n]["factorization"])
                except Exception as exc:                                  # keep going: report it
                    rec["error"] = f"{type(exc).__name__}: {exc}".split("\n")[0][:300]
                    print(f"{m}x{n} {bits}b {dname} {params}: {rec['error']}", flush=True)
                    records.append(rec)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = False
                    if products is None:
                        os.environ.pop("OJBKQ_CUDA_PRODUCTS", None)
                    else:
                        os.environ["OJBKQ_CUDA_PRODUCTS"] = products
                stages["statistics"] = dict(stage_of[n]["statistics"])
                fl, by, unit = work("decode", m, n, 0, dname if dname != "baseline" else "babai", params)
                stages["decode"].update(flops=fl, bytes=by, floor_seconds=floor(fl, by, unit, ceil))
                rec["stages"] = stages
                rec["seconds"] = stages["statistics"]["seconds"] + stages["layer"]["seconds"]
                rec["peak_bytes"] = max(s.get("peak_bytes", 0) for s in stages.values())
                total_flops = sum(s.get("flops", 0) for s in stages.values() if "flops" in s)
                rec["flops"], rec["bytes"] = total_flops, sum(s.get("bytes", 0) for s in stages.values())
                rec["floor_seconds"] = sum(s.get("floor_seconds", 0) for s in stages.values())
                records.append(rec)
                print(f"{m:>5}x{n:<5} {bits}b {dname:<8} {json.dumps(params):<14} {rec['matmul']} "
                      f"decode {stages['decode']['seconds']:8.3f}s (floor {stages['decode']['floor_seconds']:.3f}) "
                      f"layer {stages['layer']['seconds']:8.3f}s peak {rec['peak_bytes'] / 2**30:6.2f} GiB "
                      f"obj {rec['objective_value']:.6g}"
                      + (f" vs fp32: codes differ {rec['differing_codes_vs_fp32']:.2e}, objective {rec['objective_vs_fp32']:+.2e}"
                         if "differing_codes_vs_fp32" in rec else ""), flush=True)
                out.write_text(json.dumps(records, indent=1))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    out.write_text(json.dumps(records, indent=1))
    print(table(records))
    print(ratios(records))
    return 0


def ratios(records) -> str:
    """Ratios to babai of what was measured (nothing without a babai run): whole `quantize_layer` of klein
    k=16 and beam B=4; decode times of the baseline, klein k=16 and beam B=4."""
    def t(shape, bits, dec, params, mm="fp32", key="decode"):
        for r in records:
            if (r["shape"] == list(shape) and r["bits"] == bits and r["decoder"] == dec and r["params"] == params
                    and r.get("matmul") == mm and "error" not in r):
                return r["stages"][key]["seconds"]
        return float("nan")

    def line(head, parts):
        kept = [f"{label} {num / den:5.2f}x" for label, num, den in parts if num == num and den == den]
        return f"{head} " + ", ".join(kept) if kept else None

    klein, beam = ("klein", {"k": 16}), ("beam", {"width": 4})
    lines = []
    for shape in sorted({tuple(r["shape"]) for r in records}):
        for bits in sorted({r["bits"] for r in records}):
            name = f"{shape[0]}x{shape[1]} {bits}b"
            b = t(shape, bits, "babai", {})
            bl = t(shape, bits, "babai", {}, key="layer")
            lines.append(line(f"{name} whole quantize_layer:", [
                ("klein16/babai", t(shape, bits, *klein, key="layer"), bl),
                ("klein16 tf32/babai", t(shape, bits, *klein, "tf32", key="layer"), bl),
                ("klein16 tf32x3/babai", t(shape, bits, *klein, "tf32x3", key="layer"), bl),
                ("klein16 tf32x3/babai tf32x3", t(shape, bits, *klein, "tf32x3", key="layer"),
                 t(shape, bits, "babai", {}, "tf32x3", key="layer")),
                ("beam4/babai", t(shape, bits, *beam, key="layer"), bl),
                ("beam4 tf32/babai", t(shape, bits, *beam, "tf32", key="layer"), bl)]))
            lines.append(line(f"{name} decode:", [
                ("baseline/babai", t(shape, bits, "baseline", {}), b),
                ("baseline/babai whole layer", t(shape, bits, "baseline", {}, key="layer"), bl),
                ("klein16/babai", t(shape, bits, *klein), b),
                ("klein16 tf32/babai", t(shape, bits, *klein, "tf32"), b),
                ("beam4/babai", t(shape, bits, *beam), b),
                ("beam4 tf32/babai", t(shape, bits, *beam, "tf32"), b)]))
    return "\n".join(x for x in lines if x)


def profile(reg, dev, shape, W, st, spec, grid, decoders, path):
    """Where a decoder's time goes: CUDA kernels by total time (torch.profiler), after one warm run."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    text = []
    for dname, params in decoders:
        dec = reg.decoder(dname, params, device=str(dev))
        quantize_layer(W, st, spec, grid, dec, seed=0)
        sync(dev)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            quantize_layer(W, st, spec, grid, Timed(dec, dev), seed=0)
            sync(dev)
        head = f"== {shape[0]}x{shape[1]} {grid.bits}b {dname} {params}"
        text.append(head + "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        print(text[-1], flush=True)
    Path(path).write_text("\n\n".join(text))


def table(records) -> str:
    lines = [f"{'shape':>12} {'b':>2} {'decoder':<16} {'mm':<4} {'decode s':>9} {'floor s':>8} {'layer s':>8} "
             f"{'stats s':>8} {'peak GiB':>8} {'objective':>11}"]
    for r in records:
        if "error" in r:
            lines.append(f"{'x'.join(map(str, r['shape'])):>12} {r['bits']:>2} {r['decoder']:<16} {r['error'][:60]}")
            continue
        p = ",".join(f"{k}={v}" for k, v in r["params"].items())
        s = r["stages"]
        lines.append(f"{'x'.join(map(str, r['shape'])):>12} {r['bits']:>2} {(r['decoder'] + ' ' + p).strip():<16} "
                     f"{r['matmul']:<4} {s['decode']['seconds']:9.3f} {s['decode']['floor_seconds']:8.3f} "
                     f"{s['layer']['seconds']:8.3f} {s['statistics']['seconds']:8.3f} "
                     f"{r['peak_bytes'] / 2**30:8.2f} {r['objective_value']:11.5g}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

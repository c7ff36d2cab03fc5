"""The `ojbkq` command line (docs/interfaces.md). Exit 0 on success, 2 for bad input, 1 otherwise."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from .config import parse_value
from .grid import QuantSpec
from .errors import InputError, NonFiniteError


def parse_pairs(pairs, flag: str) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise InputError(f"{flag} {p!r}: expected KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def _device(name: str) -> str:
    if name.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    elif name != "cpu":
        raise InputError(f"--device {name!r}: use cpu or cuda")
    return name


def _atomic_savez(path: str, **arrays) -> None:
    """Write `path` through a temporary file renamed into place: no half-written output."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise InputError(f"-o {path}: directory {d} does not exist")
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_plugins(args) -> int:
    from .registry import get_registry
    reg = get_registry()
    if args.json:
        out = {
            "decoders": {k: e.plugin for k, e in reg.decoders.items()},
            "objectives": {k: e.plugin for k, e in reg.objectives.items()},
            "adapters": {k: e.plugin for k, e in reg.adapters.items()},
            "formats": {k: e.plugin for k, e in reg.formats.items()},
            "recipes": {k: e.plugin for k, e in reg.recipes.items()},
            "backends": [{"decoder": b.name, "device": b.extra["device"], "priority": b.extra["priority"],
                          "implementation": b.obj.__name__, "plugin": b.plugin} for b in reg.backends],
            "primitives": [{"primitive": i.name, "device": i.device, "priority": i.priority,
                            "implementation": f"{i.fn.__module__}.{i.fn.__name__}", "plugin": i.plugin}
                           for i in reg.primitives],
            "failures": reg.failures, "conflicts": reg.conflicts,
        }
        print(json.dumps(out, indent=2))
        return 0
    print("decoders:")
    for k, e in sorted(reg.decoders.items()):
        params = ", ".join(f"{p}={v}" for p, v in e.obj.params.items())
        print(f"  {k:<14} {e.plugin:<22} {e.obj.description}" + (f"  [{params}]" if params else ""))
    print("objectives:")
    for k, e in sorted(reg.objectives.items()):
        print(f"  {k:<14} {e.plugin:<22} params: {', '.join(e.extra['schema']) or '-'}")
    print("adapters:")
    for k, e in sorted(reg.adapters.items()):
        print(f"  {k:<14} {e.plugin}")
    print("formats:")
    for k, e in reg.formats.items():
        print(f"  {k:<14} {e.plugin}")
    print("recipes:")
    for k, e in reg.recipes.items():
        print(f"  {k:<24} {e.plugin}")
    print("backends (primitives the decoders call, then whole decoders):")
    for i in sorted(reg.primitives, key=lambda i: (i.name, -i.priority)):
        print(f"  {i.name:<14} {i.plugin:<22} device={i.device} priority={i.priority} ({i.fn.__module__}.{i.fn.__name__})")
    for b in sorted(reg.backends, key=lambda b: (b.name, -b.extra["priority"])):
        print(f"  {b.name:<14} {b.plugin:<22} device={b.extra['device']} priority={b.extra['priority']} ({b.obj.__name__})")
    if not reg.backends and not reg.primitives:
        print("  (reference implementations only)")
    for name, err in reg.failures.items():
        print(f"failed plugin: {name}: {err}")
    for c in reg.conflicts:
        print(f"conflict: {c}")
    return 0


def cmd_solve(args) -> int:
    from .problem import BILSProblem
    from .registry import get_registry
    from .solve import solve
    problem = BILSProblem.load(args.problem)
    dec = get_registry().decoder(args.decoder, parse_pairs(args.param, "--param"), device=_device(args.device))
    t0 = time.perf_counter()
    sol = solve(problem, dec, seed=args.seed, device=args.device)
    _atomic_savez(args.output, z=sol.z.astype(np.int64), residual=np.asarray(sol.residual, dtype=np.float64))
    print(f"{args.decoder}: n={problem.n} rhs={problem.Y.shape[1]} residual={np.sum(sol.residual):.6g} "
          f"({time.perf_counter() - t0:.3f}s) -> {args.output}", file=sys.stderr)
    return 0


def _box(text: str):
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise InputError(f"--box {text!r}: expected L:U with integers, e.g. 0:3") from None
    return lo, hi


def cmd_verify(args) -> int:
    from .registry import get_registry
    from .verify import run, table
    reg = get_registry()
    names = args.decoders.split(",") if args.decoders else ["rtn", "babai", "klein", "successive", "beam", "exact"]
    decs = {}
    for n in names:
        decs[n] = reg.decoder(n, {})
    rows = run(decs, args.n, _box(args.box), args.rhs, args.trials, args.cond, args.seed)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        print(f"n={args.n} box={args.box} rhs={args.rhs} trials={args.trials} cond={args.cond} seed={args.seed}; "
              f"gap = (residual - optimum) / optimum, optimum from exact")
        print(table(rows))
    return 0


def _load_npy(path: str, flag: str):
    if not os.path.exists(path):
        raise InputError(f"{flag} {path}: no such file")
    try:
        a = np.load(path)
    except Exception as exc:
        raise InputError(f"{flag} {path}: cannot read as .npy ({exc})") from None
    if a.ndim != 2 or a.dtype.kind not in "fiu":
        raise InputError(f"{flag} {path}: expected a 2-D float array, got {a.dtype} {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{flag} {path}: contains NaN or inf")
    return a


def cmd_quantize_layer(args) -> int:
    import torch

    from .grid import GridSpec
    from .registry import get_registry
    from .layer import quantize_layer
    from .stats import Statistics
    W = _load_npy(args.weight, "--weight")
    X = _load_npy(args.inputs, "--inputs")
    if X.shape[1] != W.shape[1]:
        raise InputError(f"--inputs {args.inputs}: {X.shape} has {X.shape[1]} columns; the weight {W.shape} needs {W.shape[1]}")
    Xfp = None
    if args.fp_inputs:
        Xfp = _load_npy(args.fp_inputs, "--fp-inputs")
        if Xfp.shape != X.shape:
            raise InputError(f"--fp-inputs {args.fp_inputs}: shape {Xfp.shape} differs from --inputs {X.shape}")
    reg = get_registry()
    spec = reg.objective(args.objective, parse_pairs(args.objective_param, "--objective-param"))
    obj, _ = spec.build(np.random.default_rng(args.seed))
    if obj.needs & {"C", "G"} and Xfp is None:
        raise InputError(f"--objective {args.objective} needs the full-precision inputs: give --fp-inputs XFP.npy")
    dev = _device(args.device)
    grid = GridSpec(bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
                    static_groups=args.static_groups)
    dec = reg.decoder(args.decoder, parse_pairs(args.param, "--param"), device=dev)
    tt = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32, device=dev)  # noqa: E731
    stats = Statistics.from_inputs(tt(X), tt(Xfp), needs=obj.needs)
    res = quantize_layer(tt(W), stats, spec, grid, dec, damp=args.damp, seed=args.seed)
    # the objective value directly from the inputs (float64), docs/interfaces.md
    W64, Q64, X64 = W.astype(np.float64), res.qweight.cpu().numpy().astype(np.float64), X.astype(np.float64)
    F64 = None if Xfp is None else Xfp.astype(np.float64)
    built, _ = spec.build(np.random.default_rng(args.seed))
    loss = 0.0
    for t in built.terms:
        A = X64 if t.a == 0 else (1 - t.a) * X64 + t.a * F64
        B = X64 if t.b == 0 else (1 - t.b) * X64 + t.b * F64
        loss += t.w * float(((A @ W64.T - B @ Q64.T) ** 2).sum()) / X.shape[0]
    _atomic_savez(args.output, qweight=res.qweight.cpu().numpy().astype(np.float32),
                  codes=res.codes.cpu().numpy(), scales=res.scales.cpu().numpy(), zeros=res.zeros.cpu().numpy(),
                  g_idx=res.g_idx.cpu().numpy(), loss=np.float64(loss))
    draws = f" draws={res.report['draws']}" if res.report["draws"] else ""
    print(f"{res.report['objective']} + {res.report['decoder']}: loss={loss:.6g}{draws} "
          f"({res.report['seconds']['total']:.2f}s) -> {args.output}", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from . import distributed
    from .pipeline import run
    from .spec import load_spec
    sets = [*(args.set or []), *(["output.overwrite=true"] if args.overwrite else [])]
    spec = load_spec(args.recipe, sets)                 # bad input ends here, before any model or process
    if args.nproc is not None:
        if distributed.launched():
            raise InputError("--nproc: this process was already started by torchrun; drop --nproc")
        if args.nproc > spec.calibration.samples:
            raise InputError(f"--nproc {args.nproc}: more processes than calibration.samples="
                             f"{spec.calibration.samples}; every process needs a sample")
        spec.output.prepare()
        argv = ["quantize", args.recipe, *(f"--set={s}" for s in sets), *(["--resume"] if args.resume else [])]
        return distributed.launch(args.nproc, (["-v"] if args.verbose else []) + argv)
    run(spec, resume=args.resume)
    return 0


def cmd_recipes(args) -> int:
    from .calibrate import describe_objective
    from .registry import get_registry
    from .spec import load_spec, recipes
    reg = get_registry()
    rows = []
    for name, path in recipes().items():
        spec = load_spec(path, ["model.path=-"])
        d, q = spec.decoder, spec.quant
        rows.append({"name": name, "plugin": reg.recipes[name].plugin,
                     "objective": describe_objective(spec.objective.decoded),
                     "decoder": f"{d.name}(" + ", ".join(f"{k}={v}" for k, v in d.options.items()) + ")",
                     "grid": f"{q.bits} bits, group {q.group_size}, {'symmetric' if q.sym else 'asymmetric'}"
                             + (", act-order" if q.act_order else ""),
                     "path": path})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<24} {r['objective']:<36} {r['decoder']:<26} {r['grid']}")
    print("\nojbkq quantize NAME --set model.path=./my-model   (or a .yaml, .toml or .json recipe file)")
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,5") from None


def cmd_gaps(args) -> int:
    from .gaps import run, table
    out = args.output
    png = args.plot if args.plot is not None else os.path.splitext(out)[0] + ".png"
    records = run(args.recipe, args.set or [], bits=_ints(args.bits, "--bits") if args.bits else (),
                  blocks=_ints(args.blocks, "--blocks") if args.blocks else None, c=args.columns, rows=args.rows,
                  windows=args.windows, decoders=args.decoders, undamped=args.undamped, max_nodes=args.max_nodes, seed=args.seed,
                  output=out, png=png or None)
    print(table(records))
    print(f"-> {out}" + (f", {png}" if png else ""), file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from .compare import run
    logging.getLogger("ojbkq").setLevel(logging.INFO if args.verbose else logging.WARNING)
    return run(args)


def cmd_eval(args) -> int:
    from .pipeline import evaluate_dir
    evaluate_dir(args.model_dir, dataset=args.dataset, seqlen=args.seqlen, path=args.data_path,
                 samples=args.samples, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ojbkq", description="Post-training quantization as box-constrained integer least squares")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("plugins", help="list registered decoders, objectives, adapters, formats, recipes and backends")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("solve", help="solve a BILS problem from an .npz")
    s.add_argument("problem")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--decoder", required=True)
    s.add_argument("--param", action="append", metavar="KEY=VALUE")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_solve)

    s = sub.add_parser("verify", help="check decoders against the exact optimum on random problems")
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--box", default="0:3")
    s.add_argument("--rhs", type=int, default=4)
    s.add_argument("--trials", type=int, default=50)
    s.add_argument("--decoders", default=None, help="comma-separated (default: all but exhaustive)")
    s.add_argument("--cond", default="mixed")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("quantize-layer", help="quantize one linear layer from .npy inputs")
    s.add_argument("--weight", required=True)
    s.add_argument("--inputs", required=True)
    s.add_argument("--fp-inputs")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--bits", type=int, default=QuantSpec.bits)
    s.add_argument("--group-size", type=int, default=QuantSpec.group_size, help="-1: one group per row")
    s.add_argument("--sym", action="store_true")
    s.add_argument("--act-order", action="store_true")
    s.add_argument("--static-groups", action="store_true")
    s.add_argument("--damp", type=float, default=QuantSpec.damp)
    s.add_argument("--objective", default="symmetric")
    s.add_argument("--objective-param", action="append", metavar="KEY=VALUE")
    s.add_argument("--decoder", default="babai")
    s.add_argument("--param", action="append", metavar="KEY=VALUE")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_quantize_layer)

    s = sub.add_parser("recipes", help="list the recipes `quantize` and `compare` know by name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_recipes)

    s = sub.add_parser("quantize", help="quantize a whole model from a recipe: a name (`ojbkq recipes`) or a "
                                        "YAML, TOML or JSON file")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    s.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N local processes (torch.distributed.run; one per GPU with device cuda)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (output.overwrite: true); the old one stays until "
                        "the new one is complete")
    s.add_argument("--resume", action="store_true",
                   help="continue a streamed run that stopped, from the state it saved beside the output "
                        "(output.checkpoint_every); the same config is required")
    s.set_defaults(func=cmd_quantize)

    from .gaps import DEFAULT_DECODERS
    s = sub.add_parser("gaps", help="exact optimality gaps of the decoders on sub-problems cut from a model's layers")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    s.add_argument("--bits", default=None, help="comma-separated bit widths (default: the config's quant.bits)")
    s.add_argument("--blocks", default=None, help="comma-separated block indices (default: first, middle, last)")
    s.add_argument("--columns", type=int, default=16, help="columns per sub-problem (c)")
    s.add_argument("--rows", type=int, default=8, help="rows sampled per window")
    s.add_argument("--windows", type=int, default=4, help="windows per layer")
    s.add_argument("--decoders", default=DEFAULT_DECODERS, help="comma-separated, parameters as name:key=value")
    s.add_argument("--undamped", default="", help="decoders also run on the undamped windows (λ = 0), same syntax")
    s.add_argument("--max-nodes", type=int, default=2_000_000, help="exact search limit per sub-problem")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", default="gaps.json", help="JSON records")
    s.add_argument("--plot", default=None, help="PNG of the gap distributions (default: beside the JSON; '' for none)")
    s.set_defaults(func=cmd_gaps)

    from .compare import add_arguments
    s = sub.add_parser("compare", help="which recipe for this model: recipes × bit widths side by side, with "
                                       "perplexity on held-out text (table, JSON, plot, report)")
    add_arguments(s)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("eval", help="perplexity of a model folder")
    s.add_argument("model_dir")
    s.add_argument("--dataset", default="wikitext2")
    s.add_argument("--data-path", default=None, help="local text/json/parquet file(s) instead of a hub dataset")
    s.add_argument("--seqlen", type=int, default=2048)
    s.add_argument("--samples", type=int, default=None, help="at most this many windows")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_eval)
    return p


def _rank() -> str:
    """` (rank R of N)` in a process started by torchrun, else nothing."""
    from . import distributed
    return f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})" if distributed.launched() else ""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args) or 0
    except InputError as exc:
        print(f"ojbkq {args.command}{_rank()}: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"ojbkq {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ojbkq {args.command}: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record
    sys.exit(record(main)())          # under torchrun, an exception is recorded for its failure summary

"""A recipe's settings on the validation split: perplexity over a grid of one or two config keys, and the choice.

Runs `ojbkq compare` (SmolLM2-135M) once per grid point with `--recipes RECIPE --domains
validation --set KEY=VALUE ...`, so only held-out windows of the calibration plays are ever evaluated,
or summarises such runs (`--from`). The choice is the point with the lowest mean log validation
perplexity over the bit widths run. Writes `--out` (JSON) and beside it .txt and a .png: a heat map per
bit width for two keys, perplexity against the value for one.

    python bench/recipe_sweep.py --recipe ojbkq --grid objective.mu=0.4,0.6,0.8,1 --grid objective.lam=0.25,0.5,0.75,1
    python bench/recipe_sweep.py --recipe regularized-beam --grid objective.alpha=0.25,0.5,0.75,1 [--bits 4 3]
                                 [--device cuda] [--parts DIR] [--out FILE] [-- more ojbkq compare options]
    python bench/recipe_sweep.py --from PART.json ... [--out FILE]

For the JTA objective, μ = 1 is the regularized objective with α = λ, and λ = 1 with μ = 1 the
asymmetric (GPTAQ) objective; α = 0 is the symmetric (GPTQ) objective.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile

import common
from ojbkq_core import results as rec
from ojbkq_core.errors import InputError

CHOOSE_ON = "validation"


def parse_grid(text: str) -> tuple[str, list[float]]:
    """`"section.key=v1,v2"` → `(key, [v1, v2])`."""
    key, eq, values = text.partition("=")
    try:
        vals = [float(v) for v in values.split(",")]
    except ValueError:
        vals = []
    if not eq or "." not in key or not vals:
        raise InputError(f"--grid {text!r}: write SECTION.KEY=V1,V2,... with numbers, "
                                  "e.g. objective.alpha=0.25,0.5,1")
    return key, vals


def point_of(result: dict, keys: list[str], path: str) -> tuple[float, ...]:
    """The values of `keys` in a comparison result's `--set` overrides."""
    found = rec.set_values(result)
    if any(k not in found for k in keys):
        raise InputError(f"--from {path}: not a run with --set " + " --set ".join(f"{k}=…" for k in keys))
    return tuple(float(found[k]) for k in keys)


def label(point) -> str:
    return ",".join(f"{v:g}" for v in point)


def summarise(keys: list[str], runs: list[tuple[tuple, dict]]) -> dict:
    """`runs`: `(point, comparison result)`. Returns the axes, `perplexity[bits][label]` on validation,
    `score[label]` (mean log perplexity over the bit widths) and `chosen` `{key: value}`."""
    recipes = {r["recipe"] for _, res in runs for r in res["rows"] if r["recipe"] != "fp"}
    if len(recipes) > 1:
        raise InputError(f"the runs hold several recipes ({', '.join(sorted(recipes))}); sweep one at a time")
    ppl: dict[int, dict[str, float]] = {}
    for point, res in runs:
        if CHOOSE_ON not in (res.get("domains") or []):
            raise InputError(f"the run {label(point)} has no {CHOOSE_ON} domain")
        for row in res["rows"]:
            if row["recipe"] != "fp":
                ppl.setdefault(row["bits"], {})[label(point)] = row["perplexity"][CHOOSE_ON]
    bits = sorted(ppl, reverse=True)
    score = {label(p): sum(math.log(ppl[b][label(p)]) for b in bits) / len(bits)
             for p, _ in runs if all(label(p) in ppl[b] for b in bits)}
    best = min(score, key=score.get) if score else None
    fp = next((r["perplexity"][CHOOSE_ON] for _, res in runs for r in res["rows"] if r["recipe"] == "fp"), None)
    return {"recipe": recipes.pop() if recipes else None, "keys": keys,
            "axes": [sorted({p[i] for p, _ in runs}) for i in range(len(keys))], "bits": bits, "fp": fp,
            "perplexity": ppl, "score": score,
            "chosen": None if best is None else dict(zip(keys, map(float, best.split(",")))),
            "seconds": sum(res["seconds"] for _, res in runs)}


def text_table(s: dict) -> str:
    head = list(s["keys"]) + [f"ppl {CHOOSE_ON} {b} bits" for b in s["bits"]] + ["mean log ppl"]
    lines = []
    for point in itertools.product(*s["axes"]):
        key = label(point)
        vals = [s["perplexity"][b].get(key) for b in s["bits"]]
        if any(v is not None for v in vals):
            sc = s["score"].get(key)
            lines.append([f"{v:g}" for v in point] + ["-" if v is None else f"{v:.3f}" for v in vals]
                         + ["-" if sc is None else f"{sc:.4f}"])
    c = s["chosen"]
    tail = f"\n\n{s['recipe']}; full precision {CHOOSE_ON}: {s['fp']:.3f}" if s["fp"] else "\n"
    tail += f"\nchosen on {CHOOSE_ON}: " + ("-" if c is None else ", ".join(f"{k} = {v:g}" for k, v in c.items()))
    return rec.fmt_table(head, lines) + tail


def write_plot(s: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, len(s["bits"]), figsize=(4.4 * len(s["bits"]), 3.8), squeeze=False)
    chosen = tuple(s["chosen"].values()) if s["chosen"] else None
    for ax, b in zip(axes[0], s["bits"]):
        got = s["perplexity"][b]
        if len(s["keys"]) == 1:
            xs = [x for x in s["axes"][0] if label((x,)) in got]
            ax.plot(xs, [got[label((x,))] for x in xs], marker="o")
            if chosen:
                ax.axvline(chosen[0], color="r", linestyle=":", label="chosen")
                ax.legend(fontsize=7)
            if s["fp"]:
                ax.axhline(s["fp"], color="k", linestyle="--", linewidth=1)
            ax.set_xlabel(s["keys"][0])
            ax.set_ylabel(f"{CHOOSE_ON} perplexity")
        else:
            ys, xs = s["axes"]
            grid = np.array([[got.get(label((y, x)), np.nan) for x in xs] for y in ys])
            im = ax.imshow(grid, origin="lower", cmap="viridis_r", aspect="auto")
            for i, j in itertools.product(range(len(ys)), range(len(xs))):
                if np.isfinite(grid[i, j]):
                    dark = grid[i, j] > np.nanmedian(grid)          # viridis_r: high values are dark
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
            if chosen:
                ax.add_patch(plt.Rectangle((xs.index(chosen[1]) - 0.5, ys.index(chosen[0]) - 0.5), 1, 1,
                                           fill=False, edgecolor="r", linewidth=2))
            ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
            ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
            ax.set_xlabel(s["keys"][1])
            ax.set_ylabel(s["keys"][0])
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(f"{s['recipe']} {b} bits: {CHOOSE_ON} perplexity")
    rec.save_png(fig, path)


def main(argv=None) -> int:
    argv, extra = common.split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="ojbkq", help="a recipe name (ojbkq recipes) or file")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="one or two keys and their values (default: the ojbkq objective's μ and λ)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default bench/results/sweep_<recipe>.json")
    p.add_argument("--parts", default=None, help="folder for each point's comparison results (default: a temporary "
                   "one), so a sweep stopped part-way keeps the points it finished")
    p.add_argument("--from", dest="inputs", nargs="+", metavar="JSON",
                   help="summarise these comparison results (the keys: --grid's, else the runs' --set keys)")
    args = p.parse_args(argv)
    if args.inputs:
        results = rec.read_results(args.inputs, "--from")
        if not args.grid:                   # the keys the runs were made with
            args.grid = [k + "=0" for k in rec.set_values(results[0])]
            if not args.grid:
                raise InputError(f"--from {args.inputs[0]}: a run without --set overrides is no sweep point")
    grid = [parse_grid(g) for g in (args.grid or ["objective.mu=0.4,0.6,0.8,1", "objective.lam=0.25,0.5,0.75,1"])]
    if not 1 <= len(grid) <= 2:
        raise InputError(f"--grid given {len(grid)} times: sweep one or two keys")
    if "--domains" in extra:
        raise InputError("--domains: the sweep evaluates the validation split only, never the evaluation text")
    keys = [k for k, _ in grid]
    out = args.out or os.path.join(common.RESULTS, f"sweep_{args.recipe}.json")
    if args.inputs:
        runs = [(point_of(r, keys, path), r) for path, r in zip(args.inputs, results)]
    else:
        with tempfile.TemporaryDirectory(prefix="ojbkq-sweep-") as tmp:
            parts = args.parts or tmp
            os.makedirs(parts, exist_ok=True)
            runs, points = [], list(itertools.product(*(v for _, v in grid)))
            for i, point in enumerate(points):
                sets = [a for k, v in zip(keys, point) for a in ("--set", f"{k}={v:g}")]
                part = os.path.join(parts, "_".join(f"{k.split('.')[-1]}{v:g}" for k, v in zip(keys, point)) + ".json")
                rec.progress(f"{args.recipe} {label(point)} ({i + 1}/{len(points)})")
                common.compare_main(["--recipes", args.recipe, "--bits", *map(str, args.bits), "--device", args.device,
                               "--domains", CHOOSE_ON, *sets, "--out", part, *extra])
                runs.append((point, rec.read_results([part], "--parts")[0]))
    s = summarise(keys, runs)
    text = text_table(s)
    print()
    print(text)
    first = runs[0][1]
    result = {"model": first["model"], "device": first["device"], "dtype": first["dtype"], "tf32": first.get("tf32"),
              "group_size": first["group_size"], "calibration": first["calibration"],
              "evaluation": {CHOOSE_ON: first["evaluation"][CHOOSE_ON]}, "command": " ".join(sys.argv),
              "runs": [r.get("command") for _, r in runs], **s}
    stem = rec.write_json_and_table(out, result, text)
    write_plot(s, stem + ".png")
    return 0


if __name__ == "__main__":
    common.run_script(main, "recipe_sweep")

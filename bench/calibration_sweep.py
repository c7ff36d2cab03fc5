"""How much calibration text: every recipe's perplexity against the number of calibration windows.

Runs `ojbkq compare` (SmolLM2-135M) once per `--samples` value with the validation domain
(held-out windows of the calibration plays, the same text for every size) beside the evaluation
domains, or summarises such runs already made (`--from`). The choice is made on validation alone:
the size whose calibrated recipes have the lowest mean log perplexity there. Writes `--out` (JSON) and
beside it .txt and a .png of perplexity against calibration tokens, one panel per domain and bit width.

    python bench/calibration_sweep.py [--samples 16 32 64 128] [--device cuda] [--out FILE] [-- ojbkq compare options]
    python bench/calibration_sweep.py --from cal_16.json cal_32.json ... [--out FILE]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import common
from ojbkq_core import compare
from ojbkq_core import results as rec
from ojbkq_core.errors import InputError

CHOOSE_ON = "validation"


def summarise(runs: list[dict]) -> dict:
    """`runs`: comparison results (each with the validation domain) of one setup at several sizes.
    Returns `{"samples", "domains", "seqlen", "perplexity": {recipe: {bits: {domain: [ppl per size]}}},
    "score": [mean log validation ppl of the calibrated rows per size], "chosen": samples}`; a row a
    run lacks is None and leaves that size's score out of the choice."""
    runs = sorted(runs, key=lambda r: r["calibration"]["samples"])
    sizes = [r["calibration"]["samples"] for r in runs]
    domains = runs[0]["domains"]
    if CHOOSE_ON not in domains:
        raise InputError(f"the runs have no {CHOOSE_ON} domain: run ojbkq compare with --domains {CHOOSE_ON} ...")
    keys = list(dict.fromkeys((row["recipe"], row["bits"]) for r in runs for row in r["rows"]))
    table = {}
    for name, bits in keys:
        per = table.setdefault(name, {}).setdefault(bits, {d: [] for d in domains})
        for r in runs:
            row = next((x for x in r["rows"] if x["recipe"] == name and x["bits"] == bits), None)
            for d in domains:
                per[d].append(None if row is None else row["perplexity"][d])
    calibrated = [(n, b) for n, b in keys if n not in ("fp", "rtn")]
    score = []
    for i in range(len(sizes)):
        vals = [table[n][b][CHOOSE_ON][i] for n, b in calibrated]
        score.append(None if None in vals else sum(math.log(v) for v in vals) / len(vals))
    complete = [(s, n) for s, n in zip(score, sizes) if s is not None]
    return {"samples": sizes, "seqlen": runs[0]["calibration"]["seqlen"], "domains": domains, "perplexity": table,
            "score": score, "chosen": min(complete)[1] if complete else None}


def text_table(summary: dict) -> str:
    head = ["recipe", "bits", "domain"] + [f"{n}×{summary['seqlen']}" for n in summary["samples"]]
    lines = []
    for name, by_bits in summary["perplexity"].items():
        for bits, by_dom in by_bits.items():
            for d, vals in by_dom.items():
                lines.append([name, str(bits), d] + ["-" if v is None else f"{v:.3f}" for v in vals])
    lines.append(["mean log ppl", "", CHOOSE_ON] + ["-" if v is None else f"{v:.4f}" for v in summary["score"]])
    return rec.fmt_table(head, lines) + f"\n\nchosen on {CHOOSE_ON}: {summary['chosen']} windows"


def write_plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bits_all = sorted({b for by in summary["perplexity"].values() for b in by if b != 32}, reverse=True)
    doms = summary["domains"]
    fig, axes = plt.subplots(len(bits_all), len(doms), figsize=(4.6 * len(doms), 3.6 * len(bits_all)), squeeze=False)
    tokens = [n * summary["seqlen"] for n in summary["samples"]]
    for i, bits in enumerate(bits_all):
        for j, d in enumerate(doms):
            ax = axes[i][j]
            for name, by_bits in summary["perplexity"].items():
                if bits in by_bits:
                    pts = [(t, v) for t, v in zip(tokens, by_bits[bits][d]) if v is not None]
                    ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=name)
            fp = summary["perplexity"].get("fp", {}).get(32, {}).get(d)
            if fp and fp[0] is not None:
                ax.axhline(fp[0], color="k", linestyle="--", linewidth=1, label="full precision")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{bits} bits, {d}" + (" (choice made here)" if d == CHOOSE_ON else ""))
            ax.set_xlabel("calibration tokens")
            ax.set_ylabel("perplexity")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    rec.save_png(fig, path)


def main(argv=None) -> int:
    argv, extra = common.split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--device", default="auto")
    p.add_argument("--from", dest="inputs", nargs="+", metavar="JSON", help="summarise these comparison results")
    p.add_argument("--out", default=os.path.join(common.RESULTS, "calibration_sweep.json"))
    args = p.parse_args(argv)
    runs = []
    if args.inputs:
        runs = rec.read_results(args.inputs, "--from")
    else:
        with tempfile.TemporaryDirectory(prefix="ojbkq-calsweep-") as tmp:
            for i, n in enumerate(args.samples):
                rec.progress(f"calibration {n} windows ({i + 1}/{len(args.samples)})")
                out = os.path.join(tmp, f"cal_{n}.json")
                common.compare_main(["--samples", str(n), "--device", args.device, "--domains", CHOOSE_ON,
                               *compare.DEFAULT_DOMAINS, "--out", out, *extra])
                runs += rec.read_results([out], "--samples")
    summary = summarise(runs)
    text = text_table(summary)
    print(text)
    result = {"model": runs[0]["model"], "device": runs[0]["device"], "dtype": runs[0]["dtype"],
              "tf32": runs[0].get("tf32"), "group_size": runs[0]["group_size"], "command": " ".join(sys.argv),
              "runs": [r.get("command") for r in runs], **summary}
    stem = rec.write_json_and_table(args.out, result, text)
    write_plot(summary, stem + ".png")
    return 0


if __name__ == "__main__":
    common.run_script(main, "calibration_sweep")

"""Klein sampling's candidate count K: perplexity and seconds of the ojbkq recipe at K = 1, 4, 16, 64.

Runs `ojbkq compare` (SmolLM2-135M, the same calibration and evaluation data) once per K
with `--recipes ojbkq --set decoder.k=K`, then prints one table and writes the rows, labelled
`ojbkq k=K`, to `--out` (JSON, plus .txt beside it). K = 1 is the Babai path alone (candidate 0).

    python bench/klein_sweep.py [--k 1 4 16 64] [--bits 3] [--device cuda] [--out bench/results/klein_sweep.json]
                                [--parts DIR] [-- more ojbkq compare options, e.g. --samples 32]
    python bench/klein_sweep.py --from k1.json k4.json ... [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import common
from ojbkq_core import results as rec
from ojbkq_core.errors import InputError


def k_of(result: dict, path: str) -> int:
    """K of a comparison result made with `--set decoder.k=K`."""
    k = rec.set_values(result).get("decoder.k")
    if k is None:
        raise InputError(f"--from {path}: not a run with --set decoder.k=K")
    return int(k)


def main(argv=None) -> int:
    argv, extra = common.split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.path.join(common.RESULTS, "klein_sweep.json"))
    p.add_argument("--parts", default=None, help="folder for each K's comparison results (default: a temporary one), "
                   "so a sweep stopped part-way keeps the K values it finished")
    p.add_argument("--from", dest="inputs", nargs="+", metavar="JSON",
                   help="no run: the table of comparison results made with --set decoder.k=K")
    args = p.parse_args(argv)
    if args.inputs:
        results = [(k_of(res, path), res) for path, res in zip(args.inputs, rec.read_results(args.inputs, "--from"))]
    else:
        with tempfile.TemporaryDirectory(prefix="ojbkq-klein-") as tmp:
            parts = args.parts or tmp
            os.makedirs(parts, exist_ok=True)
            results = []
            for i, k in enumerate(args.k):
                out = os.path.join(parts, f"k{k}.json")
                rec.progress(f"klein K={k} ({i + 1}/{len(args.k)})")
                common.compare_main(["--recipes", "ojbkq", "--bits", str(args.bits), "--device", args.device,
                               "--set", f"decoder.k={k}", "--out", out, *extra])
                results.append((k, rec.read_results([out], "--parts")[0]))
    first = results[0][1]
    rows = [r for r in first["rows"] if r["recipe"] == "fp"]
    for k, res in results:
        rows += [{**r, "recipe": f"ojbkq k={k}", "k": k} for r in res["rows"] if r["recipe"] != "fp"]
    text = rec.table(rows, first["domains"])
    print()
    print(text)
    result = {k: v for k, v in first.items() if k not in ("rows", "ordering", "layer_ratios", "overrides", "command")}
    result.update(rows=rows, command=" ".join(sys.argv), seconds=sum(r["seconds"] for _, r in results))
    rec.write_json_and_table(args.out, result, text)
    return 0


if __name__ == "__main__":
    common.run_script(main, "klein_sweep")

"""The FP4 goals as paired verdicts, from the two FP4 tables of one device (`bench/fp4_tables.sh`):

- on each format, with and without the rotation: OJBKQ's perplexity below GPTQ's (and regularized-beam's, where
  the table has it);
- for each recipe and rotation: MXFP4's perplexity below NVFP4's (the goal is *within noise*: MXFP4 as good as
  NVFP4 within the windows' noise).

Both tables score the same windows, so rows of the two are paired window by window as within one table
(`ojbkq_core.results.verdict`).

    python bench/fp4_verdicts.py bench/results/fp4_nvfp4_cpu.json bench/results/fp4_mxfp4_cpu.json \
        --out bench/results/fp4_verdicts_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ojbkq_core.results import verdict  # noqa: E402


def rows_of(path: str) -> tuple[dict, list[str]]:
    """`{(recipe, rotation): row}` of a table and its domains; refuses a table with no FP4 grid."""
    table = json.load(open(path, encoding="utf-8"))
    rows = {}
    for r in table["rows"]:
        if r["recipe"] == "fp":
            continue
        rows[(r["recipe"].split("+")[0], r.get("rotation") or "none")] = r
    grids = {r.get("grid") for r in rows.values()}
    if len(grids) != 1 or grids & {None, "int"}:
        raise SystemExit(f"{path}: not one FP4 table (grids {sorted(map(str, grids))})")
    return {"grid": grids.pop(), "rows": rows, "device": table["device"]}, list(table["evaluation"])


def compare(a: dict, b: dict, domain: str, what: str) -> dict:
    v = verdict(a, b, domain)
    return {"claim": what, "domain": domain, "ppl": [a["perplexity"][domain], b["perplexity"][domain]], **v}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("nvfp4")
    ap.add_argument("mxfp4")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    (nv, domains), (mx, _) = rows_of(args.nvfp4), rows_of(args.mxfp4)
    if (nv["grid"], mx["grid"]) != ("nvfp4", "mxfp4"):
        raise SystemExit(f"expected an nvfp4 then an mxfp4 table, got {nv['grid']} and {mx['grid']}")
    out = []
    for table in (nv, mx):
        for rot in ("none", "hadamard"):
            for other in ("gptq", "regularized-beam"):
                a, b = table["rows"].get(("ojbkq", rot)), table["rows"].get((other, rot))
                if a is None or b is None:
                    continue
                for d in domains:
                    out.append({"grid": table["grid"], "rotation": rot, "better": "ojbkq", "worse": other,
                                **compare(a, b, d, f"{table['grid']}: ojbkq < {other} ({rot})")})
    for (recipe, rot), a in sorted(mx["rows"].items()):
        b = nv["rows"].get((recipe, rot))
        if b is None:
            continue
        for d in domains:
            out.append({"grid": "mxfp4 vs nvfp4", "rotation": rot, "better": recipe, "worse": recipe,
                        **compare(a, b, d, f"{recipe} ({rot}): mxfp4 < nvfp4")})
    record = {"nvfp4": args.nvfp4, "mxfp4": args.mxfp4, "device": nv["device"], "verdicts": out}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    width = max(len(o["claim"]) for o in out)
    print(f"{'claim':<{width}}  {'domain':<12} {'ppl':>17}  {'ratio':>6}  {'95% interval':>13}  verdict")
    for o in out:
        iv = o.get("ratio_interval") or [float("nan")] * 2
        print(f"{o['claim']:<{width}}  {o['domain']:<12} {o['ppl'][0]:8.3f} {o['ppl'][1]:8.3f}  "
              f"{o.get('ratio', float('nan')):6.4f}  {iv[0]:.4f}–{iv[1]:.4f}  {o['verdict']}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The records of a recipe comparison (`ojbkq compare`) and what is written from them: the text table,
the ordering and baseline verdicts, per-layer objective ratios, the plot, the Markdown report, and the
merging of several runs of one setup.

A result is a dict: the setup (model, device, dtype, calibration, evaluation, ...) and `rows`, one per
(recipe, bits) with its perplexity per evaluation domain (or, for an encoder, the fidelity of its
embeddings), objective sums and seconds; the full-precision row has recipe `fp`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

from .errors import InputError

# the perplexity ordering the recipes aim for, best first: each ≤ the next, gptq < rtn
CHAIN = ("ojbkq", "regularized-beam", "gptaq", "gptq", "rtn")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_table(head: list[str], lines: list[list[str]]) -> str:
    rows = [head] + lines
    widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(x) for x in lines])


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict], domains: list[str] | None = None) -> str:
    """The rows as a text table. With `domains`: perplexity per domain and its change against the
    full-precision row (in %); without: the encoder columns (cosine similarity, relative error)."""
    head = ["recipe", "bits", "group", "time s", "objective Σ", "‖ΔW·X‖² Σ"]
    fp = next((r for r in rows if r["recipe"] == "fp"), None)
    if domains:
        for d in domains:
            head += [f"ppl {d}", "95% interval", "Δ fp %"]
    else:
        head += ["cos sim", "rel err h"]
    lines = []
    for r in rows:
        cells = [r["recipe"], str(r["bits"]), _num(r["group_size"], "d"), f"{r['seconds']:.1f}",
                 _num(r["objective_sum"], ".5g"), _num(r["sym_loss_sum"], ".5g")]
        if domains:
            for d in domains:
                v = r["perplexity"][d]
                ref = fp["perplexity"][d] if fp else None
                iv = r.get("perplexity_interval", {}).get(d)
                cells += [f"{v:.3f}", f"{iv[0]:.3f}–{iv[1]:.3f}" if iv else "-",
                          "-" if ref is None or r is fp else f"{100 * (v / ref - 1):+.1f}"]
        else:
            cells += [f"{r['cosine']:.5f}", f"{r['rel_err']:.4f}"]
        lines.append(cells)
    return fmt_table(head, lines)


def verdict(a: dict, b: dict, domain: str) -> dict:
    """The paired comparison of rows `a` and `b` on `domain`'s windows (`intervals.paired`: `verdict`
    holds, misses or within noise on "a's perplexity is below b's", `ratio` and `ratio_interval`), or
    `{"verdict": None}` when a row has no per-window scores (results written before they were kept)."""
    from .intervals import paired
    na, nb = (r.get("window_nll", {}).get(domain) for r in (a, b))
    if not na or not nb or len(na) != len(nb):
        return {"verdict": None}
    p = paired(na, nb)
    return {"verdict": p["verdict"], "ratio": p["ratio"], "ratio_interval": p["ratio_interval"]}


def ordering(rows: list[dict], domains: list[str], chain=CHAIN) -> list[dict]:
    """For each bit width and domain, each neighbouring pair of `chain` present in `rows`: whether the
    better-ranked recipe's perplexity is ≤ the next one's (strictly < for the last pair) as measured
    (`holds`), and the paired verdict on its windows (`verdict`)."""
    out = []
    for bits in sorted({r["bits"] for r in rows if r["recipe"] != "fp"}, reverse=True):
        by = {r["recipe"]: r for r in rows if r["bits"] == bits}
        present = [c for c in chain if c in by]
        for d in domains:
            for a, b in zip(present, present[1:]):
                pa, pb = by[a]["perplexity"][d], by[b]["perplexity"][d]
                strict = b == chain[-1]
                out.append({"bits": bits, "domain": d, "better": a, "worse": b, "ppl": [pa, pb],
                            "holds": bool(pa < pb if strict else pa <= pb), "relation": "<" if strict else "≤",
                            **verdict(by[a], by[b], d)})
    return out


BASELINE = "gptqmodel-gptq"
ROTATED = "+"           # a rotated row's recipe is `<recipe>+<rotation>` (`ojbkq compare --rotations`)


def against_baseline(rows: list[dict], domains: list[str], baseline: str = BASELINE) -> list[dict]:
    """For each bit width with a `baseline` row (GPTQModel's GPTQ, merged in from
    `bench/gptqmodel_baseline.py`), each of the project's recipes and each domain: whether the recipe's
    perplexity is below the baseline's."""
    out = []
    for base in (r for r in rows if r["recipe"] == baseline):
        for r in rows:
            if (r["bits"] != base["bits"] or r["recipe"].split(ROTATED)[0] in ("fp", "rtn")
                    or r["recipe"].startswith("gptqmodel")):
                continue
            for d in domains:
                pr, pb = r["perplexity"][d], base["perplexity"][d]
                out.append({"bits": r["bits"], "domain": d, "recipe": r["recipe"], "ppl": [pr, pb],
                            "beats": bool(pr < pb), **verdict(r, base, d)})
    return out


def against_unrotated(rows: list[dict], domains: list[str]) -> list[dict]:
    """For each rotated row (`<recipe>+<rotation>`) with its recipe's unrotated row at the same bit width,
    each domain: whether the rotated row's perplexity is below the unrotated one's, with the paired verdict."""
    out = []
    for r in rows:
        if ROTATED not in r["recipe"]:
            continue
        plain = next((x for x in rows if x["recipe"] == r["recipe"].split(ROTATED)[0] and x["bits"] == r["bits"]), None)
        if plain is None:
            continue
        for d in domains:
            pr, pb = r["perplexity"][d], plain["perplexity"][d]
            out.append({"bits": r["bits"], "domain": d, "recipe": r["recipe"], "unrotated": plain["recipe"],
                        "ppl": [pr, pb], "beats": bool(pr < pb), **verdict(r, plain, d)})
    return out


def verdict_counts(items: list[dict]) -> dict[str, int]:
    """How many comparisons got each verdict (`intervals.VERDICTS`; `None`: no per-window scores)."""
    from .intervals import VERDICTS
    out = {v: 0 for v in VERDICTS}
    for o in items:
        key = o.get("verdict")
        out[key if key in out else "no windows"] = out.get(key if key in out else "no windows", 0) + 1
    return out


def layer_ratios(rows: list[dict], reference: str = "gptq") -> dict:
    """Per recipe and bit width: the per-layer objective divided by the reference recipe's on the same
    layer, summarised as median and worst (largest) ratio with that layer's name."""
    out = {}
    for r in rows:
        own = reference + r["recipe"][len(r["recipe"].split(ROTATED)[0]):]      # gptq+hadamard for rotated rows
        ref = next((x for x in rows if x["recipe"] == own and x["bits"] == r["bits"]), None)
        if not ref or r is ref or not r.get("layer_objective"):
            continue
        ratios = {k: v / ref["layer_objective"][k] for k, v in r["layer_objective"].items()
                  if ref["layer_objective"].get(k)}
        worst = max(ratios, key=ratios.get)
        out[f"{r['recipe']}@{r['bits']}"] = {"median": float(np.median(list(ratios.values()))),
                                            "worst": ratios[worst], "worst_layer": worst,
                                            "below_reference": sum(v < 1 for v in ratios.values()),
                                            "layers": len(ratios)}
    return out


def write_plot(rows: list[dict], domains: list[str], path: str) -> dict:
    """PNG: perplexity against bits, one panel per domain, one line per recipe, full precision as a
    dashed line. Returns what the panels hold, read back from the figure:
    `{domain: {label: ([bits, ...], [perplexity, ...])}}`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recipes_seen = list(dict.fromkeys(r["recipe"] for r in rows if r["recipe"] != "fp"))
    fp = next((r for r in rows if r["recipe"] == "fp"), None)
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.2), squeeze=False)
    drawn = {}
    for ax, d in zip(axes[0], domains):
        for name in recipes_seen:
            pts = sorted((r["bits"], r["perplexity"][d]) for r in rows if r["recipe"] == name)
            ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", label=name)
        if fp:
            ax.axhline(fp["perplexity"][d], color="k", linestyle="--", linewidth=1, label="full precision")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["bits"] for r in rows if r["recipe"] != "fp"}))
        ax.set_xlabel("bits")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(d)
        ax.grid(True, which="both", alpha=0.3)
        drawn[d] = {ln.get_label(): ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
                    for ln in ax.get_lines()}
    axes[0][0].legend(fontsize=8)
    save_png(fig, path, dpi=110)
    return drawn


def report_markdown(result: dict, plot_name: str | None) -> str:
    """A short Markdown report of a perplexity run: setup, table, plot, ordering, per-layer objectives."""
    rows, domains = result["rows"], list(result["evaluation"])
    cal, ev = result["calibration"], result["evaluation"]
    fp = next(r for r in rows if r["recipe"] == "fp")
    lines = [f"# {result['model']}: perplexity by recipe and bit width", "",
             f"Device {result['device']}{_cpu_said(result.get('cpu'))}, {result['dtype']}, "
             f"{result['torch_threads']} torch threads; "
             f"whole job {result['seconds']:.0f} s wall, {result.get('cpu_seconds', 0):.0f} s CPU"
             + ("" if result.get("complete", True) else "; **incomplete: the run stopped before every row**")
             + ".", "",
             *[f"    {c}" for c in ([p["command"] for p in result["parts"]] if result.get("parts")
                                    else [result["command"]] if result.get("command") else [])], "",
             f"- Calibration: {cal['samples']} × {cal['seqlen']} tokens from "
             + (f"{cal['plays']} Shakespeare plays" if cal.get("plays") else f"{cal.get('path') or cal.get('dataset')}")
             + f" (seed {cal['seed']}).",
             *[f"- Evaluation `{d}` ({ev[d]['dataset']}): {ev[d]['windows']} windows × {ev[d]['seqlen']} tokens "
               f"of held-out text" + (f" (the text has {ev[d]['text_tokens']:,} tokens)" if ev[d].get("text_tokens")
                                      else "") + f", full precision perplexity {fp['perplexity'][d]:.3f}."
               for d in domains],
             f"- Grid: {_grid_said(rows, result['group_size'])}; recipes as `ojbkq recipes` lists them "
             f"(overrides: {', '.join(result['overrides']) or 'none'}).", ""]
    head = ["recipe", "bits", "seconds", "objective Σ"] + [f"ppl {d} (Δ fp) [95% interval]" for d in domains]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["recipe"], str(r["bits"]), f"{r['seconds']:.1f}", _num(r["objective_sum"], ".4g")]
        for d in domains:
            v, iv = r["perplexity"][d], r.get("perplexity_interval", {}).get(d)
            cell = f"{v:.3f}" if r is fp else f"{v:.3f} ({100 * (v / fp['perplexity'][d] - 1):+.1f}%)"
            cells.append(cell + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![perplexity against bits]({plot_name})" if plot_name else "(no plot: matplotlib missing)", "",
              "## Ordering " + " ≤ ".join(CHAIN[:-1]) + " < " + CHAIN[-1], "", VERDICT_NOTE, "",
              "Verdicts: " + _counts(result["ordering"]) + ".", ""]
    for o in result["ordering"]:
        lines.append(f"- {o['bits']} bits, {o['domain']}: {o['better']} {o['ppl'][0]:.3f} {o['relation']} "
                     f"{o['worse']} {o['ppl'][1]:.3f}: {_said(o)}")
    if result.get("against_baseline"):
        lines += ["", f"## Against GPTQModel's GPTQ (`{BASELINE}`, same calibration windows and evaluation)", "",
                  "Each recipe's claim is that its perplexity is below GPTQModel's. Verdicts: "
                  + _counts(result["against_baseline"]) + ".", ""]
        for o in result["against_baseline"]:
            lines.append(f"- {o['bits']} bits, {o['domain']}: {o['recipe']} {o['ppl'][0]:.3f} vs {o['ppl'][1]:.3f}: "
                         f"{_said(o)}")
    if result.get("against_unrotated"):
        lines += ["", "## Rotated against unrotated (the same recipe and bits)", "",
                  "Each rotated row's claim is that its perplexity is below its recipe's without rotation. Verdicts: "
                  + _counts(result["against_unrotated"]) + ".", ""]
        for o in result["against_unrotated"]:
            lines.append(f"- {o['bits']} bits, {o['domain']}: {o['recipe']} {o['ppl'][0]:.3f} vs {o['unrotated']} "
                         f"{o['ppl'][1]:.3f}: {_said(o)}")
    if result.get("layer_ratios"):
        lines += ["", "## Per-layer objective relative to gptq (same bits)", "",
                  "| recipe @ bits | median | worst | worst layer | layers below gptq |", "|---|---|---|---|---|"]
        for k, v in result["layer_ratios"].items():
            lines.append(f"| {k} | {v['median']:.3f} | {v['worst']:.3f} | {v['worst_layer']} | "
                         f"{v['below_reference']}/{v['layers']} |")
        lines += ["", "Each recipe's own objective differs from gptq's symmetric one, so ratios below 1 "
                  "mean a smaller value of that recipe's objective, not of gptq's."]
    return "\n".join(lines) + "\n"


VERDICT_NOTE = ("Each comparison is paired: the mean difference of the two rows' log-likelihoods on the same "
                "windows, with a 95% bootstrap interval over the windows. *holds*: the interval lies on the "
                "claimed side; *misses*: it lies on the other side; *within noise*: it contains no "
                "difference. The ratio is the first perplexity over the second.")


FP4_SAID = {"nvfp4": "NVFP4 (FP4 E2M1 values, groups of 16, FP8 E4M3 scales under a per-tensor FP32 scale)",
            "mxfp4": "MXFP4 (FP4 E2M1 values, groups of 32, power-of-two scales)"}


def _grid_said(rows: list, group_size) -> str:
    """The rows' grid in words: FP4 where the rows ran on one, else the integer min-max grid."""
    grids = {r.get("grid", "int") for r in rows if r["recipe"] != "fp"}
    if len(grids) == 1 and next(iter(grids)) in FP4_SAID:
        return FP4_SAID[next(iter(grids))]
    return f"group {group_size}, asymmetric min-max"


def _cpu_said(cpu: dict | None) -> str:
    """` (torch AVX2, bfloat16 not native)` for a record's `cpu` (`precision.cpu_capability`); '' without one."""
    if not cpu:
        return ""
    return f" (torch {cpu['capability']}, bfloat16 {'native' if cpu['bf16_native'] else 'not native'})"


def _said(o: dict) -> str:
    if o.get("verdict") is None:
        return ("as measured, " + ("holds" if o.get("holds", o.get("beats")) else "**misses**")
                + " (no per-window scores, so no verdict)")
    word = o["verdict"] if o["verdict"] == "holds" else f"**{o['verdict']}**"
    lo, hi = o["ratio_interval"]
    return f"{word} (ratio {o['ratio']:.4f}, 95% interval {lo:.4f}–{hi:.4f})"


def _counts(items: list[dict]) -> str:
    return ", ".join(f"{n} {k}" for k, n in verdict_counts(items).items() if n or k != "no windows")


def _atomic(path: str, write) -> None:
    """Write `path` through a temporary file beside it (nothing half-written on failure)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)                       # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_png(fig, path: str, dpi: int = 100) -> None:
    """Lay out a matplotlib figure, write it as PNG in one step (`_atomic`) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)


def write_text(path: str, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(path, w)


def read_results(paths: list[str], option: str) -> list[dict]:
    """The main-job JSON results in `paths`; a file that cannot be read is named with `option`."""
    out = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                out.append(json.load(f))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{option} {p}: cannot read it as the JSON of `ojbkq compare` ({type(exc).__name__})") from None
    return out


def set_values(result: dict) -> dict[str, str]:
    """The `--set KEY=VALUE` overrides a comparison was made with, as `{key: value}` (spaces dropped)."""
    return dict(o.replace(" ", "").split("=", 1) for o in result.get("overrides") or [] if "=" in o)


def merge(paths: list[str]) -> dict:
    """One result from the JSON results of several runs of the same model, data and device (e.g. one
    per bit width, run side by side): rows joined and ordered by bit width, one full-precision row,
    times summed; a file that is itself a merge contributes its own list of runs."""
    return merge_results(read_results(paths, "--merge"), paths)


# what two results must share to sit in one table
SETUP = ("model", "device", "dtype", "group_size", "calibration", "overrides")


def fit_baseline(run: dict, base: dict) -> tuple[dict | None, str]:
    """`base` (e.g. GPTQModel's rows, `bench/gptqmodel_baseline.py`) fitted to the comparison `run`: its
    rows at `run`'s bit widths, each domain's scores cut to `run`'s first windows (windows are consecutive
    from the start of the text, so these are the windows `run` scored) with the perplexity and its interval
    recomputed from them. `(None, why)` when its setup (`SETUP`) or evaluation differs, or it scored fewer
    windows."""
    from .intervals import interval
    for k in SETUP:
        if base.get(k) != run.get(k):
            return None, f"its {k} is {json.dumps(base.get(k))}, this run's {json.dumps(run.get(k))}"
    bits = {r["bits"] for r in run["rows"] if r["recipe"] != "fp"}
    ev = run["evaluation"]
    for d, e in ev.items():
        b = (base.get("evaluation") or {}).get(d)
        if b is None or any(b.get(x) != e.get(x) for x in ("dataset", "seqlen", "text_tokens", "bos")):
            return None, f"it does not score {d} as this run does"
        if b.get("windows", 0) < e.get("windows", 0):
            return None, f"it scored {b.get('windows')} windows of {d}, this run {e.get('windows')}"
    rows = []
    for r in base.get("rows", []):
        if r["recipe"] == "fp" or r["bits"] not in bits:
            continue
        if any(len((r.get("window_nll") or {}).get(d) or []) < e["windows"] for d, e in ev.items()):
            return None, f"its {r['recipe']} row at {r['bits']} bits keeps no per-window scores to cut"
        nll = {d: list(r["window_nll"][d][:e["windows"]]) for d, e in ev.items()}
        data = {**r.get("data", {}), "evaluation": ev}
        rows.append({**r, "data": data, "window_nll": nll,
                     "perplexity": {d: float(np.exp(np.mean(v))) for d, v in nll.items()},
                     "perplexity_interval": {d: interval(v) for d, v in nll.items()}})
    if not rows:
        return None, f"it has no rows at {', '.join(map(str, sorted(bits)))} bits"
    return {**base, "evaluation": ev, "domains": run.get("domains"), "rows": rows}, ""


def baseline_part(part: dict) -> bool:
    """Whether an entry of a merged result's `parts` is a baseline file (GPTQModel's rows)."""
    return bool(part.get("baseline")) or "gptqmodel_baseline.py" in (part.get("command") or "")


def merge_results(parts: list[dict], paths: list[str]) -> dict:
    """`merge` of results in memory; `paths` names each (a file name, or a label for a run not written)."""
    for p, part in zip(paths[1:], parts[1:]):
        for k in (*SETUP, "evaluation"):
            if part.get(k) != parts[0].get(k):
                raise InputError(f"--merge {p}: {k} differs from {paths[0]}'s; merge runs of the same setup only")
    result = {k: v for k, v in parts[0].items() if k not in ("rows", "ordering", "layer_ratios")}
    rows, seen = [r for r in parts[0]["rows"] if r["recipe"] == "fp"][:1], set()
    for part in parts:                                  # a (recipe, bits) measured twice: the first file's row
        for r in part["rows"]:
            if r["recipe"] != "fp" and (r["recipe"], r["bits"]) not in seen:
                seen.add((r["recipe"], r["bits"]))
                rows.append(r)
    # by bit width, each width's rows in the order read, GPTQModel's rows after the project's
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (-r["bits"], r["recipe"].startswith(BASELINE)))
    listed = []                                         # a merged file lists the runs it was made of
    for p, part in zip(paths, parts):
        own = [r for r in part["rows"] if r["recipe"] != "fp"]
        listed += part.get("parts") or [{"file": os.path.basename(p), "command": part.get("command"),
                                         "seconds": part["seconds"], "cpu_seconds": part.get("cpu_seconds"),
                                         **({"baseline": True} if own and all(r["recipe"].startswith(BASELINE)
                                                                              for r in own) else {})}]
    result.update(rows=rows, seconds=sum(p["seconds"] for p in parts),
                  cpu_seconds=sum(p.get("cpu_seconds", 0.0) for p in parts),
                  complete=all(p.get("complete", True) for p in parts), parts=listed)
    return result


def write_json_and_table(out: str, result: dict, text: str) -> str:
    """Write `out` (the JSON records) and the text table beside it (.txt); returns the common stem."""
    stem = os.path.splitext(out)[0]
    write_text(out, json.dumps(result, indent=2) + "\n")
    write_text(stem + ".txt", text + "\n")
    return stem


def write_results(result: dict, out: str) -> None:
    """Print the table; write `out` (JSON) and beside it .txt, and for perplexity runs .png and .md."""
    rows, domains = result["rows"], result.get("domains") or []
    text = table(rows, domains or None)
    print()
    print(text)
    if domains:
        result["ordering"] = ordering(rows, domains)
        result["layer_ratios"] = layer_ratios(rows)
        result["against_baseline"] = against_baseline(rows, domains)
        result["against_unrotated"] = against_unrotated(rows, domains)
    stem = write_json_and_table(out, result, text)
    written = ["json", "txt"]
    if domains:
        plot = None
        if importlib.util.find_spec("matplotlib") is None:
            progress("compare: matplotlib is not installed, so no plot is drawn (pip install matplotlib)")
        else:
            write_plot(rows, domains, stem + ".png")
            plot = os.path.basename(stem) + ".png"
            written.append("png")
        write_text(stem + ".md", report_markdown(result, plot))
        written.append("md")
    print(f"\n{len(rows)} rows, {result['seconds']:.0f}s -> {stem}.{{{','.join(written)}}}")


def metric(row: dict) -> str:
    """A row's scores in one line: perplexity per domain, or an encoder's fidelity."""
    if "perplexity" in row:
        return "ppl " + ", ".join(f"{d} {v:.3f}" for d, v in row["perplexity"].items())
    return f"cos {row['cosine']:.5f} rel err {row['rel_err']:.4f}"

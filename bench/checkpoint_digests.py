"""Checkpoint bytes before and after a change: sha256 of every file nine tiny `ojbkq quantize` runs write.

The runs: tiny random Llama and GPT-2 models (seeded, built here, byte-level tokenizer) quantized on the
test calibration text by the gptq, ojbkq, gptaq, regularized-successive and regularized-beam recipes, in
the recipes' compressed-tensors format and the gptq (GPT-2's Conv1D modules) and fake formats, one run with `quant.skip`. Each run's folder name is fixed
under `--workdir`, so the resolved `ojbkq_config.yaml` is comparable too; the report is compared by its
per-layer losses and draws (its timings differ). Run it on the code before a change and after it:

    python bench/checkpoint_digests.py --workdir /tmp/digests --out before.json
    python bench/checkpoint_digests.py --workdir /tmp/digests --out after.json --compare before.json

For code that is not installed (an older checkout), put its folders first: `PYTHONPATH=OLD:OLD/adapters`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB_TXT = os.path.join(ROOT, "tests", "data", "calib.txt")
RUNS = [("llama", "gptq", []), ("llama", "ojbkq", ["decoder.k=4"]), ("llama", "gptaq", []),
        ("llama", "regularized-successive", []), ("gpt2", "gptq", ["output.format=gptq"]),
        ("gpt2", "regularized-beam", ["decoder.width=2", "output.format=gptq"]),
        ("llama", "gptq", ["output.format=fake"]), ("llama", "ojbkq", ["decoder.k=4", "quant.skip=*.o_proj"]),
        ("llama", "gptaq", ["output.format=compressed-tensors", "quant.act_order=false"])]


def tiny_models(folder: str) -> dict[str, str]:
    """The two seeded tiny models saved with the byte-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from ojbkq_core.data import byte_tokenizer
    out = {}
    for arch in ("llama", "gpt2"):
        torch.manual_seed(0)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=256, tie_word_embeddings=False))
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                               bos_token_id=0, eos_token_id=0))
        out[arch] = os.path.join(folder, arch)
        model.eval().save_pretrained(out[arch])
        byte_tokenizer().save_pretrained(out[arch])
    return out


def recipe_arg(name: str) -> str:
    """A built-in recipe by name, or by its file where the code under test kept recipes in `configs/`
    (so that the code before the recipes moved into the package can be measured too)."""
    import ojbkq_core
    old = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ojbkq_core.__file__))), "configs",
                       f"{name}.yaml")
    return old if os.path.isfile(old) else name


def digest(folder: str) -> dict[str, str]:
    files = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        if name == "ojbkq_report.json":
            layers = json.loads(data)["layers"]
            data = json.dumps({k: (v["loss"], v["sym_loss"], v["draws"]) for k, v in layers.items()},
                              sort_keys=True).encode()
            name = "ojbkq_report.json (layer losses)"
        files[name] = hashlib.sha256(data).hexdigest()
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="emptied and reused: the same path gives comparable configs")
    p.add_argument("--out", required=True, help="JSON: run → file → sha256")
    p.add_argument("--compare", default=None, help="an earlier --out to compare with; exit 1 when any file differs")
    args = p.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    models = tiny_models(args.workdir)
    result = {}
    for i, (arch, recipe, extra) in enumerate(RUNS):
        out = os.path.join(args.workdir, f"out{i}")
        sets = [f"model.path={models[arch]}", "model.dtype=float32", "calibration.dataset=text",
                f"calibration.path={CALIB_TXT}", "calibration.samples=4", "calibration.seqlen=32",
                "quant.group_size=32", f"output.dir={out}", "eval.perplexity=[]", "device=cpu", *extra]
        subprocess.run([sys.executable, "-m", "ojbkq_core.cli", "quantize", recipe_arg(recipe),
                        *(f"--set={s}" for s in sets)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                       capture_output=True)
        key = f"{arch} {recipe} {' '.join(extra)}".strip()
        result[key] = digest(out)
        print(f"{key}: {len(result[key])} files", flush=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if not args.compare:
        return 0
    before = json.load(open(args.compare, encoding="utf-8"))
    differ = {k: sorted(f for f in set(v) | set(before.get(k, {})) if v.get(f) != before.get(k, {}).get(f))
              for k, v in result.items()}
    for k, files in differ.items():
        print(f"{k}: " + ("identical" if not files else "DIFFERS: " + ", ".join(files)))
    return 1 if any(differ.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

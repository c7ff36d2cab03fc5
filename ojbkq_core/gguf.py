"""A GGUF checkpoint as a plain transformers model folder.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=NAME)`, with the `gguf` package)
and dequantizes every tensor to float; the config it builds still carries the GGUF
`quantization_config`. `convert_gguf` rebuilds the model from that config without it, loads the
dequantized state dict and saves a normal folder (config.json, safetensors, tokenizer), written
atomically, so the rest of the project loads it like any other checkpoint (`pipeline.load_model`).

The weights are those the file stores: a Q4_1 file gives a float model whose every row is 4-bit within
blocks of 32 inputs, not the weights the file was made from.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch

from .errors import InputError

log = logging.getLogger("ojbkq")

MARKER = "gguf_source.txt"
CONVERSION = 2          # the marker names it: a folder converted by an earlier rule is converted again


SAMPLE = "The quick brown fox jumps over the lazy dog, then it walks back to the forest before the night."


def check_tokenizer(tokenizer, where: str) -> None:
    """`InputError` when a tokenizer of a large vocabulary (> 1000 tokens) splits plain English into
    single characters: transformers 5.17 builds Gemma 3's SentencePiece tokenizer from the GGUF file that
    way (5.25 reads it right), which would quadruple the token counts and wreck every perplexity."""
    n = len(tokenizer(SAMPLE, add_special_tokens=False)["input_ids"])
    if len(tokenizer) > 1000 and n >= 0.8 * len(SAMPLE):
        import transformers
        raise InputError(f"{where}: transformers {transformers.__version__} reads the file's tokenizer as one that "
                         f"splits text into characters ({n} tokens for {len(SAMPLE)} characters of English); "
                         f"convert it with the transformers this project pins (5.25 reads it right)")


def special_tokens_rule(gguf_path: str) -> dict:
    """The file's `tokenizer.ggml.add_bos_token` / `add_eos_token` flags as tokenizer_config.json keys
    (`add_bos_token`, `add_eos_token`); the keys the file does not hold are left out."""
    from gguf import GGUFReader
    fields = GGUFReader(gguf_path).fields
    out = {}
    for key in ("add_bos_token", "add_eos_token"):
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is not None and f.data:
            out[key] = bool(f.parts[f.data[0]][0])
    return out


def keep_special_tokens(gguf_path: str, config_path: str) -> None:
    """Write the file's BOS/EOS rule (`special_tokens_rule`) into the saved tokenizer_config.json, which
    transformers' GGUF reader leaves without it: Gemma's file says `add_bos_token: true`, and calibration and
    evaluation windows start with BOS for such a model (`data.bos_id`)."""
    import json
    rule = special_tokens_rule(gguf_path)
    if not rule:
        return
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(rule)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Save the model in the GGUF file `gguf_path` as a transformers folder `out_dir` (weights in
    `dtype`). A folder already converted from the same file (same name and size) is reused.
    Returns `out_dir`."""
    if not os.path.isfile(gguf_path):
        raise InputError(f"{gguf_path}: no such GGUF file")
    source = f"{os.path.basename(gguf_path)} {os.path.getsize(gguf_path)} conversion {CONVERSION}\n"
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker) and open(marker, encoding="utf-8").read() == source:
        return out_dir
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise InputError(f"{gguf_path}: reading GGUF needs the PyPI package gguf: pip install gguf") from None
    import transformers
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{gguf_path}: transformers cannot read it as a GGUF checkpoint "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    check_tokenizer(tokenizer, gguf_path)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"{gguf_path}: the GGUF tensors do not match {type(model).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gguf-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        keep_special_tokens(gguf_path, os.path.join(tmp, "tokenizer_config.json"))
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            f.write(source)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s -> %s (%s, %d parameters)", gguf_path, out_dir, type(model).__name__,
             sum(p.numel() for p in model.parameters()))
    return out_dir

"""Runs with `rotation` (ojbkq_core/rotation.py through the pipeline): the same checkpoint streamed or whole,
the full-precision perplexity of the rotated model the original's, ordinary checkpoints that loaders read,
and models that do not rotate refused before any work."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import yaml

from ojbkq_core.errors import InputError
from ojbkq_core.pipeline import CONFIG_FILE, REPORT_FILE, load_model, run
from ojbkq_core.spec import load_spec
from tiny_models import (CALIB_TXT, EVAL_TXT, offline, one_thread, save, tied_llama, tiny_gpt2, tiny_llama,  # noqa: F401
                         tiny_moe)

ROTATED = ["rotation.residual=hadamard", "rotation.heads=hadamard"]


def _sets(model_dir, out, *extra):
    return [f"model.path={model_dir}", "model.dtype=float32", "calibration.dataset=text",
            f"calibration.path={CALIB_TXT}", "calibration.samples=4", "calibration.seqlen=32",
            "quant.group_size=32", f"output.dir={out}", "device=cpu", "eval.perplexity=[]", f"eval.path={EVAL_TXT}",
            "eval.seqlen=64", "eval.samples=4", *extra]


MODELS = {"llama": lambda: tiny_llama(layers=3), "tied-llama": lambda: tied_llama(seed=3, layers=3),
          "qwen3_moe": lambda: tiny_moe("qwen3_moe", layers=2)}


def digests(folder) -> dict:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if f.endswith((".safetensors", "config.json"))}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_rotated_run_streams_the_bytes_of_a_whole_one_and_keeps_the_models_perplexity(arch, tmp_path):
    folder = save(MODELS[arch](), str(tmp_path / arch))
    plain = run(load_spec("gptq", _sets(folder, tmp_path / "plain", "model.stream=false")))
    whole = run(load_spec("gptq", _sets(folder, tmp_path / "whole", "model.stream=false", *ROTATED)))
    streamed = run(load_spec("gptq", _sets(folder, tmp_path / "streamed", "model.stream=true", *ROTATED)))
    assert "streaming" in streamed and "streaming" not in whole
    assert digests(tmp_path / "whole") == digests(tmp_path / "streamed")
    assert digests(tmp_path / "whole") != digests(tmp_path / "plain")
    assert whole["rotation"] == streamed["rotation"] and whole["rotation"]["residual"] == "hadamard"
    assert whole["rotation"]["untied"] == (arch == "tied-llama") and plain["rotation"] is None
    # the rotated float model is the original: its perplexity, scored before quantizing, is the model's
    assert whole["perplexity"]["text"]["fp"] == pytest.approx(plain["perplexity"]["text"]["fp"], rel=1e-5)
    assert streamed["perplexity"] == whole["perplexity"]
    saved = yaml.safe_load(open(tmp_path / "streamed" / CONFIG_FILE))
    assert saved["rotation"] == {"residual": "hadamard", "heads": "hadamard", "seed": 0}
    assert json.load(open(tmp_path / "streamed" / REPORT_FILE))["rotation"] == streamed["rotation"]


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "fake"])
def test_a_rotated_checkpoint_is_an_ordinary_one(fmt, tmp_path):
    """transformers (through the format's loader) reads it as the same architecture, its norms are ones, its
    head is untied where folding made it differ, and its perplexity is the one the run reported."""
    from ojbkq_core.api import load
    from ojbkq_core.data import evaluation_ids
    from ojbkq_core.perplexity import perplexity
    folder = save(tied_llama(seed=3, layers=3), str(tmp_path / "m"))
    rep = run(load_spec("gptq", _sets(folder, tmp_path / "q", f"output.format={fmt}", *ROTATED)))
    config = json.load(open(tmp_path / "q" / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    model = load(str(tmp_path / "q"))
    assert type(model).__name__ == "LlamaForCausalLM"
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(torch.all(p == 1) for p in norms)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    _, tok = load_model(folder, "float32")
    got = perplexity(model.float(), evaluation_ids(tok, None, EVAL_TXT), 64, 4)["perplexity"]
    assert got == pytest.approx(rep["perplexity"]["text"]["quantized"], rel=1e-5)


def test_a_model_that_does_not_rotate_is_refused_before_any_work(tmp_path):
    folder = save(tiny_gpt2(layers=2), str(tmp_path / "gpt2"))
    for stream in ("true", "false"):
        with pytest.raises(InputError, match="rotat") as e:
            run(load_spec("gptq", _sets(folder, tmp_path / "q", f"model.stream={stream}", *ROTATED)))
        assert "\n" not in str(e.value) and "Llama" in str(e.value)
        assert not os.path.exists(tmp_path / "q") and not os.path.exists(tmp_path / ".q.partial")


def test_rotation_keys_are_checked_where_they_enter():
    with pytest.raises(InputError, match=r"rotation.residual='hadamart'.*did you mean 'hadamard'"):
        load_spec("gptq", ["rotation.residual=hadamart"])
    with pytest.raises(InputError, match="rotation.heads='random'"):
        load_spec("gptq", ["rotation.heads=random"])
    assert load_spec("gptq", ["rotation.residual=none"]).rotation.on is False

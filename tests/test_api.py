"""The Python API: `quantize` on a model in memory or a folder gives the bytes `ojbkq quantize` gives,
`save` writes every registered format, `load` reads the folder back; the README's snippet runs."""
import os
import re

import pytest
import torch

import ojbkq_core as oq
from ojbkq_core import cli
from ojbkq_core.errors import InputError
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = {"model.dtype": "float32", "calibration.dataset": "text", "calibration.path": CALIB_TXT,
        "calibration.samples": 4, "calibration.seqlen": 32, "quant.group_size": 32, "quant.bits": 3,
        "device": "cpu", "eval.perplexity": [], "decoder.k": 4}
GPTQ_SETS = {k: v for k, v in SETS.items() if k != "decoder.k"}


def tensors_bytes(folder: str) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.endswith(".safetensors")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save(tiny_llama(layers=2), str(tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def cli_out(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "q")
    sets = [f"{k}={v}" for k, v in {**SETS, "model.path": folder, "output.dir": out}.items()]
    assert cli.main(["quantize", "ojbkq", *sum((["--set", s] for s in sets), [])]) == 0
    return out


def test_api_on_a_folder_gives_the_cli_bytes(folder, cli_out, tmp_path):
    q = oq.quantize(folder, recipe="ojbkq", overrides=SETS, progress=False)
    out = q.save(str(tmp_path / "q"))                          # the recipe's format, as the CLI writes
    assert tensors_bytes(out) == tensors_bytes(cli_out) and tensors_bytes(out)
    for name in ("config.json", "ojbkq_config.yaml"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(cli_out, name)).read().replace(
            cli_out, out)


def test_api_on_a_model_in_memory_gives_the_cli_bytes_and_loads_back(folder, cli_out, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [open(CALIB_TXT, encoding="utf-8").read()]
    q = oq.quantize(model, tokenizer, recipe="ojbkq", overrides=SETS, calibration=texts, progress=False)
    assert q.model is model and q.report["layers"] and q.report["objective_sum"] > 0
    assert q.report["model"] == folder                       # named by the folder it came from
    out = q.save(str(tmp_path / "q"))                         # the recipe's format: compressed-tensors
    assert tensors_bytes(out) == tensors_bytes(cli_out)
    m = oq.load(out)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                   # scales stored in the checkpoint's dtype
        torch.testing.assert_close(m(ids).logits, q.model(ids).logits, rtol=0, atol=1e-3)
    with pytest.raises(InputError, match="exists and is not empty"):
        q.save(out)
    fake = q.save(str(tmp_path / "fake"), format="fake")
    with torch.no_grad():                   # the fake format stores the weights as they are
        assert torch.equal(oq.load(fake)(ids).logits, q.model(ids).logits)


def test_calibration_as_token_ids(folder):
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    q = oq.quantize(AutoModelForCausalLM.from_pretrained(folder), recipe="gptq", overrides=GPTQ_SETS,
                    calibration=ids.tolist(), progress=False)
    assert q.report["samples"] == 4 and q.report["seqlen"] == 32
    with pytest.raises(InputError, match="one length"):
        oq.quantize(AutoModelForCausalLM.from_pretrained(folder), recipe="gptq", overrides=GPTQ_SETS,
                    calibration=[[1, 2, 3], [1, 2]])
    with pytest.raises(InputError, match="needs a tokenizer"):
        oq.quantize(AutoModelForCausalLM.from_pretrained(folder), recipe="gptq", overrides=GPTQ_SETS)


def test_bad_input_is_refused_before_any_work(folder, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="did you mean 'quant.bits'"):
        oq.quantize(model, recipe="gptq", overrides={"quant.bitz": 3}, calibration=[[1] * 8])
    with pytest.raises(InputError, match="no recipe of that name"):
        oq.quantize(model, recipe="gtpq", calibration=[[1] * 8])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="not a model folder"):
        oq.load(str(tmp_path))


def test_the_readme_snippet_runs(tmp_path, monkeypatch):
    """The Python block under the README's "From Python" heading, run as written in a folder holding a
    tiny `./my-llama` and `calibration.txt`."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"## From Python.*?```python\n(.*?)```", text, re.S).group(1)
    assert "oq.quantize(" in block and "oq.load(" in block and ".save(" in block
    monkeypatch.chdir(tmp_path)
    save(tiny_llama(layers=1, hidden=64, intermediate=128), "my-llama")
    with open(CALIB_TXT, encoding="utf-8") as f, open("calibration.txt", "w", encoding="utf-8") as g:
        g.write(f.read() * 4)
    with open(EVAL_TXT, encoding="utf-8") as f, open("held_out.txt", "w", encoding="utf-8") as g:
        g.write(f.read() * 8)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert os.path.isfile(os.path.join("my-llama-ojbkq-3bit", "model.safetensors"))
    assert isinstance(scope["q"], oq.Quantized) and scope["q"].spec.quant.bits == 3
    ppl = scope["q"].report["perplexity"]["text"]                 # the CLI's key, scored in the same pass
    assert ppl["fp"] > 0 and ppl["quantized"] > 0 and ppl["windows"] >= 1


def test_the_api_checks_what_the_cli_checks_before_calibrating(folder, monkeypatch, caplog):
    """The default format (compressed-tensors) cannot store groups of 128 on the tiny model's 64-wide layers:
    `quantize` refuses before any calibration, as `ojbkq quantize` does; a `quant.skip` pattern that matches
    nothing is refused naming the nearest names; a passing run's report carries the CLI's `serving`."""
    from ojbkq_core import pipeline

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before the checks")
    monkeypatch.setattr(pipeline, "calibrate_model", no_calibration)
    sets = {k: v for k, v in GPTQ_SETS.items() if k != "quant.group_size"}
    with pytest.raises(InputError, match="not a multiple of quant.group_size=128"):
        oq.quantize(folder, recipe="gptq", overrides=sets, progress=False)
    with pytest.raises(InputError, match=r"quant.skip: 'mlp.dwn_proj' matches no module .*nearest: mlp.down_proj"):
        oq.quantize(folder, recipe="gptq", overrides={**GPTQ_SETS, "quant.skip": ["mlp.dwn_proj"]}, progress=False)
    with pytest.raises(InputError, match=r"'model.layers.0.mlp' matches only modules that hold layers"):
        oq.quantize(folder, recipe="gptq", overrides={**GPTQ_SETS, "quant.skip": ["model.layers.0.mlp"]},
                    progress=False)
    monkeypatch.undo()
    q = oq.quantize(folder, recipe="gptq", overrides={**GPTQ_SETS, "quant.skip": ["lm_head", "*.0.mlp.down_proj"]},
                    progress=False)
    assert q.report["serving"] == {"vllm": "0.32.0", "served": None, "reason": "not measured: 3-bit checkpoints"}
    assert "model.layers.0.mlp.down_proj" in q.report["skipped"]


def test_a_skip_pattern_that_matches_nothing_ends_the_cli_in_one_line(folder, tmp_path, capsys):
    sets = [f"{k}={v}" for k, v in {**GPTQ_SETS, "model.path": folder, "output.dir": str(tmp_path / "q")}.items()]
    rc = cli.main(["quantize", "gptq", *sum((["--set", s] for s in sets), []), "--set", "quant.skip=model.layer.*.o_proj"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "quant.skip: 'model.layer.*.o_proj' matches no module" in err[-1], err
    assert not (tmp_path / "q").exists()

"""Whole models from a config: every recipe on tiny Llama and GPT-2 models saved to disk, offline;
byte-identical checkpoints; reload; perplexity; the command line; encoder fidelity."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ojbkq_core import cli
from ojbkq_core.errors import InputError
from ojbkq_core.export import load_quantized
from ojbkq_core.model import find_adapter
from ojbkq_core.perplexity import perplexity, windows
from ojbkq_core.pipeline import CONFIG_FILE, REPORT_FILE, evaluate_dir, load_model, run
from ojbkq_core.recipes import builtin_paths
from ojbkq_core.spec import load_spec
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_bert, tiny_gpt2, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(builtin_paths())


def quantize_recipe(recipe, overrides):
    """`ojbkq quantize RECIPE --set ...` in process: the run report."""
    return run(load_spec(recipe, overrides))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": save(tiny_llama(), str(root / "llama")), "gpt2": save(tiny_gpt2(), str(root / "gpt2"))}


def _tiny(model_dir, out, *extra):
    return [f"model.path={model_dir}", "model.dtype=float32", f"calibration.path={CALIB_TXT}",
            "calibration.samples=4", "calibration.seqlen=32", "quant.group_size=32", f"output.dir={out}",
            "eval.perplexity=[]", "device=cpu", "output.format=gptq", *extra]


def _recipe(name):
    return name


def _small_decoder(name):
    """Recipe decoders at tiny sizes (same decoder, fewer candidates)."""
    return ["decoder.k=4"] if name == "ojbkq" else (["decoder.width=2"] if name == "regularized-beam" else [])


def test_the_five_recipes_are_there():
    assert set(RECIPES) >= {"gptq", "gptaq", "regularized-successive", "regularized-beam", "ojbkq"}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_recipe_end_to_end(folders, tmp_path, arch, recipe):
    out = str(tmp_path / "out")
    report = quantize_recipe(_recipe(recipe), _tiny(folders[arch], out, *_small_decoder(recipe)))
    assert report["output"] == out and report["adapter"] == arch
    model, info = load_quantized(out)
    names = find_adapter(model).layer_names()
    assert list(report["layers"]) == names
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in report["layers"].values())
    assert report["objective_sum"] > 0
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert sorted(info["packed"]) == sorted(names)
    saved = json.load(open(os.path.join(out, REPORT_FILE)))
    assert saved["objective_sum"] == report["objective_sum"] and saved["layers"].keys() == report["layers"].keys()
    assert "quant:" in open(os.path.join(out, CONFIG_FILE)).read()
    if recipe == "regularized-successive":
        alphas = [r["draws"]["alpha"] for r in report["layers"].values()]
        assert len(set(alphas)) == len(alphas) and all(0.4 <= a <= 0.8 for a in alphas)
    # the reloaded weights are the engine's (up to the fp16 scales of the format)
    orig, _ = load_model(folders[arch], "float32")
    from safetensors.torch import load_file
    saved_tensors = load_file(os.path.join(out, "model.safetensors"))
    g_idx_of = {n: saved_tensors[f"{n}.g_idx"] for n in names}
    changed = 0
    for n in names:
        W = find_adapter(model).weight(model.get_submodule(n)).detach()
        W0 = find_adapter(orig).weight(orig.get_submodule(n)).detach()
        changed += int(not torch.equal(W, W0))
        g_idx = g_idx_of[n].long()                             # a group: the columns of one g_idx value
        assert torch.equal(torch.bincount(g_idx), torch.full((W.shape[1] // 32,), 32))
        for row in W[:8]:
            for g in range(W.shape[1] // 32):
                assert len(torch.unique(row[g_idx == g])) <= 16
    assert changed == len(names)


def test_same_seed_gives_the_same_checkpoint_bytes(folders, tmp_path):
    def files(folder):
        return {f: open(os.path.join(folder, f), "rb").read() for f in ("model.safetensors", "config.json")}

    for recipe in ("ojbkq", "regularized-successive"):
        runs = []
        for i, seed in enumerate((3, 3, 4)):
            out = str(tmp_path / f"{recipe}-{i}")
            quantize_recipe(_recipe(recipe), _tiny(folders["llama"], out, *_small_decoder(recipe),
                                                        f"decoder.seed={seed}"))
            runs.append(files(out))
        assert runs[0] == runs[1], recipe
        assert runs[0]["model.safetensors"] != runs[2]["model.safetensors"], recipe


def test_offline_folder_reload_and_perplexity(folders, tmp_path):
    fake, gptq = str(tmp_path / "fake"), str(tmp_path / "gptq")
    ev = [f"eval.path={EVAL_TXT}", "eval.seqlen=64", "eval.samples=20"]
    r_fake = quantize_recipe(_recipe("gptaq"), _tiny(folders["gpt2"], fake, "output.format=fake", *ev))
    r_gptq = quantize_recipe(_recipe("gptaq"), _tiny(folders["gpt2"], gptq, *ev))
    p = r_fake["perplexity"]["text"]
    assert p["windows"] == 20 and p["seqlen"] == 64
    assert p["fp"] == r_gptq["perplexity"]["text"]["fp"] and p["quantized"] != p["fp"]
    assert p["quantized"] == r_gptq["perplexity"]["text"]["quantized"]      # same run, other format
    # dequantized checkpoint: the reloaded model is exactly the in-memory fake-quantized one
    assert evaluate_dir(fake, None, 64, path=EVAL_TXT, samples=20)["perplexity"] == p["quantized"]
    # packed checkpoint: equal up to the float16 scales of the format
    assert evaluate_dir(gptq, None, 64, path=EVAL_TXT, samples=20)["perplexity"] == pytest.approx(p["quantized"], rel=1e-3)


def test_perplexity_protocol():
    model = tiny_llama()
    torch.nn.init.zeros_(model.lm_head.weight)              # uniform next-token distribution over 256 bytes
    tokens = torch.randint(0, 256, (1000,))
    res = perplexity(model, tokens, seqlen=64)
    assert res["windows"] == 15 and res["tokens"] == 15 * 63
    assert res["perplexity"] == pytest.approx(256, rel=1e-5)   # float32 log-softmax
    assert windows(tokens, 64, samples=4).shape == (4, 64)
    with pytest.raises(InputError, match="fewer than seqlen=2000"):
        windows(tokens, 2000)


def test_command_line_quantize_and_eval(folders, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = sum((["--set", s] for s in _tiny(folders["llama"], out)), [])
    assert cli.main(["quantize", _recipe("gptq"), *args]) == 0
    assert cli.main(["eval", out, "--data-path", EVAL_TXT, "--seqlen", "64", "--samples", "5"]) == 0
    assert "text: perplexity" in capsys.readouterr().out
    # a second run into the same folder is refused unless overwrite
    assert cli.main(["quantize", _recipe("gptq"), *args]) == 2
    assert "output.overwrite" in capsys.readouterr().err
    assert cli.main(["quantize", _recipe("gptq"), *args, "--set", "model.path=./no-such-model",
                     "--set", f"output.dir={tmp_path / 'other'}"]) == 2
    assert "model.path='./no-such-model'" in capsys.readouterr().err


def test_hub_names_fail_clearly_offline(folders, tmp_path):
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        load_model("some-org/some-model")
    # a hub dataset with HF_HUB_OFFLINE=1: exit status 2 and a hint to use local files
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ojbkq_core.cli", "eval", folders["llama"], "--dataset", "wikitext2",
                           "--seqlen", "64"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "eval.dataset='wikitext2'" in last and "path" in last


def test_encoder_pipeline_and_fidelity(tmp_path):
    from ojbkq_core.fidelity import compare, encode
    folder = save(tiny_bert(), str(tmp_path / "bert"))
    out = str(tmp_path / "out")
    report = quantize_recipe(_recipe("gptq"), _tiny(folder, out, "quant.bits=3", f"eval.path={EVAL_TXT}"))
    assert report["adapter"] == "bert" and "perplexity" not in report and len(report["layers"]) == 12
    fp, _ = load_model(folder, "float32")
    q, _ = load_quantized(out)
    ids = torch.randint(0, 256, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    inputs = [{"input_ids": ids, "attention_mask": mask}]
    ref = encode(fp, inputs)
    same = compare(ref, encode(fp, inputs))
    assert same["cosine"] == pytest.approx(1.0) and same["rel_err"] == 0.0
    got = compare(ref, encode(q, inputs))
    assert 0.9 < got["cosine"] < 1.0 and 0.0 < got["rel_err"] < 0.5


def test_a_layer_the_format_cannot_store_is_refused_before_calibration(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ojbkq_core import pipeline
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=40, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    folder = save(LlamaForCausalLM(cfg).eval(), str(tmp_path / "m"))
    monkeypatch.setattr(pipeline, "calibrate_model", lambda *a, **k: pytest.fail("calibration started"))
    with pytest.raises(InputError, match=r"model.layers.0.self_attn.q_proj': 40 inputs × 3 bits"):
        quantize_recipe(_recipe("gptq"), _tiny(folder, str(tmp_path / "out"), "quant.bits=3"))
    assert not os.path.exists(tmp_path / "out")


def test_the_output_folder_is_checked_and_its_parents_made_before_the_model_loads(folders, tmp_path, monkeypatch):
    from ojbkq_core import pipeline
    out = tmp_path / "new" / "deeper" / "out"                          # parents that do not exist yet
    loaded = []
    real = pipeline.load_config                                       # both the whole and the streamed load
    monkeypatch.setattr(pipeline, "load_config", lambda *a, **k: loaded.append(out.parent.is_dir()) or real(*a, **k))
    quantize_recipe("gptq", _tiny(folders["llama"], str(out)))
    assert loaded == [True] and (out / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(pipeline, "load_config", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(InputError, match="is not a folder"):
        quantize_recipe("gptq", _tiny(folders["llama"], str(tmp_path / "file" / "out")))
    with pytest.raises(InputError, match="exists and is not empty"):
        quantize_recipe("gptq", _tiny(folders["llama"], str(out)))


def test_a_checkpoint_vllm_refuses_is_named_in_one_warning_before_calibration(folders, tmp_path, caplog):
    from ojbkq_core import pipeline
    from ojbkq_core.serving import vllm_refusal
    seen = []
    real = pipeline.calibrate_model

    def calibrating(*a, **k):
        seen.append([r.getMessage() for r in caplog.records if "will not serve" in r.getMessage()])
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level("WARNING", logger="ojbkq"):
        mp.setattr(pipeline, "calibrate_model", calibrating)
        report = quantize_recipe("gptq", _tiny(folders["llama"], str(tmp_path / "a"), "quant.sym=false",
                                               "quant.act_order=false"))
        assert len(seen[0]) == 1 and "\n" not in seen[0][0]                 # warned once, before calibrating
        assert "Unsupported quantization config: bits=4, sym=False" in seen[0][0] and "quant.sym=true" in seen[0][0]
        assert report["serving"] == {"vllm": "0.32.0", "served": False,
                                     "reason": "Unsupported quantization config: bits=4, sym=False"}
        caplog.clear()
        report = quantize_recipe("gptq", _tiny(folders["llama"], str(tmp_path / "b"), "quant.sym=true",
                                               "quant.act_order=true", "quant.static_groups=true"))
        assert not [r for r in caplog.records if "will not serve" in r.getMessage()]
        assert report["serving"]["served"] is True and report["serving"]["reason"] is None
    from ojbkq_core.grid import QuantSpec
    assert vllm_refusal("fake", QuantSpec(bits=3)) is None
    assert "desc_act=True" in vllm_refusal("gptq", QuantSpec(sym=True, act_order=True))


@pytest.mark.parametrize("bits", [2, 3])
def test_a_bit_width_the_serving_tests_never_measured_is_said_so(folders, tmp_path, caplog, bits):
    """2 and 3 bits: no serving test saw vLLM serve or refuse them, so the report says `served: None` (not
    measured) and one warning line says so, instead of promising that vLLM serves them."""
    with caplog.at_level("WARNING", logger="ojbkq"):
        report = quantize_recipe("gptq", _tiny(folders["llama"], str(tmp_path / "a"), "quant.sym=true",
                                               f"quant.bits={bits}"))
    lines = [r.getMessage() for r in caplog.records if "never measured" in r.getMessage()]
    assert len(lines) == 1 and f"{bits}-bit gptq checkpoint" in lines[0], lines
    assert report["serving"] == {"vllm": "0.32.0", "served": None, "reason": f"not measured: {bits}-bit checkpoints"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_writes_a_checkpoint_vllm_serves_by_default(folders, tmp_path, recipe):
    """The recipes as they ship (their format and order): compressed-tensors, asymmetric, act-order with
    static groups — the combination vLLM serves (tests/test_serving.py) — and it reads back."""
    out = str(tmp_path / "out")
    sets = [s for s in _tiny(folders["llama"], out, *_small_decoder(recipe)) if s != "output.format=gptq"]
    report = quantize_recipe(_recipe(recipe), sets)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"], weights["actorder"]) == (4, False, 32, "static")
    assert report["serving"] == {"vllm": "0.32.0", "served": True, "reason": None}
    model, info = load_quantized(out)
    assert sorted(info["packed"]) == sorted(find_adapter(model).layer_names())

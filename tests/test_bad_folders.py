"""Broken model folders: `ojbkq quantize` (model.path) and `ojbkq eval` (MODEL_DIR, plain or quantized)
exit with status 2 and one line naming the file and what is wrong, never a traceback."""
import json
import os
import shutil

import pytest

from ojbkq_core import cli
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPTQ = "gptq"


def _tiny(model_dir, out):
    return [f"model.path={model_dir}", "model.dtype=float32", f"calibration.path={CALIB_TXT}",
            "calibration.samples=2", "calibration.seqlen=16", "quant.group_size=32", f"output.dir={out}",
            "eval.perplexity=[]", "device=cpu", "output.format=gptq"]


def _sets(pairs):
    return sum((["--set", s] for s in pairs), [])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A plain tiny Llama folder and its quantized checkpoint."""
    root = tmp_path_factory.mktemp("good")
    plain = save(tiny_llama(layers=1), str(root / "plain"))
    quantized = str(root / "quantized")
    assert cli.main(["quantize", GPTQ, *_sets(_tiny(plain, quantized))]) == 0
    return {"plain": plain, "quantized": quantized}


def _cut_in_half(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def _truncate(folder):
    return _cut_in_half(os.path.join(folder, "model.safetensors")), "truncated"


def _not_safetensors(folder):
    p = os.path.join(folder, "model.safetensors")
    open(p, "w").write("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    return p, "safetensors"


def _corrupt_header(folder):
    p = os.path.join(folder, "model.safetensors")
    data = bytearray(open(p, "rb").read())
    data[8:40] = b"\x00\xff" * 16
    open(p, "wb").write(bytes(data))
    return p, "safetensors"


def _bad_config(folder):
    return _cut_in_half(os.path.join(folder, "config.json")), "not valid JSON"


def _no_model_type(folder):
    p = os.path.join(folder, "config.json")
    cfg = json.load(open(p))
    del cfg["model_type"], cfg["architectures"]
    json.dump(cfg, open(p, "w"))
    return p if "quantized" in folder else folder, "config"


def _no_weights(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    return folder, "no weights"


def _missing_shard(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    json.dump({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    return os.path.join(folder, "model.safetensors.index.json"), "model-00001-of-00002.safetensors"


def _bin_not_an_archive(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    p = os.path.join(folder, "pytorch_model.bin")
    open(p, "wb").write(b"\x80\x04 not a torch archive")
    return p, "not a torch checkpoint archive"


def _bad_tokenizer_json(folder):
    p = os.path.join(folder, "tokenizer.json")
    open(p, "w").write("{ not json")
    return p, "not valid JSON"


def _bad_tokenizer_model(folder):
    p = os.path.join(folder, "tokenizer.json")
    json.dump({"version": "1.0", "model": {"type": "NoSuchModel"}}, open(p, "w"))
    return folder, "tokenizer (tokenizer_config.json, tokenizer.json"


BREAKS = [_truncate, _not_safetensors, _corrupt_header, _bad_config, _no_model_type, _no_weights, _missing_shard,
          _bin_not_an_archive, _bad_tokenizer_json, _bad_tokenizer_model]


def _one_line_naming(capsys, rc, name, what):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert "Traceback" not in err and len(lines) >= 1
    last = lines[-1]
    assert name in last and what in last, last


@pytest.mark.parametrize("breaking", BREAKS, ids=lambda f: f.__name__.strip("_"))
def test_quantize_refuses_a_broken_model_folder(good, tmp_path, capsys, breaking):
    folder = shutil.copytree(good["plain"], tmp_path / "model")
    name, what = breaking(str(folder))
    rc = cli.main(["quantize", GPTQ, *_sets(_tiny(str(folder), str(tmp_path / "out")))])
    _one_line_naming(capsys, rc, name, what)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind", ["plain", "quantized"])
@pytest.mark.parametrize("breaking", BREAKS, ids=lambda f: f.__name__.strip("_"))
def test_eval_refuses_a_broken_model_folder(good, tmp_path, capsys, breaking, kind):
    folder = shutil.copytree(good[kind], tmp_path / kind)
    name, what = breaking(str(folder))
    rc = cli.main(["eval", str(folder), "--data-path", EVAL_TXT, "--seqlen", "16", "--samples", "1"])
    _one_line_naming(capsys, rc, name, what)


def test_the_unbroken_folders_evaluate(good, capsys):
    for kind in ("plain", "quantized"):
        assert cli.main(["eval", good[kind], "--data-path", EVAL_TXT, "--seqlen", "16", "--samples", "1"]) == 0
    assert capsys.readouterr().out.count("text: perplexity") == 2

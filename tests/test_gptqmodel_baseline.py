"""bench/gptqmodel_baseline.py: GPTQModel's GPTQ on `ojbkq compare`'s calibration windows, scored by its
perplexity, as records that `ojbkq compare --baseline` (or `--merge`) joins with the comparison's own.

The end-to-end test runs on a tiny Llama of one block with the byte-level tokenizer and needs GPTQModel:
it is marked `interop` and runs in the interop environment."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from ojbkq_core.errors import InputError
from ojbkq_core import compare, results
from tiny_models import offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-3          # float16 scales: a relative rounding of 4.9e-4 per operation


@pytest.fixture(scope="module")
def baseline():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location("gptqmodel_baseline",
                                                      os.path.join(ROOT, "bench", "gptqmodel_baseline.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def test_refuses_one_cpu_worker_and_a_missing_gptqmodel(baseline, monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "1")
    with pytest.raises(InputError, match="GPTQMODEL_CPU_WORKERS=1: .*set GPTQMODEL_CPU_WORKERS=2"):
        baseline.cpu_workers()
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "two")
    with pytest.raises(InputError, match="GPTQMODEL_CPU_WORKERS='two'"):
        baseline.cpu_workers()
    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS")
    monkeypatch.setattr(baseline.os, "cpu_count", lambda: 4)
    assert baseline.cpu_workers() == 4 and os.environ["GPTQMODEL_CPU_WORKERS"] == "4"
    monkeypatch.setattr(baseline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="gptqmodel is not installed.*make setup-interop"):
        baseline.import_gptqmodel()


@pytest.mark.interop
def test_gptqmodel_row_is_scored_like_the_comparison_and_merges(baseline, tmp_path, monkeypatch):
    if not os.environ.get("OJBKQ_INTEROP"):
        pytest.importorskip("gptqmodel")
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    folder = save(tiny_llama(layers=1), str(tmp_path / "llama"))
    sizes = ["--samples", "4", "--seqlen", "64", "--eval-windows", "2", "--device", "cpu", "--dtype", "float32"]
    mj, gm = str(tmp_path / "compare.json"), str(tmp_path / "gptqmodel.json")
    assert compare.main(["--model", folder, "--recipes", "rtn", "--bits", "3", "--domains", "shakespeare",
                         *sizes, "--out", mj]) == 0
    ours = json.load(open(mj))
    assert baseline.main(["--model-dir", folder, "--label", ours["model"], "--domains", "shakespeare",
                          "--bits", "4", "3", *sizes, "--run-dir", str(tmp_path / "run"), "--out", gm]) == 0
    theirs = json.load(open(gm))
    assert theirs["complete"] and [(r["recipe"], r["bits"]) for r in theirs["rows"]] == \
        [("fp", 32), ("gptqmodel-gptq", 4), ("gptqmodel-gptq", 3)]
    fp = theirs["rows"][0]["perplexity"]["shakespeare"]
    assert fp == pytest.approx(ours["rows"][0]["perplexity"]["shakespeare"], rel=1e-6)
    for row in theirs["rows"][1:]:
        ppl = row["perplexity"]["shakespeare"]
        assert math.isfinite(ppl) and ppl != fp
        assert row["gptqmodel"]["desc_act"] and row["group_size"] == 64 and row["seconds"] > 0
    # the same setup as the comparison's run, so its merge takes the row
    for k in ("model", "device", "dtype", "group_size", "calibration", "evaluation", "overrides"):
        assert theirs[k] == ours[k], k
    merged = results.merge([mj, gm])
    assert [(r["recipe"], r["bits"]) for r in merged["rows"]] == \
        [("fp", 32), ("gptqmodel-gptq", 4), ("rtn", 3), ("gptqmodel-gptq", 3)]     # by bit width
    assert "gptqmodel-gptq" in results.table(merged["rows"], ["shakespeare"])
    # the project's reader of GPTQModel's checkpoint computes what GPTQModel's own float32 kernel computes
    from transformers import AutoModelForCausalLM, GPTQConfig
    from ojbkq_core.export import load_quantized
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for row in theirs["rows"][1:]:
        out = row["gptqmodel"]["checkpoint"]
        with torch.no_grad():
            ref = load_quantized(out)[0](ids).logits.float()
            got = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", quantization_config=GPTQConfig(
                bits=row["bits"], backend="torch"))(ids).logits.float()
        assert float((got - ref).abs().max()) <= TOL * float(ref.abs().max())
    with pytest.raises(InputError, match="differs"):       # another setup is refused
        theirs["calibration"]["samples"] = 8
        json.dump(theirs, open(gm, "w"))
        results.merge([mj, gm])

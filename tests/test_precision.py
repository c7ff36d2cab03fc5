"""The dtype rule (`model.dtype: device`, `ojbkq compare --dtype device`) with the CPU probes replaced, and
the records that name the dtype and the CPU's capability."""
import json
import logging

import pytest
import torch

from ojbkq_core import cli, precision
from ojbkq_core.spec import load_spec, recipes
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)


def fake_cpu(monkeypatch, capability: str, bf16: bool, amx: bool = False) -> None:
    """Make torch report a CPU with `capability` kernels, and AVX512_BF16 / AMX as given."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(precision, "cuda_bf16", lambda device: True)      # an Ampere-or-later GPU
    precision.cpu_capability.cache_clear()
    monkeypatch.setattr(precision, "_warned", [])


@pytest.fixture(autouse=True)
def fresh_probe():
    precision.cpu_capability.cache_clear()
    yield
    precision.cpu_capability.cache_clear()


@pytest.mark.parametrize("capability,bf16,amx,cpu_dtype", [
    ("AVX2", False, False, "float32"),          # AVX2 only
    ("AVX2", True, False, "float32"),           # an AVX-512 host run at AVX2 (ATEN_CPU_CAPABILITY=avx2)
    ("AVX512", False, False, "float32"),        # AVX-512 without bfloat16 instructions
    ("AVX512", True, False, "bfloat16"),        # AVX512_BF16
    ("AVX512", False, True, "bfloat16"),        # AMX
])
def test_device_resolves_by_the_cpus_capability(monkeypatch, capability, bf16, amx, cpu_dtype):
    fake_cpu(monkeypatch, capability, bf16, amx)
    assert precision.resolve_dtype("device", "cpu") == cpu_dtype
    assert precision.resolve_dtype("device", "cuda") == precision.resolve_dtype("device", "cuda:1") == "bfloat16"
    for explicit in ("bfloat16", "float16", "float32", "auto"):     # other spellings are kept as written
        assert precision.resolve_dtype(explicit, "cpu") == explicit
    assert precision.cpu_capability() == {"capability": capability, "avx512_bf16": bf16, "amx": amx,
                                          "bf16_native": cpu_dtype == "bfloat16"}


def test_a_gpu_without_bfloat16_runs_float32(monkeypatch):
    fake_cpu(monkeypatch, "AVX512", True)
    monkeypatch.setattr(precision, "cuda_bf16", lambda device: device == "cuda:1")   # cuda:0 older than Ampere
    assert precision.resolve_dtype("device", "cuda") == "float32"
    assert precision.resolve_dtype("device", "cuda:1") == "bfloat16"


def test_every_builtin_recipe_and_the_defaults_choose_by_device(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", False)
    for name in [*recipes(), None]:
        spec = load_spec(name or {"model": {"path": "-"}}, {"model.path": "-", "device": "cpu"})
        assert spec.model.dtype == "device" and spec.dtype == "float32", name
    fake_cpu(monkeypatch, "AVX512", True)
    assert load_spec("gptq", {"model.path": "-", "device": "cpu"}).dtype == "bfloat16"
    assert load_spec("gptq", {"model.path": "-", "device": "cpu", "model.dtype": "float32"}).dtype == "float32"
    assert "dtype: device" in load_spec("gptq", {"model.path": "-"}).to_yaml()     # the config keeps the rule


def test_an_explicit_bfloat16_on_a_cpu_without_it_warns_once_with_the_measured_cost(monkeypatch, caplog):
    fake_cpu(monkeypatch, "AVX2", False)
    monkeypatch.setattr(precision, "emulated_slowdown", lambda size=256: 41.7)
    with caplog.at_level(logging.WARNING, logger="ojbkq"):
        precision.warn_if_emulated("bfloat16", "cpu")
        precision.warn_if_emulated("bfloat16", "cpu")
        precision.warn_if_emulated("float32", "cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "measured 42x slower than float32 here" in lines[0] and "AVX2" in lines[0], lines
    fake_cpu(monkeypatch, "AVX512", True)
    caplog.clear()
    precision.warn_if_emulated("bfloat16", "cpu")
    precision.warn_if_emulated("bfloat16", "cuda")
    assert not caplog.records


def test_the_slowdown_is_measured_not_assumed(monkeypatch):
    """The warning's figure is the best of three bfloat16 products over the best of three float32 ones, as
    timed (a clock that gives float32 products 1-3 s and bfloat16 ones 40-42 s gives 40), once per process."""
    ticks = iter([0, 2, 2, 3, 3, 6,  10, 52, 52, 92, 92, 133])   # float32: 2, 1, 3 s; bfloat16: 42, 40, 41 s
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(ticks))
    precision.emulated_slowdown.cache_clear()
    try:
        assert precision.emulated_slowdown(8) == 40.0
        assert precision.emulated_slowdown(8) == 40.0                 # cached: the clock is not read again
    finally:
        precision.emulated_slowdown.cache_clear()


def test_the_run_report_names_dtype_and_cpu(monkeypatch, tmp_path):
    """`quantize` on a CPU without native bfloat16: the model runs in float32 and the report says why."""
    import ojbkq_core as oq
    fake_cpu(monkeypatch, "AVX2", False)
    folder = save(tiny_llama(layers=1, hidden=64, intermediate=128), str(tmp_path / "m"))
    q = oq.quantize(folder, recipe="gptq", progress=False, overrides={
        "calibration.dataset": "text", "calibration.path": CALIB_TXT, "calibration.samples": 2,
        "calibration.seqlen": 32, "quant.group_size": 32, "device": "cpu", "eval.perplexity": []})
    assert next(q.model.parameters()).dtype == torch.float32
    assert q.report["dtype"] == "float32"
    assert q.report["cpu"] == {"capability": "AVX2", "avx512_bf16": False, "amx": False, "bf16_native": False}


def test_compare_records_name_the_resolved_dtype_and_the_cpu(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, "AVX2", False)
    folder = save(tiny_llama(layers=1, hidden=64, intermediate=128), str(tmp_path / "m"))
    out = str(tmp_path / "r.json")
    assert cli.main(["compare", "--model", folder, "--recipes", "rtn", "--bits", "4", "--samples", "2",
                     "--seqlen", "32", "--eval-windows", "1", "--device", "cpu", "--calibration", CALIB_TXT,
                     "--domains", EVAL_TXT, "--out", out]) == 0
    res = json.load(open(out))
    cpu = {"capability": "AVX2", "avx512_bf16": False, "amx": False, "bf16_native": False}
    assert res["dtype"] == "float32" and res["cpu"] == cpu
    assert all(r["dtype"] == "float32" and r["cpu"] == cpu for r in res["rows"])
    assert "Device cpu (torch AVX2, bfloat16 not native), float32," in open(out[:-5] + ".md").read()


def test_the_table_shows_each_rows_progress_and_time_left(monkeypatch):
    """The meter outside a terminal: a line when a phase ends (or `every` seconds in), naming the row of
    how many, the phase's step of how many and the time left, in the row and, once a row is done, the table."""
    import io
    from ojbkq_core import meter as m
    clock = iter([0.0, 0.0, 10.0, 40.0, 50.0, 60.0, 60.0, 60.0, 70.0, 100.0])
    monkeypatch.setattr(m.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    meter = m.Meter(rows=3, eval_seconds=20.0, every=30.0, stream=out)
    meter.start_row(1, "gptq 3 bits")                   # t=0
    meter.step("calibrating block", 1, 4)               # t=10: within `every`, no line
    meter.step("calibrating block", 3, 4)               # t=40: 40 s for 3 blocks → 13 s left, + 20 s evaluation
    meter.step("evaluating window", 8, 8)               # t=50: the phase's last step
    assert meter.end_row() == 60.0                      # t=60
    meter.start_row(2, "ojbkq 3 bits")                  # t=60
    meter.step("calibrating block", 2, 4)               # t=70: within `every`
    meter.step("calibrating block", 4, 4)               # t=100: 0 s left in calibration + 20 s evaluation (row 1's)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  row 1/3 gptq 3 bits: calibrating block 3/4, 40s in the row, ~33s left in it"
    assert lines[1].startswith("  row 1/3 gptq 3 bits: evaluating window 8/8, 50s in the row, ~0s left")
    assert lines[2] == ("  row 2/3 ojbkq 3 bits: calibrating block 4/4, 40s in the row, ~20s left in it; "
                        "table ~1m20s left")
    assert len(lines) == 3

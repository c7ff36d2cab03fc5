"""A quantize run stopped at any moment — SIGINT or SIGKILL after calibration, in the middle of writing
a shard, just before the folder is published, between swapping it in and removing the old one, just
after — leaves the complete previous output or none (or the complete new one once published), never a
partial folder; the next run removes what a killed run left beside the output."""
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from ojbkq_core import cli, pipeline
from ojbkq_core.export import base
from tiny_models import CALIB_TXT, offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
GPTQ = "gptq"
POINTS = ["calibrated", "shard", "publish", "swapped", "published"]
PUBLISHED = {"swapped", "published"}          # the new folder is in place when the signal comes


def arm(point: str, sig: int, patch=setattr) -> None:
    """Make this process send itself `sig` at `point` of `ojbkq quantize` (SIGKILL ends it there;
    SIGINT raises KeyboardInterrupt at the next Python instruction)."""
    import safetensors.torch

    import ojbkq_core.export as export

    def die():
        os.kill(os.getpid(), sig)

    if point == "calibrated":
        calibrate_model = pipeline.calibrate_model

        def calibrated(*a, **k):
            out = calibrate_model(*a, **k)
            die()
            return out
        patch(pipeline, "calibrate_model", calibrated)
    elif point == "shard":                    # several shards; the second is cut in half, then the signal
        write, save_file, calls = base.write_safetensors, safetensors.torch.save_file, []
        patch(base, "write_safetensors", lambda t, folder, size: write(t, folder, 40_000))

        def half_written(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            calls.append(filename)
            if len(calls) == 2:
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
                die()
        patch(safetensors.torch, "save_file", half_written)
    elif point in ("publish", "published"):
        publish = export.publish

        def publishing(tmp, out_dir):
            if point == "publish":
                die()
            publish(tmp, out_dir)
            if point == "published":
                die()
        patch(export, "publish", publishing)
    elif point == "swapped":
        exchange = base.exchange

        def swapped(a, b):
            done = exchange(a, b)
            die()
            return done
        patch(base, "exchange", swapped)
    else:
        raise ValueError(point)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(tiny_llama(layers=1), str(tmp_path_factory.mktemp("m") / "llama"))


def _args(model_dir, out, bits=4):
    sets = [f"model.path={model_dir}", "model.dtype=float32", f"calibration.path={CALIB_TXT}",
            "calibration.samples=2", "calibration.seqlen=16", "quant.group_size=32", f"quant.bits={bits}",
            f"output.dir={out}", "eval.perplexity=[]", "device=cpu", "output.format=gptq",
            "model.stream=false"]          # the whole-model path (a streamed run's kills: test_streaming.py)
    return ["quantize", GPTQ, *sum((["--set", s] for s in sets), [])]


def _digest(folder) -> dict:
    """File name → sha256 of every file (the report, which holds timings, only has to parse; the
    config is compared without its output section)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            rel = os.path.relpath(path, folder)
            data = open(path, "rb").read()
            if rel == pipeline.REPORT_FILE:
                json.loads(data)
                data = b""
            elif rel == pipeline.CONFIG_FILE:               # names the output folder
                cfg = yaml.safe_load(data)
                del cfg["output"]
                data = json.dumps(cfg, sort_keys=True).encode()
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def outputs(model_dir, tmp_path_factory):
    """The complete folders of an earlier run (3 bits) and of the run that gets killed (4 bits)."""
    root = tmp_path_factory.mktemp("ref")
    assert cli.main(_args(model_dir, root / "old", bits=3)) == 0
    assert cli.main(_args(model_dir, root / "new", bits=4)) == 0
    old, new = _digest(root / "old"), _digest(root / "new")
    assert old != new and len(new) > 3
    return {"old_dir": root / "old", "old": old, "new": new}


def _prepare(outputs, tmp_path, previous: bool):
    import shutil
    out = tmp_path / "out"
    if previous:
        shutil.copytree(outputs["old_dir"], out)
    return out


def _check_after_kill(outputs, out, previous: bool, point: str):
    if point in PUBLISHED:
        assert _digest(out) == outputs["new"]
    elif previous:
        assert _digest(out) == outputs["old"]
    else:
        assert not os.path.exists(out)


def _check_next_run(model_dir, outputs, out, capsys):
    rc = cli.main(_args(model_dir, out) + (["--overwrite"] if os.path.exists(out) else []))
    assert rc == 0, capsys.readouterr().err
    assert _digest(out) == outputs["new"]
    assert os.listdir(out.parent) == ["out"]             # nothing left beside it


SIGINT_CASES = [(p, o) for p in POINTS for o in (False, True) if o or p != "swapped"]   # a swap needs an old folder


def _ids(cases):
    return [f"{p}-{'overwrite' if o else 'fresh'}" for p, o in cases]


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt here even where this process inherited it ignored (a job started
    in the background by a non-interactive shell)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("point,previous", SIGINT_CASES, ids=_ids(SIGINT_CASES))
def test_sigint(model_dir, outputs, tmp_path, monkeypatch, capsys, point, previous, sigint_raises):
    out = _prepare(outputs, tmp_path, previous)
    arm(point, signal.SIGINT, monkeypatch.setattr)
    rc = cli.main(_args(model_dir, out) + (["--overwrite"] if previous else []))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1 and "interrupted" in err.splitlines()[-1], err
    _check_after_kill(outputs, out, previous, point)
    assert os.listdir(tmp_path) == (["out"] if os.path.exists(out) else [])   # an interrupt cleans up itself
    _check_next_run(model_dir, outputs, out, capsys)


FAST = {("shard", True), ("swapped", True), ("publish", False)}       # each case starts a Python (~10 s)
SIGKILL_CASES = [pytest.param(p, o, marks=() if (p, o) in FAST else pytest.mark.slow, id=_ids([(p, o)])[0])
                 for p, o in [(p, True) for p in POINTS] + [("shard", False), ("publish", False)]]


@pytest.mark.parametrize("point,previous", SIGKILL_CASES)
def test_sigkill(model_dir, outputs, tmp_path, capsys, point, previous):
    out = _prepare(outputs, tmp_path, previous)
    args = _args(model_dir, out) + (["--overwrite"] if previous else [])
    code = (f"import sys, signal; sys.path.insert(0, {TESTS!r}); from test_interrupted_runs import arm; "
            f"arm({point!r}, signal.SIGKILL); from ojbkq_core import cli; sys.exit(cli.main({args!r}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _check_after_kill(outputs, out, previous, point)
    if point in ("shard", "swapped"):                    # a killed writer leaves its temporary sibling
        assert any(n.startswith(".out.tmp-") for n in os.listdir(tmp_path))
    _check_next_run(model_dir, outputs, out, capsys)

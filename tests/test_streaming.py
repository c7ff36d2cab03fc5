"""Streamed runs (ojbkq_core/streaming.py): one block in memory at a time, the checkpoint written as
blocks finish, the same bytes as a run that loads the model whole, and `--resume` after a kill."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ojbkq_core import cli
from ojbkq_core.errors import InputError
from ojbkq_core.export import base
from ojbkq_core.pipeline import REPORT_FILE, run
from ojbkq_core.spec import load_spec
from ojbkq_core.streaming import ShardWriter, checkpoint_policy
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_gpt2, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = 6
WEIGHTS = ("model.safetensors", "config.json")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save(tiny_llama(layers=BLOCKS), str(tmp_path_factory.mktemp("models") / "llama"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save(tiny_gpt2(layers=BLOCKS), str(tmp_path_factory.mktemp("models") / "gpt2"))


def _sets(model_dir, out, *extra):
    return [f"model.path={model_dir}", "model.dtype=float32", "calibration.dataset=text",
            f"calibration.path={CALIB_TXT}", "calibration.samples=4", "calibration.seqlen=32",
            "quant.group_size=32", f"output.dir={out}", "eval.perplexity=[]", "device=cpu", *extra]


def _run(recipe, model_dir, out, *extra, resume=False):
    return run(load_spec(recipe, _sets(model_dir, out, *extra)), resume=resume)


def digests(folder) -> dict:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if f.endswith((".safetensors", ".json")) and f != REPORT_FILE}


CASES = {
    "gptq-compressed": ("llama", "gptq", []),
    "ojbkq-fake": ("llama", "ojbkq", ["decoder.k=4", "output.format=fake"]),
    "gptaq-gptq-skip": ("llama", "gptaq", ["output.format=gptq", "quant.skip=*.o_proj"]),
    "gpt2-beam-gptq": ("gpt2", "regularized-beam", ["decoder.width=2", "output.format=gptq"]),
    "mxfp4-compressed": ("llama", "gptq", ["quant.grid=mxfp4"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_streamed_run_writes_the_bytes_of_a_whole_model_run(case, llama, gpt2, tmp_path):
    arch, recipe, extra = CASES[case]
    model_dir = {"llama": llama, "gpt2": gpt2}[arch]
    whole = _run(recipe, model_dir, tmp_path / "whole", "model.stream=false", *extra)
    streamed = _run(recipe, model_dir, tmp_path / "streamed", "model.stream=true", *extra)
    assert "streaming" not in whole and streamed["streaming"]["model_parameters"] > 0
    assert digests(tmp_path / "whole") == digests(tmp_path / "streamed")
    assert streamed["layers"].keys() == whole["layers"].keys()
    assert streamed["objective_sum"] == whole["objective_sum"]
    assert sorted(os.listdir(tmp_path)) == ["streamed", "whole"]          # no partial folder left


def test_at_most_one_block_and_the_front_are_ever_materialised(llama, tmp_path):
    """Counted on the model's parameters (not RSS) at every block read and every block done."""
    rep = _run("ojbkq", llama, tmp_path / "q", "decoder.k=4")
    model = tiny_llama(layers=BLOCKS)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    front = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.layers.", "lm_head.")))
    head = model.lm_head.weight.numel()
    s = rep["streaming"]
    assert s["model_parameters"] == sum(p.numel() for p in model.parameters())
    assert block <= s["peak_parameters"] <= block + front + head
    assert s["peak_parameters"] < s["model_parameters"] / 3


def test_shards_are_written_as_blocks_finish(llama, tmp_path, monkeypatch):
    """With small shards the streamed checkpoint has several files and an index; its tensors are the
    whole-model run's (the assignment of names to files follows the block order)."""
    monkeypatch.setattr(base, "MAX_SHARD_BYTES", 60_000)
    _run("gptq", llama, tmp_path / "whole", "model.stream=false")
    rep = _run("gptq", llama, tmp_path / "streamed")
    files = sorted(f for f in os.listdir(tmp_path / "streamed") if f.endswith(".safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.load(open(tmp_path / "streamed" / base.INDEX_NAME))
    a, b = base.read_tensors(str(tmp_path / "whole")), base.read_tensors(str(tmp_path / "streamed"))
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rep["streaming"]["seconds"]["write"] > 0


KILL_AFTER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from ojbkq_core import cli, streaming
from ojbkq_core.export import base
base.MAX_SHARD_BYTES = {shard}
save = streaming.Saved.save
def save_then_die(self, progress, writer, world=None):
    save(self, progress, writer, world)
    if progress.block == {block}:
        os.kill(os.getpid(), signal.SIGKILL)
streaming.Saved.save = save_then_die
sys.exit(cli.main({argv!r}))
"""


@pytest.mark.parametrize("recipe,extra", [("gptq", []), ("ojbkq", ["decoder.k=4"]),
                                          ("gptq", [f"eval.path={EVAL_TXT}", "eval.seqlen=64", "eval.samples=3"]),
                                          ("gptq", ["rotation.residual=hadamard", "rotation.heads=hadamard"]),
                                          ("ojbkq", ["decoder.k=4", "quant.grid=nvfp4", "quant.group_size=16"])])
def test_a_killed_run_resumed_writes_the_uninterrupted_bytes(llama, tmp_path, monkeypatch, recipe, extra):
    """SIGKILL right after the state of block 3 is saved (several shards written, one being filled),
    then the same command with --resume: the files of a run that was never stopped (and, with evaluation,
    its perplexities: the evaluation streams are part of the saved state)."""
    monkeypatch.setattr(base, "MAX_SHARD_BYTES", 60_000)
    sets = _sets(llama, tmp_path / "out", "output.checkpoint_every=1", *extra)
    argv = ["quantize", recipe, *(f"--set={s}" for s in sets)]
    ref = _run(recipe, llama, tmp_path / "ref", "output.checkpoint_every=1", *extra)
    child = KILL_AFTER.format(tests=os.path.dirname(__file__), shard=60_000, block=3, argv=argv)
    # the killed run with the threads of this process (the reference's and the resumed run's): a product's
    # rounding, and so a near tie between two candidates, may depend on the thread count
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    partial = tmp_path / ".out.partial"
    assert not (tmp_path / "out").exists() and not (partial / "config.json").exists()
    state = json.load(open(partial / "resume" / "state.json"))
    assert state["progress"]["block"] == 3 and state["writer"]["written"]
    assert cli.main(argv) == 2                              # without --resume: refused, state kept
    assert (partial / "resume" / "state.json").exists()
    assert cli.main([*argv, "--resume"]) == 0
    rep = json.load(open(tmp_path / "out" / REPORT_FILE))
    assert rep["resumed_at_block"] == 3 and ref["resumed_at_block"] is None
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")
    assert rep["layers"].keys() == ref["layers"].keys()
    assert rep.get("perplexity") == ref.get("perplexity")
    assert ("perplexity" in rep) == any(e.startswith("eval.path") for e in extra)
    assert sorted(os.listdir(tmp_path)) == ["out", "ref"]


def test_resume_with_another_config_refuses_in_one_line(llama, tmp_path, capsys):
    from ojbkq_core import streaming
    save = streaming.Saved.save

    def save_then_stop(self, progress, writer, world=None):
        save(self, progress, writer, world)
        if progress.block == 2:
            raise KeyboardInterrupt
    streaming.Saved.save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            _run("gptq", llama, tmp_path / "out", "output.checkpoint_every=1")
    finally:
        streaming.Saved.save = save
    with pytest.raises(InputError, match=r"another config \(quant.bits: 4 → 3\)") as e:
        _run("gptq", llama, tmp_path / "out", "output.checkpoint_every=1", "quant.bits=3", resume=True)
    assert "\n" not in str(e.value)
    argv = ["quantize", "gptq", *(f"--set={s}" for s in _sets(llama, tmp_path / "out", "quant.bits=3")),
            "--resume"]
    assert cli.main(argv) == 2 and "another config" in capsys.readouterr().err
    rep = _run("gptq", llama, tmp_path / "out", "output.checkpoint_every=1", resume=True)
    assert rep["resumed_at_block"] == 2


def test_resume_without_a_saved_state_starts_at_block_zero(llama, tmp_path):
    rep = _run("gptq", llama, tmp_path / "out", resume=True)
    assert rep["resumed_at_block"] is None and len(rep["layers"]) == 7 * BLOCKS


def test_a_failed_run_before_any_checkpoint_leaves_nothing(llama, tmp_path, monkeypatch):
    from ojbkq_core import streaming

    def boom(self, index, block, progress):
        raise RuntimeError("boom")
    monkeypatch.setattr(streaming.Streamed, "block_done", boom)
    with pytest.raises(RuntimeError):
        _run("gptq", llama, tmp_path / "out", "output.checkpoint_every=0")
    assert os.listdir(tmp_path) == []


def test_stream_settings_are_checked_where_they_enter(llama, tmp_path):
    with pytest.raises(InputError, match="checkpoint_every='often'"):
        load_spec("gptq", _sets(llama, tmp_path / "o", "output.checkpoint_every=often"))
    with pytest.raises(InputError, match="model.stream='yes'"):
        load_spec("gptq", _sets(llama, tmp_path / "o", "model.stream=yes"))
    rep = _run("gptq", llama, tmp_path / "e", "model.stream=true", "eval.perplexity=[text]", f"eval.path={CALIB_TXT}",
               "eval.seqlen=64", "eval.samples=2")           # evaluation streams too (evaluation.py)
    assert rep["streaming"] and rep["perplexity"]["text"]["windows"] == 2
    with pytest.raises(InputError, match="--resume: this run loads the model whole"):
        _run("gptq", llama, tmp_path / "o", "model.stream=false", resume=True)
    assert checkpoint_policy(3) == (3, 0.0) and checkpoint_policy("5m") == (0, 300.0)
    assert checkpoint_policy("1h") == (0, 3600.0) and checkpoint_policy("90s") == (0, 90.0)


def test_torch_bin_weights_load_whole_with_auto_and_are_refused_with_true(tmp_path):
    folder = str(tmp_path / "bin")
    model = tiny_llama(layers=2)
    os.makedirs(folder)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, base.BIN_NAME))
    from ojbkq_core.data import byte_tokenizer
    byte_tokenizer().save_pretrained(folder)
    rep = _run("gptq", folder, tmp_path / "auto")
    assert "streaming" not in rep
    with pytest.raises(InputError, match="torch .bin files"):
        _run("gptq", folder, tmp_path / "true", "model.stream=true")


def test_shard_writer_gives_one_sorted_pass_over_the_whole_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i:02d}": torch.randn(100 + i, generator=g) for i in range(30)}
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    w = ShardWriter(str(a), 2_000)
    w.add(tensors)
    files = w.close()
    base.write_safetensors(tensors, str(b), 2_000)
    assert len(files) > 1 and sorted(os.listdir(a)) == sorted(os.listdir(b))
    for f in os.listdir(a):
        assert open(a / f, "rb").read() == open(b / f, "rb").read()
    with pytest.raises(ValueError, match="written twice"):
        w2 = ShardWriter(str(tmp_path), 2_000)
        w2.add({"x": torch.zeros(1)})
        w2.add({"x": torch.zeros(1)})


def test_resume_with_other_threads_warns(caplog):
    """A resumed run with another torch thread count is allowed, with one warning naming the saved count."""
    from ojbkq_core.streaming import check_same
    saved = {"config_sha256": "x", "weights": {}, "world_size": 1, "threads": 1}
    check_same(saved, {**saved}, "out/.partial")
    assert not caplog.records
    check_same(saved, {**saved, "threads": 2}, "out/.partial")
    assert "used 1 torch threads, this one 2" in caplog.text and "OMP_NUM_THREADS=1" in caplog.text
    check_same({k: v for k, v in saved.items() if k != "threads"}, {**saved, "threads": 2}, "p")  # older states

"""Calibration over several processes (torch.distributed, gloo, 2 processes on the CPU): the plan and the
shards, float64 statistics summed over ranks, the 2-rank checkpoint against the 1-process one (babai and
klein), and a failing rank ending the run with exit 1 and no output."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ojbkq_core import cli
from ojbkq_core.distributed import World, plan, shard
from ojbkq_core.pipeline import REPORT_FILE, run
from ojbkq_core.spec import load_spec
from ojbkq_core.stats import Statistics
from tiny_models import CALIB_TXT, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "dist_workers.py")
# one thread per process on the shared CPU; the hub stays offline
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def quantize_recipe(recipe, overrides):
    """`ojbkq quantize RECIPE --set ...` in process: the run report."""
    return run(load_spec(recipe, overrides))


def _torchrun(*args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


# --- the plan and the shards ---------------------------------------------------------------------

LLAMA_GROUPS = [[("q", 64, 64), ("k", 32, 64), ("v", 32, 64)], [("o", 64, 64)],
                [("gate", 128, 64), ("up", 128, 64)], [("down", 64, 128)]]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shapes", LLAMA_GROUPS + [[("a", 5, 10), ("b", 100, 10)], [("tiny", 3, 4096)]])
def test_plan_covers_every_row_once_and_balances(shapes, size):
    pieces = plan(shapes, size)
    assert pieces == plan(shapes, size)                                   # a pure function
    assert [p.name for p in pieces] == sorted((p.name for p in pieces), key=[s[0] for s in shapes].index)
    for name, m, n in shapes:
        own = [p for p in pieces if p.name == name]
        assert own[0].r0 == 0 and own[-1].r1 == m and all(a.r1 == b.r0 for a, b in zip(own, own[1:]))
        assert all(0 <= p.rank < size and p.r1 > p.r0 for p in own)
    cost = {name: n * n for name, _, n in shapes}
    load = [sum((p.r1 - p.r0) * cost[p.name] for p in pieces if p.rank == r) for r in range(size)]
    total, biggest = sum(load), max((p.r1 - p.r0) * cost[p.name] for p in pieces)
    assert max(load) <= total / size + biggest                            # list scheduling bound
    if size == 1:
        assert len(pieces) == len(shapes)                                 # one process: whole modules


def test_plan_on_the_tiny_llama_decodes_whole_modules_and_row_slices():
    """What the 2-rank checkpoint test exercises: q on one rank, k and v on the other; o and down cut in two."""
    assert [(p.name, p.rank) for p in plan(LLAMA_GROUPS[0], 2)] == [("q", 0), ("k", 1), ("v", 1)]
    assert [(p.r0, p.r1, p.rank) for p in plan(LLAMA_GROUPS[1], 2)] == [(0, 32, 0), (32, 64, 1)]
    assert [(p.r0, p.r1, p.rank) for p in plan(LLAMA_GROUPS[3], 2)] == [(0, 32, 0), (32, 64, 1)]


@pytest.mark.parametrize("samples,batch,size", [(4, 128, 2), (128, 2, 8), (10, 3, 2), (5, 1, 4), (7, 2, 3)])
def test_shards_split_the_samples_in_whole_batches(samples, batch, size):
    sl = [shard(samples, batch, World(r, size, torch.device("cpu"))) for r in range(size)]
    assert sl[0].start == 0 and sl[-1].stop == samples and all(a.stop == b.start for a, b in zip(sl, sl[1:]))
    assert all(s.stop > s.start for s in sl)
    if -(-samples // batch) >= size:
        assert all(s.start % batch == 0 for s in sl)


def test_fewer_samples_than_processes_is_an_input_error():
    from ojbkq_core.errors import InputError
    with pytest.raises(InputError, match="calibration.samples=1"):
        shard(1, 4, World(0, 2, torch.device("cpu")))


# --- statistics summed over ranks ----------------------------------------------------------------

def test_float64_statistics_summed_over_two_ranks_are_the_one_process_ones(tmp_path):
    """Other split, other batches, other summation order: each float64 entry agrees to 1e-14 of the scale
    of its sum (`|ΔH_ij| ≤ 1e-14 √(H_ii H_jj)`, which bounds `Σ |x_i x_j| / N`), and the entries are equal
    once rounded to float32, the precision the decoders work in; the count is exact."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_workers import N, inputs
    out = str(tmp_path / "stats.pt")
    r = _torchrun(WORKERS, "reduce", out)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    X, Xf = inputs()
    one = Statistics.from_inputs(X, Xf, needs=("H", "C", "G"), dtype=torch.float64)
    assert got["size"] == 2 and got["count"] == one.count == X.shape[0]
    assert (got["H"] != one.H).any()                                      # the summation orders did differ
    scale = {"H": one.H.diagonal(), "G": one.G.diagonal()}
    for key, (a, b) in {"H": ("H", "H"), "C": ("G", "H"), "G": ("G", "G")}.items():   # C = X̃ᵀ X / N
        ref = getattr(one, key)
        bound = 1e-14 * (scale[a][:, None] * scale[b][None, :]).sqrt()
        assert ((got[key] - ref).abs() <= bound).all(), key
        assert torch.equal(got[key].float(), ref.float()), key
    assert Statistics(N).dtype == torch.float32                           # the single-process default


def test_experts_without_tokens_on_a_rank_sum_to_the_one_process_statistics(tmp_path):
    """A module that no token reaches on one rank (or on any) still takes part in every all-reduce."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_workers import routed_inputs
    out = str(tmp_path / "moe.pt")
    r = _torchrun(WORKERS, "moe", out)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    X = torch.cat([torch.cat([x.reshape(-1, x.shape[-1]) for x in routed_inputs(rank)]) for rank in (0, 1)])
    for e, sel in enumerate((X[:, 0] > 0, X[:, 0] <= 0)):
        H, count = got[f"experts.{e}"]
        assert count == int(sel.sum()) > 0
        torch.testing.assert_close(H, X[sel].double().T @ X[sel].double())
    H, count = got["experts.2"]
    assert count == 0 and not H.any()


# --- whole runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save(tiny_llama(), str(tmp_path_factory.mktemp("models") / "llama"))


def _tiny(model_dir, out, *extra):
    return [f"model.path={model_dir}", "model.dtype=float32", f"calibration.path={CALIB_TXT}",
            "calibration.samples=4", "calibration.seqlen=32", "quant.group_size=32", f"output.dir={out}",
            "eval.perplexity=[]", "device=cpu", "output.format=gptq", *extra]


RECIPES = {"babai": ("gptq", []), "klein": ("ojbkq", ["decoder.k=4"])}     # klein with the jta objective (C, G)


@pytest.mark.parametrize("decoder", sorted(RECIPES))
def test_two_ranks_write_the_one_process_checkpoint(llama, tmp_path, monkeypatch, decoder):
    """`ojbkq quantize --nproc 2` (torch.distributed.run, gloo), streamed, gives the files of one process
    that loads the model whole, with float64 statistics, byte for byte: the same codes, scales and zeros."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, extra = RECIPES[decoder]
    config = recipe
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ref = quantize_recipe(config, _tiny(llama, one, *extra, "calibration.stats_dtype=float64", "model.stream=false"))
    r = subprocess.run([sys.executable, "-m", "ojbkq_core.cli", "quantize", config, "--nproc", "2",
                        *(f"--set={s}" for s in _tiny(llama, two, *extra))],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("model.safetensors", "config.json"):
        assert open(os.path.join(one, f), "rb").read() == open(os.path.join(two, f), "rb").read(), f
    rep = json.load(open(os.path.join(two, REPORT_FILE)))
    assert rep["world_size"] == 2 and ref["world_size"] == 1
    assert "streaming" in rep and "streaming" not in ref
    assert rep["statistics_dtype"] == ref["statistics_dtype"] == "float64"
    assert [x["rank"] for x in rep["ranks"]] == [0, 1] and [x["samples"] for x in rep["ranks"]] == [2, 2]
    assert all(x["seconds"]["decode"] > 0 and x["seconds"]["communicate"] > 0 for x in rep["ranks"])
    assert rep["layers"].keys() == ref["layers"].keys()
    for name, row in rep["layers"].items():
        assert row["loss"] == pytest.approx(ref["layers"][name]["loss"], rel=1e-9), name
        assert row["draws"] == ref["layers"][name]["draws"]
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]                 # nothing else written


@pytest.mark.parametrize("fallback", ["rtn", "all_tokens"])
def test_two_ranks_quantize_a_mixture_of_experts_as_one_process(tmp_path, fallback):
    """Experts' statistics (the tokens both streams route to them, paired) and the fallback decisions
    (on the token counts summed over ranks) are those of one process."""
    from tiny_models import tiny_moe
    src = save(tiny_moe("qwen3_moe", layers=2), str(tmp_path / "moe"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extra = ["decoder.k=4", "quant.moe_min_tokens=24", f"quant.moe_fallback={fallback}"]
    ref = quantize_recipe("ojbkq", _tiny(src, one, *extra, "calibration.stats_dtype=float64", "model.stream=false"))
    r = subprocess.run([sys.executable, "-m", "ojbkq_core.cli", "quantize", "ojbkq", "--nproc", "2",
                        *(f"--set={s}" for s in _tiny(src, two, *extra))],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("model.safetensors", "config.json"):
        assert open(os.path.join(one, f), "rb").read() == open(os.path.join(two, f), "rb").read(), f
    rep = json.load(open(os.path.join(two, REPORT_FILE)))
    assert rep["experts"] == ref["experts"] and rep["experts"]["fallbacks"]
    assert {f["fallback"] for f in rep["experts"]["fallbacks"].values()} == {fallback}


@pytest.mark.parametrize("step", ["statistics", pytest.param("quantize", marks=pytest.mark.slow)])
def test_a_failing_rank_ends_the_run_with_exit_1_and_no_output(llama, tmp_path, step):
    """Rank 1 raises while rank 0 waits in a collective (the all-reduce of the statistics, the broadcast
    of the decoded rows): every process ends promptly, torchrun exits 1 naming the error, no folder."""
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = _torchrun(WORKERS, "fail", step, "1", "quantize", "gptq",
                  *(f"--set={s}" for s in _tiny(llama, str(out))), timeout=180)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"injected failure in {step} on rank 1" in r.stderr
    assert time.perf_counter() - t0 < 120
    assert os.listdir(tmp_path) == []


def test_launcher_reports_the_failed_rank_in_one_line(tmp_path, capsys):
    """`--nproc`: a bad config ends before any process starts (exit 2); an error inside the ranks ends the
    run with exit 1 and one line naming the rank."""
    config = "gptq"
    assert cli.main(["quantize", config, "--nproc", "2", "--set", "quant.bits=9"]) == 2
    assert "quant.bits" in capsys.readouterr().err
    assert cli.main(["quantize", config, "--nproc", "0"]) == 2
    missing = str(tmp_path / "no-such-model")
    r = subprocess.run([sys.executable, "-m", "ojbkq_core.cli", "quantize", config, "--nproc", "2",
                        *(f"--set={s}" for s in _tiny(missing, str(tmp_path / "out")))],
                       capture_output=True, text=True, env=ENV, timeout=180, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ojbkq: rank ") and "of 2 failed (exit code 2): bad input" in last
    assert "nothing was written" in last
    assert "no-such-model" in r.stderr
    assert not os.path.exists(tmp_path / "out")

"""Numerical faults during calibration: a block whose outputs overflow float16 stops the run at that
block (named, nothing written); singular or badly conditioned Hessians raise the damping step by step,
each step logged and in the report; a module no calibration token reaches (an unrouted expert) is
rounded to nearest and reported instead of failing."""
import logging
import os

import pytest
import torch
from torch import nn

from ojbkq_core import cli
from ojbkq_core.calibrate import Settings, Streams, calibrate, check_finite, layer_tasks, quantize
from ojbkq_core.decoders import Babai
from ojbkq_core.errors import NonFiniteError
from ojbkq_core.grid import GridSpec
from ojbkq_core.layer import quantize_layer
from ojbkq_core.linalg import inverse_cholesky
from ojbkq_core.model import Model
from ojbkq_core.objectives import Objective, Term
from ojbkq_core.stats import Statistics
from tiny_models import CALIB_TXT, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYMMETRIC = Objective((Term(1.0, 0.0, 0.0),), "symmetric")
ASYMMETRIC = Objective((Term(1.0, 1.0, 0.0),), "asymmetric")


# --- NaN / inf ------------------------------------------------------------------------------------

def test_a_block_overflowing_float16_stops_the_run_at_that_block(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_llama(layers=2)
    with torch.no_grad():                       # finite float16 weights whose products overflow
        mlp = model.model.layers[1].mlp
        mlp.down_proj.weight.mul_(3e4 / mlp.down_proj.weight.abs().max())
        mlp.up_proj.weight.mul_(30)
    folder = save(model, str(tmp_path / "m"))
    out = tmp_path / "out"
    sets = [f"model.path={folder}", "model.dtype=float16", f"calibration.path={CALIB_TXT}",
            "calibration.samples=2", "calibration.seqlen=16", "quant.group_size=32", f"output.dir={out}",
            "eval.perplexity=[]", "device=cpu", "output.format=gptq"]
    rc = cli.main(["quantize", "gptq", *sum((["--set", s] for s in sets), [])])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1
    assert last.startswith("ojbkq quantize: outputs of model.layers.1 (block 1): inf in the runtime stream")
    assert "float16" in last and "model.dtype" in last
    assert not out.exists() and os.listdir(tmp_path) == ["m"]


def test_check_finite_names_the_stream_and_batch():
    ok = [torch.zeros(1, 3, 4), torch.ones(1, 3, 4)]
    check_finite(Streams([None, None], ok, list(ok)), "here")
    bad = [ok[0], torch.tensor([[[0.0, float("nan"), 0.0, 0.0]]], dtype=torch.bfloat16)]
    with pytest.raises(NonFiniteError, match=r"^here: NaN in the full-precision stream \(batch 1\); "
                                             r"the block overflows bfloat16"):
        check_finite(Streams([None, None], ok, bad), "here")
    with pytest.raises(NonFiniteError, match="inf in the runtime stream .batch 0.; check the model's weights"):
        check_finite(Streams([None], [torch.full((1, 2, 4), float("inf"))], None), "here")


# --- damping ----------------------------------------------------------------------------------------

def test_singular_H_raises_the_damping_step_by_step_and_reports_each(caplog):
    torch.manual_seed(0)
    X = torch.randn(5, 12)                      # 5 tokens, 12 inputs: H has rank 5
    W = torch.randn(4, 12)
    with caplog.at_level(logging.WARNING, logger="ojbkq"):
        res = quantize_layer(W, Statistics.from_inputs(X), SYMMETRIC, GridSpec(bits=3), Babai(), damp=0.0)
    steps = res.report["damp_steps"]
    assert steps[0] == 0.0 and steps[1] == 1e-6 and len(steps) >= 2
    assert all(b == pytest.approx(a * 10) for a, b in zip(steps[1:], steps[2:]))
    assert res.report["damp"] == steps[-1]
    failed = [r.getMessage() for r in caplog.records if "failed at damping" in r.getMessage()]
    assert len(failed) == len(steps) - 1
    assert torch.isfinite(res.qweight).all()


def test_a_factor_that_exists_but_is_singular_at_working_precision_is_damped():
    H = torch.diag(torch.tensor([1.0, 1e-9, 1.0]))   # Cholesky succeeds; pivot ratio² = 1e9 > 1/eps(float32)
    assert int(torch.linalg.cholesky_ex(H)[1]) == 0
    steps = []
    U, Hd, delta = inverse_cholesky(H, damp=0.0, steps=steps)
    assert steps == [0.0, 1e-6] and delta == 1e-6
    H64 = H.double()                                  # in float64 the same matrix is fine
    steps = []
    inverse_cholesky(H64, damp=0.0, steps=steps)
    assert steps == [0.0]


def test_well_conditioned_H_takes_one_step():
    torch.manual_seed(0)
    res = quantize_layer(torch.randn(4, 8), Statistics.from_inputs(torch.randn(64, 8)), SYMMETRIC,
                         GridSpec(bits=3), Babai(), damp=0.01)
    assert res.report["damp_steps"] == [0.01]


# --- a module without calibration tokens -----------------------------------------------------------

class Experts(nn.Module):
    """Top-1 routing over three experts; the router's bias keeps every token away from expert 2."""

    def __init__(self, d=16):
        super().__init__()
        self.router = nn.Linear(d, 3)
        self.experts = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(3))
        with torch.no_grad():
            self.router.bias[2] = -1e4

    def forward(self, hidden):
        choice = self.router(hidden).argmax(-1)
        out = hidden.clone()
        for e, expert in enumerate(self.experts):
            sel = choice == e
            if sel.any():
                out[sel] = hidden[sel] + expert(hidden[sel])
        return out


class ToyMoE(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.layers = nn.ModuleList([Experts(d), Experts(d)])

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return h


class ToyMoEAdapter(Model):
    name = "toy-moe"
    causal = False

    @classmethod
    def matches(cls, model):
        return isinstance(model, ToyMoE)

    def blocks_path(self):
        return "layers"

    def groups(self, block):
        return [["experts.0", "experts.1", "experts.2"]]


@pytest.mark.parametrize("objective", [SYMMETRIC, ASYMMETRIC], ids=["symmetric", "two-streams"])
def test_an_expert_without_tokens_is_rounded_to_nearest_and_reported(objective, caplog):
    torch.manual_seed(0)
    model = ToyMoE().eval()
    before = {i: model.layers[i].experts[2].weight.detach().clone() for i in range(2)}
    grid = GridSpec(bits=3, group_size=-1)
    ids = torch.randint(0, 256, (2, 8))         # 16 tokens over two experts of 16 inputs: singular H
    with caplog.at_level(logging.WARNING, logger="ojbkq"):
        res = calibrate(ToyMoEAdapter(model), ids, objective, grid, Babai(), damp=0.0, progress=False)
    unrouted = ["layers.0.experts.2", "layers.1.experts.2"]
    assert res.report["rounded_without_tokens"] == unrouted
    rows = res.report["layers"]
    for i, name in enumerate(unrouted):
        assert rows[name]["fallback"] == "rtn" and rows[name]["loss"] == 0.0
        W = before[i]
        scale, zero = grid.fit(W)
        rtn = scale[:, None] * (torch.clamp(torch.round(W / scale[:, None]) + zero[:, None], 0, grid.maxq)
                                - zero[:, None])
        torch.testing.assert_close(model.layers[i].experts[2].weight, rtn)
        assert any(name in r.getMessage() and "no calibration token" in r.getMessage() for r in caplog.records)
    for name in ["layers.0.experts.0", "layers.0.experts.1"]:
        assert "fallback" not in rows[name]
        assert rows[name]["damp_steps"][:2] == [0.0, 1e-6]     # fewer tokens than inputs: damped up from 0


def test_all_zero_inputs_are_rounded_to_nearest():
    lin = nn.Linear(8, 4, bias=False)
    block = nn.ModuleDict({"lin": lin})
    stats = Statistics(8)
    stats.add(torch.zeros(10, 8))
    adapter = ToyMoEAdapter(ToyMoE())
    task = layer_tasks(SYMMETRIC, "b", ["lin"], 0, 0)[0]
    res = quantize(adapter, block.lin, stats, task, Settings(GridSpec(bits=3), Babai()), "cpu")
    assert res.report["fallback"] == "rtn" and res.loss == 0.0
    assert (res.qweight != 0).any()                # not zeroed as dead columns would be

"""Outputs a block's later passes reuse (`ojbkq_core.reuse`): the same results as running the modules
again, fewer module calls, and the odd cases (a module called twice, an output changed in place, a
forward replaced on the instance, no budget)."""
import copy

import pytest
import torch
from torch import nn

from ojbkq_core.calibrate import calibrate
from ojbkq_core.decoders import Babai
from ojbkq_core.grid import GridSpec
from ojbkq_core.model import find_adapter
from ojbkq_core.registry import get_registry
from ojbkq_core.reuse import Reuse
from tiny_models import one_thread, tiny_llama, token_ids  # noqa: F401 (autouse fixture)


class Twice(nn.Module):
    """`b(2·a(a(x)))`: `a` is called twice per pass, and its first output is changed in place."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        y = self.a(x)
        y.mul_(2.0)
        return self.b(self.a(y))




@torch.no_grad()
def test_a_module_kept_once_final_stands_in_for_its_first_call_only():
    block, x = Twice(), torch.randn(3, 4)
    want = block(x)
    reuse = Reuse(block, ["a", "b"], budget=1 << 20)
    with reuse.around(block, 0, pending=["b"]):       # a is final, b is not: a(x) is kept
        first = block(x)
    assert set(reuse.kept[0]) == {"a"} and reuse.reused == 0
    with reuse.around(block, 0, pending=[]):           # its first call is answered, the second computes;
        again = block(x)                               # nothing is pending now: b is kept as well
    assert torch.equal(first, want) and torch.equal(again, want)
    assert reuse.reused == 1 and set(reuse.kept[0]) == {"a", "b"}
    with reuse.around(block, 0, pending=[]):
        assert torch.equal(block(x), want)
    assert reuse.reused == 3
    assert "forward" not in block.a.__dict__          # the instance is as it was
    with reuse.around(block, 1, pending=[]):           # another batch keeps its own
        block(x + 1)
    assert set(reuse.kept[1]) == {"a", "b"}


@torch.no_grad()
def test_nothing_is_kept_after_a_pending_module_ran_nor_beyond_the_budget():
    block, x = Twice(), torch.randn(3, 4)
    reuse = Reuse(block, ["a", "b"], budget=1 << 20)
    with reuse.around(block, 0, pending=["a", "b"]):
        block(x)
    assert reuse.kept[0] == {}
    none = Reuse(block, ["a", "b"], budget=0)
    with none.around(block, 0, pending=[]):
        block(x)
    assert none.kept[0] == {} and none.bytes == 0


@torch.no_grad()
def test_a_forward_replaced_on_the_instance_is_put_back():
    block, x = Twice(), torch.randn(3, 4)
    own = block.a.forward
    block.a.forward = lambda inp: own(inp)
    replaced = block.a.forward
    reuse = Reuse(block, ["a"], budget=1 << 20)
    with reuse.around(block, 0, pending=["b"]):
        want = block(x)
    with reuse.around(block, 0, pending=[]):
        assert torch.equal(block(x), want)
    assert block.a.forward is replaced


def test_keeping_a_module_drops_what_was_kept_inside_it():
    model = tiny_llama()
    block = find_adapter(model).blocks()[0]
    reuse = Reuse(block, ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"], budget=1 << 30)
    assert reuse.candidates == ["mlp", "mlp.up_proj", "self_attn", "self_attn.o_proj", "self_attn.q_proj"]


@pytest.mark.parametrize("objective", ["symmetric", "jta"])
def test_the_engine_with_reuse_gives_the_same_codes_with_fewer_module_calls(objective, monkeypatch):
    """Calibration on a tiny Llama with and without reuse: the same codes, weights and objective, and
    the reused runs call the attention and the gate and up projections fewer times."""
    import ojbkq_core.calibrate as cal
    model = tiny_llama()
    ids = token_ids(6, 32)
    twin = copy.deepcopy(model)
    grid = GridSpec(bits=3, group_size=32)
    obj = get_registry().objective(objective)

    real = nn.Linear.forward

    def run(m):                                      # the linear layers that really compute
        calls = []

        def counted(self, x):
            calls.append(self)
            return real(self, x)

        with monkeypatch.context() as mp:
            mp.setattr(nn.Linear, "forward", counted)
            res = calibrate(find_adapter(m), ids, obj, grid, Babai(), progress=False, batch_size=2)
        return res, len(calls)

    reused, n_reused = run(model)
    monkeypatch.setattr(cal, "REUSE_BYTES", 0)
    plain, n_plain = run(twin)
    assert n_reused < n_plain
    assert reused.report["objective_sum"] == plain.report["objective_sum"]
    for n in plain.layers:
        assert torch.equal(reused.layers[n].codes, plain.layers[n].codes)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_budget_off_the_gpu_is_the_constant_and_zero_turns_reuse_off(monkeypatch):
    import ojbkq_core.calibrate as cal
    assert cal.reuse_budget(torch.device("cpu")) == cal.REUSE_BYTES > 0
    monkeypatch.setattr(cal, "REUSE_BYTES", 0)
    assert cal.reuse_budget(torch.device("cpu")) == 0

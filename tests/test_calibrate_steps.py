"""Each calibration step alone on a tiny Llama block (capture, statistics, quantize, replace, propagate),
and the engine's events."""
import copy

import pytest
import torch

from ojbkq_core.calibrate import (Events, Settings, Streams, calibrate, capture, layer_seed, layer_tasks, propagate,
                                  quantize, quantize_group, quantized_names, replace, shared, statistics)
from ojbkq_core.decoders import Babai
from ojbkq_core.grid import GridSpec
from ojbkq_core.layer import LayerResult, quantize_layer
from ojbkq_core.model import find_adapter
from ojbkq_core.registry import get_registry
from ojbkq_core.stats import Statistics
from tiny_models import one_thread, tiny_llama, token_ids  # noqa: F401 (autouse fixture)

GRID = GridSpec(bits=3, group_size=32)
QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def _inputs_of(module, run):
    """The inputs `module` receives while `run()` executes, one tensor per call."""
    got = []
    h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    return got


@pytest.fixture
def llama():
    model = tiny_llama()
    adapter = find_adapter(model)
    return model, adapter, token_ids(6, 32)


def test_capture_gives_the_first_block_inputs_in_both_streams(llama):
    model, adapter, ids = llama
    hooked = _inputs_of(adapter.blocks()[0], lambda: [model(input_ids=ids[i:i + 2], use_cache=False)
                                                      for i in range(0, 6, 2)])
    s = capture(adapter, ids, 2, full_precision=True)
    assert len(s) == 3 and s.full_precision
    for x, x_fp, h in zip(s.X, s.X_fp, hooked):
        assert torch.equal(x, h) and torch.equal(x_fp, h)
    assert capture(adapter, ids, 2, full_precision=False).X_fp is None


def test_statistics_equals_from_inputs_on_hooked_inputs_and_qkv_share_one(llama):
    model, adapter, ids = llama
    block = adapter.blocks()[0]
    s = capture(adapter, ids, 2, full_precision=True)
    orig = s.original(block)
    with torch.no_grad():                        # the runtime block differs from its full-precision copy
        block.self_attn.q_proj.weight.mul_(0.5)
        block.mlp.up_proj.weight.add_(0.01)
    names = QKV + ["mlp.up_proj"]
    st = statistics(block, orig, {n: {"H", "C"} if n == "self_attn.k_proj" else {"H"} for n in names}, s, "cpu")
    assert st["self_attn.q_proj"] is st["self_attn.k_proj"] is st["self_attn.v_proj"]
    assert st["mlp.up_proj"] is not st["self_attn.q_proj"]
    assert st["self_attn.q_proj"].needs == {"H", "C"} and st["mlp.up_proj"].needs == {"H"}

    def inputs(blk, X, name):
        run = lambda: [blk(x, *b.args, **b.kwargs) for x, b in zip(X, s.batches)]  # noqa: E731
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in _inputs_of(blk.get_submodule(name), run)])

    for name in ("self_attn.q_proj", "mlp.up_proj"):
        x, x_fp = inputs(block, s.X, name), inputs(orig, s.X_fp, name)
        ref = Statistics.from_inputs(x, x_fp, needs=st[name].needs)
        torch.testing.assert_close(st[name].H, ref.H, rtol=1e-5, atol=1e-6)
        if "C" in st[name].needs:
            torch.testing.assert_close(st[name].C, ref.C, rtol=1e-5, atol=1e-6)
    up = inputs(block, s.X, "mlp.up_proj")
    assert not torch.allclose(up, inputs(orig, s.X_fp, "mlp.up_proj"))   # the two streams did differ


def test_statistics_are_shared_by_modules_reading_one_input(llama):
    _, adapter, ids = llama
    block = adapter.blocks()[0]
    s = capture(adapter, ids, 3, full_precision=False)
    st = statistics(block, None, {n: {"H"} for n in QKV + ["self_attn.o_proj"]}, s, "cpu")
    seen = shared(st)
    assert len(seen) == 2 and st["self_attn.q_proj"] is seen[0] and st["self_attn.o_proj"] is seen[1]
    assert st["self_attn.k_proj"] is st["self_attn.v_proj"] is seen[0]


def test_quantize_and_replace_one_module(llama):
    _, adapter, ids = llama
    block = adapter.blocks()[0]
    s = capture(adapter, ids, 3, full_precision=False)
    spec = get_registry().objective("symmetric")
    task = layer_tasks(spec, "model.layers.0", ["mlp.up_proj", "mlp.gate_proj"], 7, seed=3, skip=["*gate*"])
    assert [(t.name, t.full, t.index) for t in task] == [("mlp.up_proj", "model.layers.0.mlp.up_proj", 7)]
    st = statistics(block, None, {"mlp.up_proj": {"H"}}, s, "cpu")
    module = block.get_submodule("mlp.up_proj")
    W = module.weight.detach().float().clone()
    settings = Settings(GRID, Babai(), damp=0.01, seed=3)
    res = quantize(adapter, module, st["mlp.up_proj"], task[0], settings, "cpu")
    expect = quantize_layer(W, st["mlp.up_proj"], task[0].objective, GRID, Babai(), damp=0.01, seed=layer_seed(3, 7))
    assert torch.equal(res.qweight, expect.qweight) and torch.equal(module.weight, W)   # not written yet
    assert res.report["sym_loss"] == pytest.approx(float((((W - res.qweight) @ st["mlp.up_proj"].H)
                                                          * (W - res.qweight)).sum()), rel=1e-5)
    assert quantize_group(adapter, block, task, st, settings, "cpu")["mlp.up_proj"].qweight.equal(res.qweight)
    replace(adapter, block, {"mlp.up_proj": res})
    assert torch.equal(module.weight, res.qweight)


def test_propagate_equals_the_block_forward(llama):
    _, adapter, ids = llama
    block = adapter.blocks()[0]
    s = capture(adapter, ids, 2, full_precision=True)
    orig = s.original(block)
    with torch.no_grad():
        block.mlp.down_proj.weight.mul_(0.9)
    before = s.snapshot()                       # propagate replaces the streams batch by batch in place
    nxt = propagate(block, orig, s, "cpu")
    assert nxt.batches is s.batches
    with torch.no_grad():
        for x, x_fp, b, y, y_fp in zip(before["X"], before["X_fp"], s.batches, nxt.X, nxt.X_fp):
            out, out_fp = block(x, *b.args, **b.kwargs), orig(x_fp, *b.args, **b.kwargs)
            out, out_fp = (o[0] if isinstance(o, tuple) else o for o in (out, out_fp))
            assert torch.equal(y, out) and torch.equal(y_fp, out_fp)
    assert not torch.equal(nxt.X[0], nxt.X_fp[0])
    assert propagate(block, None, capture(adapter, ids, 2, full_precision=False), "cpu").X_fp is None


def test_full_precision_stream_only_when_needed():
    assert not Streams.full_precision_needed({"H"}, sampled=False)
    assert Streams.full_precision_needed({"H", "C"}, sampled=False)
    assert Streams.full_precision_needed({"H"}, sampled=True)


class Recorder(Events):
    """Every event, in the order the engine reaches it."""

    def __init__(self, stop_after_block=None):
        self.log, self.stop_after_block, self.blocks_done = [], stop_after_block, 0

    def statistics_ready(self, group):
        self.log.append(("statistics", group.block_index, len(shared(group.stats))))
        return super().statistics_ready(group)

    def decode_group(self, group):
        self.log.append(("decode", group.block_index, [t.full for t in group.tasks]))
        return super().decode_group(group)

    def group_decoded(self, group, results):
        unchanged = all(torch.equal(group.block.get_submodule(t.name).weight, self.weights[t.full])
                        for t in group.tasks)
        self.log.append(("decoded", group.block_index, unchanged))

    def layer_done(self, group, task, row):
        self.log.append(("layer", task.full, row["loss"]))

    def block_done(self, index, block, progress):
        self.log.append(("block", index))
        self.blocks_done += 1

    def stop_requested(self):
        return self.stop_after_block is not None and self.blocks_done > self.stop_after_block


def test_the_engine_reaches_its_events_in_order(llama):
    model, adapter, ids = llama
    ref = calibrate(find_adapter(copy.deepcopy(model)), ids, get_registry().objective("symmetric"), GRID, Babai(),
                    progress=False)
    events = Recorder()
    events.weights = {n: adapter.model.get_submodule(n).weight.detach().clone() for n in adapter.layer_names()}
    res = calibrate(adapter, ids, get_registry().objective("symmetric"), GRID, Babai(), progress=False,
                    events=events, skip=["*.o_proj"])
    names = quantized_names(adapter, ["*.o_proj"])
    decoded = [n for e in events.log if e[0] == "decode" for n in e[2]]
    assert decoded == names == list(res.layers) == [e[1] for e in events.log if e[0] == "layer"]
    # per block: q/k/v (one shared Statistics), up/gate (shared), down; o_proj skipped
    assert [e[2] for e in events.log if e[0] == "statistics"] == [1, 1, 1] * 2
    assert all(e[2] for e in events.log if e[0] == "decoded")        # before the weights are written
    kinds = [e[0] for e in events.log]
    assert kinds[:4] == ["statistics", "decode", "decoded", "layer"] and kinds.count("block") == 2
    assert kinds.index("block") > max(i for i, e in enumerate(events.log) if e[0] == "layer" and ".0." in e[1])
    assert [e[2] for e in events.log if e[0] == "layer"] == [res.report["layers"][n]["loss"] for n in names]
    for n in names[:3]:                   # block 0's q, k, v see the same inputs as without skipping
        assert torch.equal(res.layers[n].qweight, ref.layers[n].qweight)
    assert "stopped_after_block" not in res.report


def test_a_run_stops_when_asked(llama):
    model, adapter, ids = llama
    events = Recorder(stop_after_block=0)
    events.weights = {n: adapter.model.get_submodule(n).weight.detach().clone() for n in adapter.layer_names()}
    res = calibrate(adapter, ids, get_registry().objective("symmetric"), GRID, Babai(), progress=False, events=events)
    assert res.report["stopped_after_block"] == 0
    assert list(res.layers) == [n for n in adapter.layer_names() if n.startswith("model.layers.0.")]
    untouched = adapter.model.get_submodule("model.layers.1.mlp.down_proj").weight
    assert torch.equal(untouched, events.weights["model.layers.1.mlp.down_proj"])


def test_weight_only_results_write_the_weight_and_keep_no_codes(llama):
    """What a rank other than 0 gets back from a distributed group: the weight, no codes."""
    _, adapter, _ = llama
    block = adapter.blocks()[0]
    Q = torch.randn_like(block.mlp.up_proj.weight, dtype=torch.float32)
    res = LayerResult.weight_only(Q)
    assert not res.decoded_here
    replace(adapter, block, {"mlp.up_proj": res})
    assert torch.equal(block.mlp.up_proj.weight, Q.to(block.mlp.up_proj.weight.dtype)) and res.stored_qweight is None


def test_last_statistics_pass_also_propagates_the_full_precision_stream(llama):
    _, adapter, ids = llama
    block = adapter.blocks()[0]
    s = capture(adapter, ids, 2, full_precision=True)
    orig = s.original(block)
    before = s.snapshot()
    needs = {"mlp.down_proj": {"H", "C", "G"}}
    plain = statistics(block, orig, needs, capture(adapter, ids, 2, full_precision=True), "cpu")
    fused = statistics(block, orig, needs, s, "cpu", propagate_fp=True)
    assert torch.equal(fused["mlp.down_proj"].G, plain["mlp.down_proj"].G)
    assert s.fp_propagated
    with torch.no_grad():
        for x_fp, b, y_fp in zip(before["X_fp"], s.batches, s.X_fp):
            out = orig(x_fp, *b.args, **b.kwargs)
            assert torch.equal(y_fp, out[0] if isinstance(out, tuple) else out)
    with torch.no_grad():
        block.mlp.down_proj.weight.mul_(0.9)
    nxt = propagate(block, orig, s, "cpu")            # the runtime stream only
    for y_fp, x_fp in zip(nxt.X_fp, s.X_fp):
        assert y_fp is x_fp
    assert not nxt.fp_propagated


def test_one_full_precision_pass_per_block_gives_the_per_group_results(llama, monkeypatch):
    """With `fp_modules` planned, the full-precision block runs once per batch for all groups (it never
    changes within a block) and the calibration is the same as with one partial pass per group."""
    import ojbkq_core.calibrate as cal
    model, adapter, ids = llama
    jta = get_registry().objective("jta")
    calls = []
    real = cal.module_inputs

    def counted(block, names, *a, **k):
        calls.append(tuple(names))
        return real(block, names, *a, **k)

    monkeypatch.setattr(cal, "module_inputs", counted)
    twin = find_adapter(copy.deepcopy(model))
    once = calibrate(adapter, ids, jta, GRID, Babai(), progress=False, batch_size=2)
    per_block_once = len(calls)
    calls.clear()
    monkeypatch.setattr(cal, "FULL_PRECISION_PASS_BYTES", 0)        # no room: one pass per group
    per_group = calibrate(twin, ids, jta, GRID, Babai(), progress=False, batch_size=2)
    groups = len(adapter.groups(adapter.blocks()[0]))
    blocks, batches = len(adapter.blocks()), 3
    assert per_block_once == blocks * batches * (groups + 1)         # runtime per group, full precision once
    assert len(calls) == blocks * batches * 2 * groups
    assert once.layers.keys() == per_group.layers.keys()
    for n in once.layers:
        assert torch.equal(once.layers[n].qweight, per_group.layers[n].qweight)
        assert once.report["layers"][n]["loss"] == per_group.report["layers"][n]["loss"]


def test_plan_full_precision_keeps_to_its_budget(llama):
    _, adapter, ids = llama
    block = adapter.blocks()[0]
    s = capture(adapter, ids, 2, full_precision=True)
    names = QKV + ["mlp.down_proj"]
    tokens = sum(x.numel() // x.shape[-1] for x in s.X_fp)
    need = tokens * sum(block.get_submodule(n).in_features for n in names) * s.X_fp[0].element_size()
    s.plan_full_precision(block, names, need)
    assert s.fp_modules == names and s.fp_pass == {}
    s.plan_full_precision(block, names, need - 1)
    assert s.fp_modules is None
    r = capture(adapter, ids, 2, full_precision=False)
    r.plan_full_precision(block, names, need)
    assert r.fp_modules is None


def test_pinned_streams_are_overwritten_in_place(llama):
    _, adapter, ids = llama
    s = capture(adapter, ids, 2, full_precision=False)
    s.home = "pinned"                                 # in-place copies (pinned memory itself needs CUDA)
    first = s.X[0]
    out = torch.randn_like(first)
    s.store(s.X, 0, out)
    assert s.X[0] is first and torch.equal(first, out)


def test_replace_keeps_narrow_codes_and_rebuilds_the_weight(llama):
    _, adapter, ids = llama
    block = adapter.blocks()[0]
    s = capture(adapter, ids, 2, full_precision=False)
    task = layer_tasks(get_registry().objective("symmetric"), "model.layers.0", ["mlp.up_proj"], 0, 0)
    st = statistics(block, None, {"mlp.up_proj": {"H"}}, s, "cpu")
    res = quantize(adapter, block.mlp.up_proj, st["mlp.up_proj"], task[0], Settings(GRID, Babai()), "cpu")
    Q, codes = res.qweight.clone(), res.codes.clone()
    replace(adapter, block, {"mlp.up_proj": res})
    assert res.stored_qweight is None and res.codes.dtype == torch.uint8
    assert torch.equal(res.codes.long(), codes) and torch.equal(res.qweight, Q)


def test_report_names_where_the_streams_live(llama):
    _, adapter, ids = llama
    res = calibrate(adapter, ids, get_registry().objective("symmetric"), GRID, Babai(), progress=False)
    assert res.report["streams"] == "cpu" and res.report["batch_size"] == 4096 // ids.shape[1]

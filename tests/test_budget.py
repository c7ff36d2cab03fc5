"""The column-blocked form of a layer (ojbkq_core/budget.py, linalg.inverse_cholesky_blocked,
layer.factorize_blocked): the same factor, the same codes and objective as the whole-matrix form, on layers
forced through several column blocks and row chunks; the plan and the refusal of a layer that cannot fit."""
import numpy as np
import pytest
import torch

from ojbkq_core import budget
from ojbkq_core.decoders import Babai, Beam, Klein, Successive
from ojbkq_core.errors import FactorizationError, InputError
from ojbkq_core.grid import GridSpec
from ojbkq_core.layer import Square, _Double, factorize, prepare_layer, quantize_layer, times
from ojbkq_core.linalg import inverse_cholesky, inverse_cholesky_blocked
from ojbkq_core.objectives import PRESETS, preset
from ojbkq_core.stats import Statistics

from test_layer import correlated_inputs

BLOCKED = budget.Plan(blocked=True, block=16, rows=7)    # 72 columns: 5 blocks, the last one short


def layer(m=20, n=72, N=600, seed=0, dead=(5, 40), dtype=torch.float64):
    """A weight `(m, n)` and its statistics in `dtype` (float64: the two forms then combine the same
    numbers, and differ only by the order of their operations)."""
    X, Xfp = correlated_inputs(N, n, seed, dead=dead)
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(m, n, generator=g)
    return W, Statistics.from_inputs(X, Xfp, needs=("H", "C", "G"), dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n,block", [(50, 16), (64, 64), (130, 32)])
def test_blocked_inverse_cholesky_is_the_whole_one(dtype, tol, n, block):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    H = (X.T @ X / (3 * n)).to(dtype)
    U, _, delta = inverse_cholesky(H, 0.01)
    steps = []
    Ub, delta_b, mean_diag = inverse_cholesky_blocked(lambda: H.clone(), 0.01, block, steps=steps)
    assert delta_b == delta == 0.01 and steps == [0.01]
    assert mean_diag == pytest.approx(float(H.diagonal().mean()))
    assert torch.equal(Ub, Ub.triu()) and bool((Ub.diagonal() > 0).all())
    assert (Ub - U).abs().max() <= tol * U.abs().max()


def test_blocked_inverse_cholesky_raises_the_damping_as_the_whole_one_does():
    H = torch.tensor([[1.0, 1.5, 0.0], [1.5, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)   # indefinite
    steps_w, steps_b = [], []
    U, Hd, delta = inverse_cholesky(H, 0.01, steps=steps_w)
    Ub, delta_b, _ = inverse_cholesky_blocked(lambda: H.clone(), 0.01, 2, steps=steps_b)
    assert steps_b == steps_w and delta_b == delta > 0.01
    torch.testing.assert_close(Ub, U, rtol=1e-10, atol=1e-12)
    with pytest.raises(FactorizationError, match="damp"):
        inverse_cholesky_blocked(lambda: torch.tensor([[1.0, 0.0], [0.0, -5.0]]), 0.0, 1, retries=1)


@pytest.mark.parametrize("name", ["symmetric", "jta"])
@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_factorization_is_the_whole_one(name, act_order):
    W, st = layer()
    obj = preset(name, *PRESETS[name]).build(np.random.default_rng(0))[0]
    a = factorize(st, obj, 0.01, act_order, torch.float64, "cpu")
    b = factorize(st, obj, 0.01, act_order, torch.float64, "cpu", plan=BLOCKED)
    assert torch.equal(a.perm, b.perm) and torch.equal(a.dead, b.dead) and int(a.dead.sum()) == 2
    assert (a.U - b.U).abs().max() <= 1e-10 * a.U.abs().max()
    assert b.lam == pytest.approx(a.lam, rel=1e-12) and b.damp_steps == a.damp_steps
    assert (a.MH is None) == (b.MH is None) == (name == "symmetric")
    if a.MH is not None:                                   # never held whole: W (M − H) a block at a time
        assert isinstance(b.MH, Square)
        torch.testing.assert_close(times(W.double(), b.MH), W.double() @ a.MH, rtol=1e-10, atol=1e-12)


def test_reading_the_statistics_by_columns_gives_the_same_objective():
    W, st = layer()
    Q = W + 0.05 * torch.randn_like(W)
    obj = preset("jta", *PRESETS["jta"]).build(np.random.default_rng(0))[0]
    whole = obj.value(W.double(), Q.double(), _Double(st, "cpu"))
    by_columns = obj.value(W.double(), Q.double(), _Double(st, "cpu"), cols=16)
    torch.testing.assert_close(by_columns, whole, rtol=1e-12, atol=1e-12)


CASES = [
    ("symmetric", Babai, {}, GridSpec(bits=3, group_size=16, act_order=True)),
    ("symmetric", Babai, {}, GridSpec(bits=4, group_size=-1)),
    ("jta", Klein, {"k": 4}, GridSpec(bits=3, group_size=8)),
    ("jta", Klein, {"k": 4}, GridSpec(bits=3, group_size=16, act_order=True, static_groups=True)),
    ("regularized", Successive, {}, GridSpec(bits=3, group_size=16)),
    ("jta", Beam, {"width": 3}, GridSpec(bits=2, group_size=8)),
    ("symmetric", Klein, {"k": 3}, GridSpec(bits=4, group_size=16, grid="nvfp4")),
]


@pytest.mark.parametrize("name,decoder,params,grid", CASES)
def test_a_layer_through_several_column_blocks_gets_the_whole_layers_codes_in_float64(name, decoder, params, grid):
    W, st = layer()
    spec = preset(name, *PRESETS[name])
    whole = quantize_layer(W, st, spec, grid, decoder(**params), seed=4, dtype=torch.float64, plan=budget.WHOLE)
    blocked = quantize_layer(W, st, spec, grid, decoder(**params), seed=4, dtype=torch.float64, plan=BLOCKED)
    assert blocked.report["blocked"] == {"block": 16, "rows": 7} and "blocked" not in whole.report
    assert blocked.codes.dtype == torch.uint8 and whole.codes.dtype == torch.int64
    assert torch.equal(blocked.codes.long(), whole.codes)
    for key in ("scales", "zeros", "qweight", "g_idx", "perm"):
        torch.testing.assert_close(getattr(blocked, key), getattr(whole, key), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(blocked.row_loss, whole.row_loss, rtol=1e-9, atol=1e-12)
    assert blocked.report["path_objective"] == pytest.approx(whole.report["path_objective"], rel=1e-9)


@pytest.mark.parametrize("name,decoder,params,grid", CASES[:4])
def test_in_float32_the_blocked_layer_stays_within_the_float32_tolerance(name, decoder, params, grid):
    W, st = layer(m=64, n=96, N=800, seed=3, dtype=torch.float32)
    spec = preset(name, *PRESETS[name])
    a = quantize_layer(W, st, spec, grid, decoder(**params), seed=1, plan=budget.WHOLE)
    b = quantize_layer(W, st, spec, grid, decoder(**params), seed=1, plan=BLOCKED)
    bound = 1e-3 if decoder is Babai else 0.05                   # the GPU float32 tests' bounds
    assert (a.codes != b.codes.long()).float().mean().item() <= bound
    assert b.loss == pytest.approx(a.loss, rel=5e-3)


def test_the_plan_is_the_whole_form_without_a_budget_and_blocked_beyond_it(monkeypatch):
    monkeypatch.delenv(budget.ENV, raising=False)
    assert budget.plan(16384, 53248, "cpu") == budget.WHOLE            # no budget on the host
    monkeypatch.setenv(budget.ENV, str(80 << 30))
    assert budget.plan(4096, 14336, "cpu") == budget.WHOLE             # an 8B down_proj fits
    p = budget.plan(16384, 53248, "cpu")                              # a 405B down_proj does not
    assert p.blocked and p.block == budget.COLUMN_BLOCK and 8192 <= p.rows <= 16384
    assert budget.blocked_bytes(16384, 53248, p.rows) <= 80 << 30 < budget.whole_bytes(16384, 53248)
    monkeypatch.setenv(budget.ENV, str(60 << 30))
    p = budget.plan(16384, 53248, "cpu")
    assert p.blocked and 64 <= p.rows < 16384
    assert budget.blocked_bytes(16384, 53248, p.rows) <= 60 << 30 < budget.blocked_bytes(16384, 53248, p.rows + 1)
    stats = 3 * 53248 ** 2 * 4                                        # H, C, G on the device beside it
    monkeypatch.setenv(budget.ENV, str(70 << 30))
    p, q = budget.plan(16384, 53248, "cpu"), budget.plan(16384, 53248, "cpu", statistics=stats)
    assert q.blocked and 64 < q.rows < p.rows
    need = lambda rows: budget.blocked_bytes(16384, 53248, rows) + stats   # noqa: E731
    assert need(q.rows) <= 70 << 30 < need(q.rows + 1)
    monkeypatch.setenv(budget.ENV, "lots")
    with pytest.raises(InputError, match="number of bytes"):
        budget.available("cpu")


def test_the_budget_sends_a_layer_through_the_blocked_form(monkeypatch):
    W, st = layer(m=8, n=40, dead=(5,), dtype=torch.float32)
    spec = preset("symmetric", *PRESETS["symmetric"])
    whole = quantize_layer(W, st, spec, GridSpec(bits=4, group_size=8), Babai())
    monkeypatch.setenv(budget.ENV, str(budget.whole_bytes(8, 40) - 1))
    blocked = quantize_layer(W, st, spec, GridSpec(bits=4, group_size=8), Babai())
    assert blocked.report["blocked"]["block"] == 40 and "blocked" not in whole.report
    assert (blocked.codes.long() != whole.codes).float().mean() <= 1e-3


def test_a_layer_that_cannot_fit_is_refused_with_its_shape_and_the_memory_it_needs(monkeypatch):
    shapes = {"model.layers.0.self_attn.q_proj": (16384, 16384), "model.layers.0.mlp.down_proj": (16384, 53248)}
    monkeypatch.setenv(budget.ENV, str(30 << 30))
    budget.check_fits(shapes, statistics=1, device="cpu")               # decoding: U and the weight's buffers
    budget.check_fits(shapes, statistics=2, device="cpu")               # accumulating H and G: 22 GiB
    with pytest.raises(InputError) as e:
        budget.check_fits(shapes, statistics=3, device="cpu")           # accumulating H, C, G: 32 GiB
    msg = str(e.value)
    need = budget.least_bytes(16384, 53248, 3) / budget.GIB
    assert need == pytest.approx((3 * 53248 + 4096) * 53248 * 4 / budget.GIB)   # three sums, columns being added
    assert budget.least_bytes(16384, 53248, 1) == budget.blocked_bytes(16384, 53248, 64)
    assert f"mlp.down_proj (16384 × 53248) needs at least {need:.1f} GiB" in msg and "symmetric" in msg
    with pytest.raises(InputError):                                     # float64 sums need twice the bytes
        budget.check_fits(shapes, statistics=2, device="cpu", stats_itemsize=8)
    monkeypatch.delenv(budget.ENV)
    budget.check_fits(shapes, statistics=3, device="cpu")               # no check on the host


def test_a_run_refuses_a_layer_that_cannot_fit_before_it_calibrates(monkeypatch):
    from ojbkq_core.calibrate import calibrate
    from ojbkq_core.model import find_adapter
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    adapter = find_adapter(LlamaForCausalLM(cfg))
    captured = []
    monkeypatch.setattr("ojbkq_core.calibrate.capture", lambda *a, **k: captured.append(1))
    monkeypatch.setenv(budget.ENV, str(budget.least_bytes(32, 96, 1) - 1))   # down_proj (32 × 96) no longer fits
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.down_proj \(32 × 96\) needs at least"):
        calibrate(adapter, torch.randint(0, 64, (2, 8)), preset("symmetric", *PRESETS["symmetric"]),
                  GridSpec(bits=4, group_size=32), Babai())
    assert captured == []                                                   # refused before the first block's inputs


def test_on_a_gpu_the_form_follows_its_total_memory_not_what_is_free(monkeypatch):
    """The plan, the statistics' chunks and the stacks follow the GPU's total memory, so a run (and a resumed
    one) takes the same decisions on the same GPU whatever else holds memory; row chunks follow what is free."""
    from types import SimpleNamespace
    monkeypatch.delenv(budget.ENV, raising=False)
    free = [60 << 30]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 << 30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[0], 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 0)
    decisions = []
    for f in (70 << 30, 5 << 30):
        free[0] = f
        decisions.append((budget.plan(16384, 53248, "cuda"), budget.plan(8192, 28672, "cuda"),
                          budget.statistics_limit("cuda"), budget.budget("cuda")))
    assert decisions[0] == decisions[1]
    assert decisions[0][0].blocked and decisions[0][1] == budget.WHOLE and decisions[0][3] == 40 << 30
    assert budget.available("cuda") == int((5 << 30) * budget.SHARE)


def test_the_symmetric_loss_of_a_wide_layer_reads_h_by_columns():
    """The report's `sym_loss` of a layer wider than a column block: the same number as the whole `H` gives,
    without a float64 copy of it."""
    from ojbkq_core.calibrate import _sym_loss
    n = budget.COLUMN_BLOCK + 300
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, n, generator=g)
    st = Statistics.from_inputs(X)
    W, Q = torch.randn(3, n, generator=g), torch.randn(3, n, generator=g)
    E = (W - Q).double()
    assert _sym_loss(W, Q, st) == pytest.approx(float(((E @ st.H.double()) * E).sum()), rel=1e-12)


def _gpu(monkeypatch, total):
    from types import SimpleNamespace
    monkeypatch.delenv(budget.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=total))


def test_the_statistics_of_a_layer_that_needs_the_gpus_memory_are_decoded_from_the_host(monkeypatch):
    """On an 80 GB GPU (a 40 GiB budget) a 405B down_proj's sums, one (11 GiB) or three (32 GiB), leave no room
    for 1024 rows of its blocked form (31 GiB), so they go to the host; an 8192-row layer as wide keeps GPTQ's
    one sum but not OJBKQ's three; on a 141 GB GPU all stay; the whole-matrix form always keeps them."""
    one, three = 53248 ** 2 * 4, 3 * 53248 ** 2 * 4
    _gpu(monkeypatch, 80 << 30)
    assert not budget.keeps_statistics(16384, 53248, "cuda", three)
    assert not budget.keeps_statistics(16384, 53248, "cuda", one)
    assert budget.keeps_statistics(8192, 53248, "cuda", one)
    assert not budget.keeps_statistics(8192, 53248, "cuda", three)
    assert not budget.keeps_statistics(8192, 53248, "cuda", one, full_height=12)  # a static grid's, a scorer's
    assert budget.keeps_statistics(4096, 14336, "cuda", 3 * 14336 ** 2 * 4)     # an 8B down_proj: whole
    assert budget.keeps_statistics(16384, 53248, "cuda", 0)                     # already on the host
    _gpu(monkeypatch, 141 << 30)
    assert budget.keeps_statistics(16384, 53248, "cuda", three)
    assert budget.keeps_statistics(16384, 53248, "cpu", three)                  # no budget on the host


def test_statistics_on_the_host_count_for_nothing_on_the_gpu():
    W, st = layer(dtype=torch.float32)
    assert st.bytes_on("cpu") == 3 * 72 * 72 * 4 and st.bytes_on("cuda") == 0 and st.bytes_on("cuda:1") == 0
    st.move("cpu")
    assert st.bytes_on("cpu") == 3 * 72 * 72 * 4 and st.device == torch.device("cpu")


def test_the_blocked_form_keeps_no_natural_copy_and_writes_the_targets_over_one_tensor():
    """The blocked form holds the weight in decoding order only (`W` None), and its targets are the whole
    form's (`T = W + (W (M − H) Uᵀ) U`, decoding order), built a chunk of rows at a time."""
    W, st = layer()
    spec = preset("jta", *PRESETS["jta"])
    grid = GridSpec(bits=3, group_size=16, act_order=True)
    whole = prepare_layer(W, st, spec, grid, Babai(), seed=2, dtype=torch.float64, plan=budget.WHOLE)
    blocked = prepare_layer(W, st, spec, grid, Babai(), seed=2, dtype=torch.float64, plan=BLOCKED)
    assert blocked.W is None and whole.W is not None
    assert torch.equal(blocked.Wp, whole.Wp)
    torch.testing.assert_close(blocked.problem.T, whole.problem.T, rtol=1e-10, atol=1e-10)


def test_a_run_moves_the_statistics_of_a_layer_whose_decoding_needs_the_memory(monkeypatch):
    """The engine asks `keeps_statistics` before each layer, with the full-height tensors its grid and decoder
    hold, and moves the sums of one that does not fit beside them to the host (here the host is the device:
    the plumbing, not the transfer, which tests a GPU below)."""
    from ojbkq_core.calibrate import calibrate
    from ojbkq_core.model import find_adapter
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    spec = preset("jta", *PRESETS["jta"])
    real = Statistics.move

    def run(keep):
        torch.manual_seed(0)
        adapter = find_adapter(LlamaForCausalLM(cfg))
        moved, asked = [], []

        def move(self, device):
            moved.append((self.n, str(device)))
            real(self, device)
        monkeypatch.setattr(budget, "keeps_statistics", lambda m, n, device, b, tall: asked.append(tall) or keep(m, n))
        monkeypatch.setattr(Statistics, "move", move)
        res = calibrate(adapter, ids, spec, GridSpec(bits=4, group_size=32), Babai())
        return res, moved, asked
    kept, none, _ = run(lambda m, n: True)
    hosted, moved, asked = run(lambda m, n: n != 96)            # down_proj's sums go to the host
    assert none == [] and moved == [(96, "cpu")]
    assert set(asked) == {budget.FULL_HEIGHT}                  # a dynamic grid, babai
    for name, r in kept.layers.items():
        assert torch.equal(r.codes, hosted.layers[name].codes), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_blocked_layer_decoded_from_host_statistics_gets_the_same_codes():
    W, st = layer(dtype=torch.float32)
    spec = preset("jta", *PRESETS["jta"])
    grid = GridSpec(bits=3, group_size=16, act_order=True)
    st.move("cuda")
    on_gpu = quantize_layer(W.cuda(), st, spec, grid, Klein(k=4), seed=1, plan=BLOCKED)
    st.move("cpu")
    from_host = quantize_layer(W.cuda(), st, spec, grid, Klein(k=4), seed=1, plan=BLOCKED)
    assert torch.equal(on_gpu.codes, from_host.codes)
    torch.testing.assert_close(on_gpu.row_loss, from_host.row_loss, rtol=1e-12, atol=0)


def test_the_budgets_are_shares_of_what_the_open_block_leaves(monkeypatch):
    """While a run holds memory for its open block (weights, their full-precision copy, the streams), the layer
    budget and the statistics' limit are shares of the rest; the same bytes held give the same decisions."""
    _gpu(monkeypatch, 80 << 30)
    assert budget.budget("cuda") == 40 << 30 and budget.statistics_limit("cuda") == 20 << 30
    with budget.holding("cuda:0", 30 << 30):
        assert budget.room("cuda") == 50 << 30
        assert budget.budget("cuda") == 25 << 30 and budget.statistics_limit("cuda") == int((50 << 30) * 0.25)
        assert budget.plan(32768, 16384, "cuda").blocked                       # 30 GiB whole: no longer fits
    assert budget.budget("cuda") == 40 << 30 and budget.plan(32768, 16384, "cuda") == budget.WHOLE
    with pytest.raises(RuntimeError), budget.holding("cuda", 30 << 30):
        raise RuntimeError("a failed block")
    assert budget.room("cuda") == 80 << 30                                     # released on failure too
    with budget.holding("cuda", 12 << 30):          # a 405B-shaped block and its full-precision copy
        p = budget.plan(16384, 53248, "cuda")       # down_proj, its sums on the host: thousands of rows a chunk
        assert p.blocked and 1024 < p.rows < 16384
        assert budget.blocked_bytes(16384, 53248, p.rows) <= budget.budget("cuda") == 34 << 30
        q = budget.plan(16384, 53248, "cuda", full_height=5)                  # one more (m, n): fewer rows
        assert q.blocked and 64 < q.rows < p.rows and budget.blocked_bytes(16384, 53248, q.rows, full_height=5) <= 34 << 30
    monkeypatch.setenv(budget.ENV, str(10 << 30))
    with budget.holding("cuda", 30 << 30):
        assert budget.budget("cuda") == 10 << 30                               # a forced budget is the budget


def test_a_run_holds_its_blocks_weights_and_their_copy(monkeypatch):
    from contextlib import contextmanager
    from ojbkq_core.calibrate import calibrate
    from ojbkq_core.model import find_adapter
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    adapter = find_adapter(LlamaForCausalLM(cfg))
    block_bytes = [sum(t.numel() * t.element_size() for t in (*b.parameters(), *b.buffers())) for b in adapter.blocks()]
    held, seen = [], []
    real = budget.holding

    @contextmanager
    def recording(device, nbytes):
        held.append(nbytes)
        with real(device, nbytes):
            seen.append(budget._held[budget._key(device)])
            yield
    monkeypatch.setattr(budget, "holding", recording)
    calibrate(adapter, torch.randint(0, 64, (3, 8)), preset("jta", *PRESETS["jta"]), GridSpec(bits=4, group_size=32),
              Babai())
    assert held == seen == [2 * b for b in block_bytes]                   # not the streams: the same on every rank
    assert budget._held[budget._key("cpu")] == 0


def test_a_layer_is_refused_when_its_blocks_weights_leave_it_no_room(monkeypatch):
    """On a GPU the refusal counts, beside the layer's least working set, its block's weights and their
    full-precision copy, which the run holds while the block is open; a forced budget is the layer's alone."""
    shapes = {"model.layers.3.mlp.down_proj": (4096, 14336)}
    _gpu(monkeypatch, 16 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "a 16 GiB GPU")
    need = budget.least_bytes(4096, 14336, 3)
    budget.check_fits(shapes, 3, "cuda", held={"model.layers.3.mlp.down_proj": (16 << 30) - need})
    with pytest.raises(InputError) as e:
        budget.check_fits(shapes, 3, "cuda", held={"model.layers.3.mlp.down_proj": (16 << 30) - need + 1})
    assert "down_proj (4096 × 14336) needs at least 16.0 GiB" in str(e.value)
    assert f"beside its block's weights ({((16 << 30) - need) / budget.GIB:.1f} GiB" in str(e.value)
    assert "a 16 GiB GPU's 16.0 GiB" in str(e.value)
    monkeypatch.setenv(budget.ENV, str(need))
    budget.check_fits(shapes, 3, "cuda", held={"model.layers.3.mlp.down_proj": 1 << 40})


def test_the_bytes_a_run_holds_are_each_layers_blocks_times_its_copies():
    from ojbkq_core.calibrate import held_by_layer, quantized_names
    from ojbkq_core.model import find_adapter
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    adapter = find_adapter(LlamaForCausalLM(cfg))
    adapter.blocks()[1].half()
    names = quantized_names(adapter)
    size = [sum(t.numel() * t.element_size() for t in (*b.parameters(), *b.buffers())) for b in adapter.blocks()]
    held = held_by_layer(adapter, names, 2)
    assert held["model.layers.0.mlp.down_proj"] == 2 * size[0] and held["model.layers.1.self_attn.q_proj"] == 2 * size[1]
    assert size[1] < size[0] and len(held) == len(names) == 14

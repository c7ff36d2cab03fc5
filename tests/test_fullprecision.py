"""The full-precision stream kept across runs (`ojbkq_core.fullprecision`): a later run that takes the kept
passes and `G` sums gives the same codes, weights and objective as one that computes them, runs fewer
linear layers, and refuses another calibration; what is not taken (another device, experts, no budget)."""
import copy

import pytest
import torch
from torch import nn

import ojbkq_core.stats as stats_module
from ojbkq_core.calibrate import calibrate
from ojbkq_core.decoders import Babai, Klein
from ojbkq_core.errors import InputError
from ojbkq_core.fullprecision import FullPrecisionCache
from ojbkq_core.grid import GridSpec
from ojbkq_core.model import find_adapter
from ojbkq_core.registry import get_registry
from ojbkq_core.stats import Statistics
from tiny_models import one_thread, tiny_llama, tiny_moe, token_ids  # noqa: F401 (autouse fixture)

GRID = GridSpec(bits=3, group_size=32)


def counting(monkeypatch):
    """Count the linear layers that compute and the `G`-shaped Gram products (`X̃ᵀ X̃`)."""
    calls = {"linear": 0, "gram_fp": 0}
    real_linear, real_gram = nn.Linear.forward, stats_module.gram

    def linear(self, x):
        calls["linear"] += 1
        return real_linear(self, x)

    def gram(A, B, dtype=torch.float32):
        calls["gram_fp"] += B is A
        return real_gram(A, B, dtype)

    monkeypatch.setattr(nn.Linear, "forward", linear)
    monkeypatch.setattr(stats_module, "gram", gram)
    return calls


def run(model, objective, decoder, ids, cache=None, **kw):
    obj = get_registry().objective(*objective)
    return calibrate(find_adapter(model), ids, obj, GRID, decoder, progress=False, batch_size=2, fp_cache=cache, **kw)


@pytest.mark.parametrize("later", [("regularized", {"alpha": 0.5}), ("jta", {"mu": 0.6, "lam": 1.0})])
def test_a_later_run_takes_the_kept_stream_and_gives_the_same_result(later, monkeypatch):
    model, ids = tiny_llama(layers=3), token_ids(6, 32)
    cache = FullPrecisionCache()
    first = run(copy.deepcopy(model), ("jta", {"mu": 0.6, "lam": 0.6}), Babai(), ids, cache)
    assert first.report["full_precision_cache"]["blocks_kept"] == 3
    assert first.report["full_precision_cache"]["blocks_taken"] == 0

    calls = counting(monkeypatch)
    cached_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    cached = run(cached_model, later, Klein(k=4), ids, cache)
    taken = dict(calls)
    calls.update(linear=0, gram_fp=0)
    plain = run(plain_model, later, Klein(k=4), ids)
    assert cached.report["full_precision_cache"]["blocks_taken"] == 3
    assert "full_precision_cache" not in plain.report
    assert cached.report["objective_sum"] == plain.report["objective_sum"]
    assert cached.report["sym_loss_sum"] == plain.report["sym_loss_sum"]
    for n in plain.layers:
        assert torch.equal(cached.layers[n].codes, plain.layers[n].codes), n
    for p, q in zip(cached_model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
    # the full-precision blocks (7 linear layers each, 3 batches) did not run; H and G are the symmetric
    # Gram products: G was not computed again, H was
    assert calls["linear"] - taken["linear"] == 3 * 7 * 3
    assert taken["gram_fp"] < calls["gram_fp"]
    again = run(copy.deepcopy(model), later, Klein(k=4), ids, cache)     # a report counts its own run's blocks
    assert again.report["full_precision_cache"]["blocks_taken"] == 3 and cache.describe()["blocks_taken"] == 6
    assert again.report["objective_sum"] == plain.report["objective_sum"]


def test_runs_that_need_no_full_precision_stream_leave_the_cache_alone():
    model, ids = tiny_llama(), token_ids(4, 32)
    cache = FullPrecisionCache()
    res = run(model, ("symmetric",), Babai(), ids, cache)
    assert "full_precision_cache" not in res.report
    assert cache.describe() == {"blocks_kept": 0, "sums_kept": 0, "bytes": 0, "blocks_taken": 0}


def test_another_calibration_is_refused_where_it_enters():
    model = tiny_llama()
    cache = FullPrecisionCache()
    run(copy.deepcopy(model), ("jta",), Babai(), token_ids(4, 32), cache)
    with pytest.raises(InputError, match="give each model and calibration its own cache"):
        run(copy.deepcopy(model), ("jta",), Babai(), token_ids(4, 32, seed=1), cache)
    with pytest.raises(InputError, match="differs"):
        run(copy.deepcopy(model), ("jta",), Babai(), token_ids(4, 16), cache)


def test_a_model_with_other_weights_is_refused_where_it_enters():
    """Two models of one class, shapes and calibration but other weights: the second is refused at its
    first block, before it takes a pass made from the first model's weights."""
    ids = token_ids(4, 32)
    cache = FullPrecisionCache()
    run(tiny_llama(seed=0), ("jta",), Babai(), ids, cache)
    with pytest.raises(InputError, match="block 0's weights differ from those its passes were kept for"):
        run(tiny_llama(seed=1), ("jta",), Babai(), ids, cache)
    assert cache.taken == 0


def test_without_budget_nothing_is_kept_and_the_run_is_unchanged():
    model, ids = tiny_llama(), token_ids(4, 32)
    cache = FullPrecisionCache(budget=0)
    a = run(copy.deepcopy(model), ("jta",), Babai(), ids, cache)
    b = run(copy.deepcopy(model), ("jta",), Babai(), ids, cache)
    assert b.report["full_precision_cache"] == {"blocks_kept": 0, "sums_kept": 0, "bytes": 0, "blocks_taken": 0}
    assert a.report["objective_sum"] == b.report["objective_sum"]


def test_the_default_budget_is_a_quarter_of_the_available_memory_where_that_is_less(monkeypatch):
    import ojbkq_core.fullprecision as fp
    assert fp.available_memory() >= 0
    monkeypatch.setattr(fp, "available_memory", lambda: 1 << 30)
    assert FullPrecisionCache().budget == 1 << 28
    monkeypatch.setattr(fp, "available_memory", lambda: 64 << 30)
    assert FullPrecisionCache().budget == fp.FULL_PRECISION_CACHE_BYTES
    monkeypatch.setattr(fp, "available_memory", lambda: 0)       # the system does not say
    assert FullPrecisionCache().budget == fp.FULL_PRECISION_CACHE_BYTES


def test_models_with_experts_compute_their_stream_in_every_run():
    """An expert's G sums the tokens both streams' routers send to it: it depends on the recipe."""
    model, ids = tiny_moe(), token_ids(4, 32)
    cache = FullPrecisionCache()
    assert not cache.accepts(find_adapter(model), torch.device("cpu"))
    assert not cache.accepts(find_adapter(tiny_llama()), torch.device("cuda"))
    res = run(model, ("jta",), Babai(), ids, cache)
    assert "full_precision_cache" not in res.report and cache.bytes == 0


def test_statistics_take_a_given_sum_as_it_is_and_refuse_one_that_does_not_fit():
    g = torch.Generator().manual_seed(0)
    X, X_fp = torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    full = Statistics(8, needs=("H", "C", "G"))
    for x, x_fp in zip(X, X_fp):
        full.add(x, x_fp)
    part = Statistics(8, needs=("H", "C", "G"), given={"G": full.sums["G"]})
    for x, x_fp in zip(X, X_fp):
        part.add(x, x_fp)
    for key in ("H", "C", "G"):
        assert torch.equal(getattr(part, key), getattr(full, key))
    assert part.sums["G"] is full.sums["G"]
    with pytest.raises(InputError, match=r"given sum G is \(4, 4\)"):
        Statistics(8, needs=("G",), given={"G": torch.zeros(4, 4)})

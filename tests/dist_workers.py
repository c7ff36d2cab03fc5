"""Programs that tests/test_distributed.py starts on several processes with torchrun.

    torchrun --standalone --nproc-per-node 2 tests/dist_workers.py reduce OUT.pt
    torchrun --standalone --nproc-per-node 2 tests/dist_workers.py moe OUT.pt
    torchrun --standalone --nproc-per-node 2 tests/dist_workers.py fail STEP RANK quantize CONFIG --set ...

`moe`: the statistics step over two ranks for a block of routed experts, some of which get no token
on a rank. `reduce`: every rank accumulates float64 statistics of its share of fixed random inputs (in batches of
7 tokens) and sums them over the ranks; rank 0 saves H, C, G and the count. `fail`: `ojbkq quantize`
in which rank RANK raises during STEP (`statistics`: while adding inputs; `quantize`: while decoding).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENS, N = 203, 48


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs `X`, `X̃` `(TOKENS, N)` float32 every rank and the single-process reference use."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(TOKENS, N, generator=g) * torch.logspace(-2, 2, N)
    return X, X + 0.1 * torch.randn(TOKENS, N, generator=g)


def reduce(out: str) -> None:
    import torch.distributed as dist

    from ojbkq_core import distributed
    from ojbkq_core.stats import Statistics
    world = distributed.init("cpu")
    X, Xf = inputs()
    lo, hi = (TOKENS * r // world.size for r in (world.rank, world.rank + 1))
    st = Statistics(N, needs=("H", "C", "G"), dtype=torch.float64)
    for i in range(lo, hi, 7):
        st.add(X[i:min(i + 7, hi)], Xf[i:min(i + 7, hi)])
    distributed.reduce_statistics(st, world)
    if world.main:
        torch.save({"H": st.H, "C": st.C, "G": st.G, "count": st.count, "size": world.size}, out)
    dist.barrier()
    distributed.close()


class Routed(torch.nn.Module):
    """Expert 0 takes the tokens whose first feature is positive, expert 1 the others, expert 2 none."""

    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(N, N, bias=False) for _ in range(3))

    def forward(self, hidden):
        out = hidden.clone()
        for e, sel in enumerate((hidden[..., 0] > 0, hidden[..., 0] <= 0)):
            if sel.any():
                out[sel] = self.experts[e](hidden[sel])
        return out


def routed_inputs(rank: int) -> list:
    """Rank 0: every token of `inputs()`; rank 1: only those routed to expert 0, in batches of 1×7×N."""
    X = inputs()[0]
    X = X if rank == 0 else X[X[:, 0] > 0]
    return [X[i:i + 7][None] for i in range(0, X.shape[0], 7)]


def moe(out: str) -> None:
    """The `statistics` step summed over the ranks for `Routed`, whose experts 1 and 2 get no token on
    rank 1 (and expert 2 none anywhere); rank 0 saves each expert's `H` sum and count."""
    import torch.distributed as dist

    from ojbkq_core import distributed
    from ojbkq_core.calibrate import BlockInputs, Streams, shared, statistics
    world = distributed.init("cpu")
    X = routed_inputs(world.rank)
    streams = Streams([BlockInputs(x, (), {}) for x in X], X, None)
    needs = {f"experts.{e}": {"H"} for e in range(3)}
    st = statistics(Routed(), None, needs, streams, "cpu", dtype=torch.float64)
    for s in shared(st):
        distributed.reduce_statistics(s, world)
    if world.main:
        torch.save({n: (s.sums["H"], s.count) for n, s in st.items()}, out)
    dist.barrier()
    distributed.close()


def fail(step: str, rank: str, argv: list) -> int:
    from ojbkq_core import calibrate, cli, stats
    if os.environ["RANK"] == rank:
        def boom(*args, **kwargs):
            raise RuntimeError(f"injected failure in {step} on rank {rank}")
        if step == "statistics":
            stats.Statistics.add = boom
        else:
            calibrate.quantize_layer = boom
    return cli.main(argv)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record
    if sys.argv[1] == "reduce":
        record(reduce)(sys.argv[2])
    elif sys.argv[1] == "moe":
        record(moe)(sys.argv[2])
    else:
        sys.exit(record(fail)(sys.argv[2], sys.argv[3], sys.argv[4:]))

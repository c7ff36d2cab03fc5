"""Programs that tests/test_distributed.py starts on several processes with torchrun.

    torchrun --standalone --nproc-per-node 2 tests/dist_workers.py reduce OUT.pt
    torchrun --standalone --nproc-per-node 2 tests/dist_workers.py fail STEP RANK quantize CONFIG --set ...

`reduce`: every rank accumulates float64 statistics of its share of fixed random inputs (in batches of
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
    else:
        sys.exit(record(fail)(sys.argv[2], sys.argv[3], sys.argv[4:]))

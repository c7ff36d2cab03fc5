"""One calibration over several processes with torch.distributed: gloo on the CPU, NCCL on CUDA GPUs.

    torchrun --nproc-per-node N -m ojbkq_core.cli quantize CONFIG [--set ...]
    ojbkq quantize CONFIG --nproc N              # the same, started through torch.distributed.run

Every rank loads the model and the calibration ids; the engine then splits the work of each block:

1. statistics, data parallel: rank r runs the block on its contiguous `shard` of the calibration
   samples (both streams) and accumulates its partial sums `Σ xᵀ x` in float64; `reduce_statistics`
   sums them over the ranks, so every rank holds the statistics of all samples, divided by the total
   token count exactly as in one process;
2. decoding, module parallel: `plan` hands each rank whole modules of a group, and cuts a module that
   costs more than a rank's share into row slices; `Engine.decode_group` decodes this rank's pieces
   (a row slice with its global row index, so seeded decoders draw the numbers they draw in one
   process), broadcasts the dequantized rows from their rank so that every copy of the block is updated
   before propagation, and gathers the rest of each piece (codes, scales, report) on rank 0;
3. rank 0 writes the checkpoint and the report; the other ranks write nothing.

Codes. Products of float32 inputs are exact in float64, and float64 sums over another partition of
the samples differ only by rounding (relative ~1e-16); the decoders work in float32, so the statistics
they see are the single-process float64 ones rounded to float32, which are equal unless an entry lies
within that rounding of a float32 rounding boundary. Row slices decode the rows they would decode in the
whole layer. A run with any number of ranks therefore gives the codes of one process with
`calibration.stats_dtype: float64` (tested with gloo, 2 ranks, babai and klein); block forwards must also give
each sample the same outputs whatever its batch neighbours, true of the CPU kernels.

Failures. A rank that raises exits non-zero and torchrun stops the others (max_restarts 0); gloo peers
blocked in a collective also see the closed connection. Rank 0 writes only after the last collective,
into a temporary folder renamed into place, so a failed run leaves no output folder.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from .calibrate import Events, Group, quantize, shared
from .errors import InputError
from .layer import LayerResult
from .stats import Statistics

# a rank waits this long in a collective (rank 0 may evaluate perplexity while the others wait);
# a crashed rank ends the run at once through torchrun, the timeout only ends a hung one
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place in the run: `rank` of `size`, decoding on `device`."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or another launcher of the torch.distributed environment) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's rank in the torchrun environment (0 when none)."""
    return int(os.environ.get("RANK", 0))


def init(device: str) -> World:
    """Join the process group described by the torchrun environment. `device` `cpu` uses gloo; `cuda`
    uses NCCL, each rank on GPU `LOCAL_RANK`."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    # torchrun stops the other ranks with SIGTERM: unwind, so that a folder being written is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return World(rank, size, dev)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m ojbkq_core.cli ARGV` on `nproc` local processes through torch.distributed.run
    (torchrun --standalone). Returns 0, or 1 after one line naming the first rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    if not isinstance(nproc, int) or nproc < 1:
        raise InputError(f"--nproc {nproc!r}: give the number of processes, an integer ≥ 1")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", "ojbkq_core.cli", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if os.path.isfile(failure.error_file) or failure.exitcode < 0:    # a recorded exception, a signal
            why = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
            why = " ".join(str(why).split())[:300]
        else:
            why = "bad input, see its message above" if failure.exitcode == 2 else "see its output above"
        print(f"ojbkq: rank {rank} of {nproc} failed (exit code {failure.exitcode}): {why}; "
              f"all ranks were stopped and nothing was written", file=sys.stderr)
        return 1
    return 0


# --- statistics: data parallel -------------------------------------------------------------------

def shard(samples: int, batch_size: int, world: World) -> slice:
    """This rank's contiguous slice of the calibration samples. With at least `world.size` batches the
    slices are runs of whole batches, so every batch is the one a single process runs; otherwise about
    `samples / size` samples each. Every rank gets at least one sample."""
    if samples < world.size:
        raise InputError(f"calibration.samples={samples}: fewer samples than the {world.size} processes; "
                         f"give at least {world.size} samples or fewer processes")
    batches = -(-samples // batch_size)
    unit, units = (batch_size, batches) if batches >= world.size else (1, samples)
    lo, hi = (units * r // world.size * unit for r in (world.rank, world.rank + 1))
    return slice(min(lo, samples), min(hi, samples))


def reduce_statistics(stats: Statistics, world: World) -> None:
    """Sum `stats` over the ranks in place: each rank then holds the statistics of every rank's tokens.
    Accumulate in float64 (`Statistics(..., dtype=torch.float64)`) for a result independent of the split."""
    for key in sorted(stats.needs):                  # the same order on every rank
        dist.all_reduce(stats.sums[key])
    count = torch.tensor([stats.count], dtype=torch.int64, device=stats.sums[min(stats.needs)].device)
    dist.all_reduce(count)
    stats.count = int(count.item())


# --- decoding: module parallel -------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Rows `[r0, r1)` of module `name`, decoded on `rank`."""

    name: str
    r0: int
    r1: int
    rank: int


def plan(shapes: Sequence[tuple[str, int, int]], size: int) -> list[Piece]:
    """The decoding work of one group of modules `(name, m, n)` over `size` ranks.

    A module costs `m n²` (each row walks the `n` columns of an `n × n` triangle). One that costs more
    than the mean load `total / size` is cut into `⌈cost / mean⌉` row slices of near-equal height; the
    pieces go, the most costly first, to the least loaded rank (ties: the lower rank, the earlier piece).
    A pure function of its arguments, so every rank computes the same plan. Pieces in module order.
    """
    total = sum(m * n * n for _, m, n in shapes)
    cut = []                                          # (name, r0, r1, cost)
    for name, m, n in shapes:
        k = max(1, min(m, -(-m * n * n * size // max(total, 1))))
        bounds = [m * i // k for i in range(k + 1)]
        cut += [(name, bounds[i], bounds[i + 1], (bounds[i + 1] - bounds[i]) * n * n) for i in range(k)]
    load = [0] * size
    rank_of = {}
    for i in sorted(range(len(cut)), key=lambda i: (-cut[i][3], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        load[r] += cut[i][3]
        rank_of[i] = r
    return [Piece(name, r0, r1, rank_of[i]) for i, (name, r0, r1, _) in enumerate(cut)]


class Engine(Events):
    """The engine's events for one rank: `statistics_ready` sums the group's statistics over the ranks,
    `decode_group` decodes this rank's share of the group (`plan`) and gives every rank every module's
    weight. Times its decoding and its collectives in `seconds`."""

    def __init__(self, world: World):
        self.world = world
        self.seconds = {"decode": 0.0, "communicate": 0.0}

    def shard(self, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's calibration samples: rows `shard(...)` of `input_ids` `(S, L)`."""
        return input_ids[shard(input_ids.shape[0], batch_size, self.world)]

    def annotate(self, report: dict, samples: int) -> None:
        """Complete this rank's `calibrate` report as the run's (on rank 0): `samples` of all ranks,
        `world_size`, and `ranks`: per rank its `samples` and `seconds` (the engine's steps, `decode`
        its own decoding, `communicate` its collectives, waits for other ranks included)."""
        mine = {"rank": self.world.rank, "samples": report["samples"],
                "seconds": {**{k: v for k, v in report["seconds"].items() if k != "quantize"}, **self.seconds}}
        ranks = [None] * self.world.size if self.world.main else None
        dist.gather_object(mine, ranks, dst=0)
        report.update(samples=samples, world_size=self.world.size, ranks=ranks)

    def statistics_ready(self, group: Group) -> dict[str, Statistics]:
        """Each distinct `Statistics` of the group summed over the ranks, in the same order on every rank."""
        t0 = time.perf_counter()
        for st in shared(group.stats):
            reduce_statistics(st, self.world)
        self.seconds["communicate"] += time.perf_counter() - t0
        return group.stats

    def decode_group(self, group: Group) -> dict[str, LayerResult]:
        """The group's modules decoded over the ranks as `plan` says (`calibrate.quantize` with the rows
        of each piece), the dequantized rows broadcast from the rank that decoded them. Rank 0 returns
        the merged `LayerResult` of every module (weights on the device, the rest on the CPU); the other
        ranks return `LayerResult.weight_only` results (rank 0 keeps the codes)."""
        world, adapter, block, stats, device = self.world, group.adapter, group.block, group.stats, group.device
        tasks = group.tasks
        module = {t.name: block.get_submodule(t.name) for t in tasks}
        task = {t.name: t for t in tasks}
        shapes = [(t.name, *adapter.weight(module[t.name]).shape) for t in tasks]
        pieces = plan(shapes, world.size)
        t0 = time.perf_counter()
        mine = {i: quantize(adapter, module[p.name], stats[p.name], task[p.name], group.settings, device,
                            rows=(p.r0, p.r1))
                for i, p in enumerate(pieces) if p.rank == world.rank}
        t1 = time.perf_counter()
        Q = {name: torch.empty(m, n, dtype=torch.float32, device=device) for name, m, n in shapes}
        for i, p in enumerate(pieces):               # every rank's copy of the block gets every row
            rows = Q[p.name][p.r0:p.r1]
            if p.rank == world.rank:
                rows.copy_(mine[i].qweight)
            dist.broadcast(rows, src=p.rank)
        own = {i: _to_cpu(r) for i, r in mine.items()}
        gathered = [None] * world.size if world.main else None
        dist.gather_object({} if world.main else own, gathered, dst=0)      # rank 0 keeps its own pieces
        if world.main:
            parts = {i: r for g in [own, *gathered] for i, r in g.items()}
            results = {name: _merge([parts[i] for i, p in enumerate(pieces) if p.name == name], Q[name])
                       for name, _, _ in shapes}
        else:
            results = {name: LayerResult.weight_only(Q[name]) for name, _, _ in shapes}
        self.seconds["decode"] += t1 - t0
        self.seconds["communicate"] += time.perf_counter() - t1
        return results


def _to_cpu(res: LayerResult) -> LayerResult:
    """`res` without its dequantized weight (sent separately), tensors on the CPU."""
    return LayerResult(qweight=torch.empty(0), codes=res.codes.cpu(), scales=res.scales.cpu(), zeros=res.zeros.cpu(),
                       g_idx=res.g_idx.cpu(), perm=res.perm.cpu(), row_loss=res.row_loss.cpu(), loss=res.loss,
                       report=res.report)


def _merge(parts: list[LayerResult], Q: torch.Tensor) -> LayerResult:
    """Row slices of one layer, top to bottom, as one `LayerResult` with dequantized weight `Q`."""
    if len(parts) == 1:
        res = parts[0]
        res.qweight = Q
        return res
    row_loss = torch.cat([p.row_loss for p in parts])
    report = dict(parts[0].report)
    for key in ("seconds", "path_objective", "sym_loss"):          # sums over rows
        if report.get(key) is not None:
            report[key] = float(sum(p.report[key] for p in parts))
    if "candidate_histogram" in report:
        hist = [p.report["candidate_histogram"] for p in parts]
        report["candidate_histogram"] = [sum(h[j] for h in hist if j < len(h)) for j in range(max(map(len, hist)))]
    return LayerResult(
        qweight=Q, codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts]),
        zeros=torch.cat([p.zeros for p in parts]), g_idx=parts[0].g_idx, perm=parts[0].perm,
        row_loss=row_loss, loss=float(row_loss.sum()), report=report)



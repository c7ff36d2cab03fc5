"""Device memory for quantizing one layer (docs/interfaces.md, "Memory").

A layer `(m, n)` holds, besides its statistics (`(n, n)` each of `H`, `C`, `G`): in the whole-matrix form,
about `WHOLE_SQUARES` `(n, n)` tensors at once (the objective's matrices, the permuted copy, the damped copy,
the Cholesky factors, the float64 reads of the reported objective) and `ROW_BUFFERS` `(m, n)` float32
tensors (the weight, its permuted copy, the targets, the decoded codes and grids both ways, the dequantized
weight); in the column-blocked form (`linalg.inverse_cholesky_blocked`), one `(n, n)` tensor for `U`,
`FULL_HEIGHT` `(m, n)` tensors and the row buffers of a chunk of rows, finished one chunk at a time.

`plan` picks the form: the whole-matrix form wherever it fits the budget (`budget`: half of a GPU's `room`,
its total memory less the open block's weights), the column-blocked form where it does not; `keeps_statistics`
says whether a blocked layer's statistics stay on the device while it is decoded or go to the host.
`check_fits` refuses, before any calibration, a layer whose statistics or blocked form exceed the device's
memory.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError
from .stats import product_bytes

ENV = "OJBKQ_DECODER_MAX_BYTES"     # bytes a layer may use (forces a budget, also on the CPU)
SHARE = 0.9                         # of the device's free memory (plus what torch's allocator holds unused)
LAYER_SHARE = 0.5                   # of the device's room: what decides a layer's form
WHOLE_SQUARES = 6
ROW_BUFFERS = 12
FULL_HEIGHT = 4
COLUMN_BLOCK = 2048
KEPT_ROWS = 1024                    # a blocked layer keeps its statistics on the device if this many rows fit beside
STATISTICS_SHARE = 0.25             # of the device's memory, for the statistics of one pass
GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """How a layer is factorised and finished: `blocked` (column blocks of `block` columns, rows finished
    `rows` at a time) or the whole-matrix form (`rows` None: all rows at once, unless `max_rows`)."""

    blocked: bool = False
    block: int = COLUMN_BLOCK
    rows: Optional[int] = None


WHOLE = Plan()


def _forced() -> Optional[int]:
    env = os.environ.get(ENV)
    if not env:
        return None
    try:
        return int(float(env))
    except ValueError:
        raise InputError(f"{ENV}={env!r}: give a number of bytes, e.g. 6e10") from None


def _bytes(device, on_gpu) -> Optional[int]:
    """`$OJBKQ_DECODER_MAX_BYTES` when set, else `on_gpu(device)` on a CUDA device, else None."""
    forced = _forced()
    if forced is not None:
        return forced
    device = torch.device(device)
    return on_gpu(device) if device.type == "cuda" else None


def _total(device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


_held: dict[tuple, int] = {}


def _key(device) -> tuple:
    d = torch.device(device)
    return d.type, d.index or 0


@contextmanager
def holding(device, nbytes: int):
    """While inside: a run holds `nbytes` on `device` for the block it has open (its weights and their
    full-precision copy: the same on every rank and every run), and the budgets below are shares of the
    device's total memory less these (`room`), not of all of it."""
    key = _key(device)
    before = _held.get(key, 0)
    _held[key] = nbytes
    try:
        yield
    finally:
        _held[key] = before


def room(device) -> int:
    """A CUDA device's total memory less what a run holds there for its open block (`holding`): the same
    every time the block is opened, so the decisions taken from it are too."""
    return _total(device) - _held.get(_key(device), 0)


def _free(device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def budget(device) -> Optional[int]:
    """Bytes a layer may use on `device`, which decide its form and how experts are stacked:
    `$OJBKQ_DECODER_MAX_BYTES` when set, else `LAYER_SHARE` of a CUDA device's `room` (its total memory less
    the open block's weights), else None (no budget: host memory). Not what is free now, so that a run takes
    the same decisions, and gives the same codes, on the same GPU every time (a resumed run, every rank)."""
    return _bytes(device, lambda d: int(room(d) * LAYER_SHARE))


def available(device) -> Optional[int]:
    """Bytes free for work whose results do not depend on them (how many rows a call takes):
    `$OJBKQ_DECODER_MAX_BYTES` when set, else on a CUDA device `SHARE` of its free memory (with the
    allocator's cached, unused bytes), else None."""
    return _bytes(device, lambda d: int(_free(d) * SHARE))


def whole_bytes(m: int, n: int, itemsize: int = 4) -> int:
    """The whole-matrix form's working set, statistics aside."""
    return WHOLE_SQUARES * n * n * itemsize + ROW_BUFFERS * m * n * 4


def blocked_bytes(m: int, n: int, rows: int, itemsize: int = 4, block: int = COLUMN_BLOCK,
                  full_height: int = FULL_HEIGHT) -> int:
    """The column-blocked form's working set for `rows` rows at a time, statistics aside: `U`, a few
    `(n, block)` temporaries, `full_height` `(m, n)` float32 tensors held for the whole layer (`FULL_HEIGHT`:
    the weight as given, its copy in decoding order, the targets, written over `W (M − H)` a chunk of rows at
    a time, and the dequantized weight, written a chunk at a time; more with a static grid or a progressive
    decoder, `layer.full_height`), and the row buffers of one chunk."""
    return (n * n * itemsize + 6 * n * min(block, n) * 8 + full_height * m * n * 4
            + ROW_BUFFERS * rows * n * 4)


def plan(m: int, n: int, device, itemsize: int = 4, statistics: int = 0, full_height: int = FULL_HEIGHT) -> Plan:
    """The whole-matrix form when it fits `budget(device)` (or there is no budget), else the column-blocked
    form with as many rows at a time as fit the budget (at least 64) beside the layer's `statistics` bytes on
    the device (`full_height`: its `(m, n)` tensors, `blocked_bytes`)."""
    limit = budget(device)
    if limit is None or whole_bytes(m, n, itemsize) <= limit:
        return WHOLE
    fixed = blocked_bytes(m, n, 0, itemsize, full_height=full_height) + statistics
    rows = max(64, (limit - fixed) // (ROW_BUFFERS * n * 4))
    return Plan(True, min(COLUMN_BLOCK, n), int(min(rows, m)))


def keeps_statistics(m: int, n: int, device, statistics: int, full_height: int = FULL_HEIGHT) -> bool:
    """Whether a layer `(m, n)` is decoded with its statistics (`statistics` bytes on `device`) left there:
    always, unless it takes the blocked form and that form, with `KEPT_ROWS` rows at a time, does not fit
    `budget(device)` beside them; then the engine moves them to the host, and the blocked form reads them back
    a block of columns at a time (the same sums, more transfers, and more rows at a time). Follows the
    device's room, like `plan`."""
    limit = budget(device)
    if limit is None or not statistics or not plan(m, n, device).blocked:
        return True
    return statistics + blocked_bytes(m, n, min(m, KEPT_ROWS), full_height=full_height) <= limit


def least_bytes(m: int, n: int, statistics: int, stats_itemsize: int = 4) -> int:
    """The least a layer needs on the device: the larger of its `statistics` `(n, n)` sums (`stats_itemsize`
    bytes each) with the product being added (`stats.product_bytes`), while they are accumulated, and the
    blocked form with 64 rows at a time, while it is decoded (the sums moved to the host, `keeps_statistics`)."""
    return max(statistics * n * n * stats_itemsize + product_bytes(n, stats_itemsize),
               blocked_bytes(m, n, min(m, 64)))


def check_fits(shapes: dict[str, tuple[int, int]], statistics: int, device, stats_itemsize: int = 4,
               held: Optional[dict[str, int]] = None) -> None:
    """Refuse, naming the layer, its shape and the memory it needs, a layer `(m, n)` of `shapes` (name →
    shape) whose least working set exceeds the device's memory (`$OJBKQ_DECODER_MAX_BYTES` when set, else
    a CUDA device's total less `held[name]`, the bytes of its block's weights and their full-precision copy,
    which the run holds beside it; no check on the CPU)."""
    env = os.environ.get(ENV)
    device = torch.device(device)
    held = {} if env else (held or {})
    if env:
        total, what = _forced(), f"{ENV}={env}"
    elif device.type == "cuda":
        total = _total(device)
        what = f"{torch.cuda.get_device_name(device)}'s {_size(total)}"
    else:
        return
    need = {name: least_bytes(m, n, statistics, stats_itemsize) + held.get(name, 0) for name, (m, n) in shapes.items()}
    worst = max(need, key=need.get, default=None)
    if worst is None or need[worst] <= total:
        return
    (m, n), block = shapes[worst], held.get(worst, 0)
    beside = f", beside its block's weights ({_size(block)} with their full-precision copy)" if block else ""
    raise InputError(
        f"{worst} ({m} × {n}) needs at least {_size(need[worst])} on the device to quantize (to accumulate its "
        f"{statistics} statistics of {n} × {n}, or to decode it: the factor U, the weight{beside}), more than "
        f"{what}: use a device with more memory, or an objective with fewer statistics (symmetric needs H only)")


def statistics_limit(device) -> Optional[int]:
    """Bytes the statistics of one pass over a group (and the results decoded from them, which stay on the
    device until the pass is written back) may take: `STATISTICS_SHARE` of `$OJBKQ_DECODER_MAX_BYTES` when
    set, else of a CUDA device's `room` (the same on every rank and every run, so the chunks are too), else
    None (no limit)."""
    limit = _bytes(device, room)
    return None if limit is None else int(limit * STATISTICS_SHARE)


def chunks(names: list[str], size, limit: Optional[int]) -> list[list[str]]:
    """`names` (a group's modules, in order) in consecutive chunks whose `size(name)` bytes sum to at most
    `limit` (None: one chunk). Modules of one parent (an expert's gate and up, which read one input and
    share its statistics) stay in one chunk; a parent larger than `limit` is a chunk of its own."""
    if limit is None:
        return [list(names)]
    parents: dict[str, list[str]] = {}
    for n in names:
        parents.setdefault(n.rpartition(".")[0], []).append(n)
    out: list[list[str]] = []
    used = 0
    for members in parents.values():
        need = sum(size(n) for n in members)
        if out and used + need <= limit:
            out[-1] += members
            used += need
        else:
            out.append(list(members))
            used = need
    return out


def _size(b: int) -> str:
    return f"{b / GIB:.1f} GiB" if b >= GIB // 10 else f"{b / (1 << 20):.1f} MiB"

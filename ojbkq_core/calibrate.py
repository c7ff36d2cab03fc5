"""The sequential calibration engine: a whole model, block by block (docs/formulation.md §1).

Two activation streams flow through the blocks (`Streams`):

- `X`  — the runtime stream: block inputs produced by the already quantized earlier blocks;
- `X̃`  — the full-precision stream: block inputs produced by the original blocks, kept only when the
  objective reads `C` or `G` (or draws its parameters per layer).

`calibrate` reads as its steps, for each block `i` and each true-sequential group of its modules:

1. `capture`     — the first block's inputs for every calibration batch (once, both streams);
2. `statistics`  — run `block_i(X)` and its full-precision copy `orig_i(X̃)` with the group's modules
                   hooked, accumulate each module's `Statistics` (modules reading the same input
                   share one);
3. `quantize`    — one module → `LayerResult` (`quantize_group` does a group's modules);
4. `replace`     — write the dequantized weights back, so later groups and blocks see them quantized;
5. `propagate`   — `X ← block_i(X)`, `X̃ ← orig_i(X̃)`.

Each step takes and returns plain values (`Streams`, `Statistics`, `LayerResult`). What a run does
differently — sum the statistics over ranks, share a group's modules out, keep what it needs for an
analysis, stop early — it does at the engine's named points, the methods of an `Events` object
(see `Events`): `statistics_ready`, `decode_group`, `group_decoded`, `layer_done`, `block_done` and
`stop_requested`.

Only the current block (and its full-precision copy) sits on `device`, every other block stays where
the model is. The streams live on `device` when they fit (`stream_home`), else in pinned host memory
with asynchronous copies; each stream runs one forward per group for the statistics and one to
propagate, except the full-precision stream, whose last statistics pass also propagates it. The runtime
stream's passes take the kept outputs of the block's final modules instead of running them again
(`reuse.py`).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import budget
from .blocks import BlockInputs, Inputs, capture_block_inputs, model_device, module_inputs, run_block, to_home
from .decoders.base import Decoder
from .decoders.rtn import RTN
from .errors import InputError, NonFiniteError
from .evaluation import EvalStreams, head_on
from .experts import sparse_blocks
from .fullprecision import FullPrecisionCache
from .grid import GridSpec, QuantSpec
from .hostmemory import host_memory_bytes
from .layer import LayerResult, full_height, quantize_layer, quantize_stack
from .model import Model
from .objectives import Objective, ObjectiveSpec, Term
from .reuse import Reuse
from .stats import Statistics

log = logging.getLogger("ojbkq")

# where a group's experts are decoded together: on a GPU one call per expert costs launches and waits; on
# the CPU one call each is faster (bench/results/moe_cpu.json: a 64-expert block's decoding, klein k=16,
# 21.5 s a block stacked against 12.3 s one call each)
STACK_DEVICES = ("cuda",)
MOE_FALLBACKS = ("rtn", "all_tokens")   # what an expert with too few routed tokens is quantized with
SYMMETRIC = (Term(1, 0, 0),)        # ‖W X − Q X‖²: the objective is the symmetric loss itself


@dataclass
class CalibrationResult:
    """`layers`: full module name → `LayerResult`; `report`: per-layer losses, draws and timings."""

    layers: dict[str, LayerResult]
    report: dict
    streams: dict = field(default_factory=dict)     # block index → {"X": [...], "X_fp": [...]} when kept


def stream_home(adapter: Model, samples: int, seqlen: int, streams: int, device: torch.device, share: float = 0.25,
                extra_tokens: int = 0):
    """Where the activation streams live: on `device` when all of them (`streams × samples × seqlen +
    extra_tokens` rows of `hidden` values in the model's dtype; `extra_tokens`: the evaluation's rows, two
    streams of its windows) take at most `share` of its free memory, else pinned host memory (CUDA) or the CPU.
    `OJBKQ_STREAMS=device` or `pinned` decides instead."""
    if device.type != "cuda":
        return torch.device("cpu")
    forced = os.environ.get("OJBKQ_STREAMS")
    if forced in ("device", "pinned"):
        return device if forced == "device" else "pinned"
    block = adapter.blocks()[0]
    first = block.get_submodule(adapter.groups(block)[0][0])
    hidden = adapter.weight(first).shape[1]
    p = next(adapter.model.parameters())
    need = (streams * samples * seqlen + extra_tokens) * hidden * p.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return device if need <= share * free else "pinned"


def memory_line(device: torch.device) -> str:
    """`host 3.1 GiB, device 12.0 GiB (peak 20.5 GiB)`: resident host memory and, on CUDA, the memory
    torch holds on `device` now and at its peak."""
    text = f"host {host_memory_bytes() / 2**30:.1f} GiB"
    if device.type == "cuda":
        text += (f", device {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB "
                 f"(peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)")
    return text


def paired(x: torch.Tensor, tokens: torch.Tensor, x_fp: torch.Tensor, tokens_fp: torch.Tensor):
    """`(x, x_fp)` restricted to the tokens routed to an expert in both streams, row `r` of each the same
    token (in increasing position): the rows `(N, n)`, `(N_fp, n)` with their token positions `(N,)`, `(N_fp,)`."""
    size = int(max(tokens.max(), tokens_fp.max())) + 1 if tokens.numel() and tokens_fp.numel() else 0
    row = torch.full((2, size), -1, dtype=torch.long, device=tokens.device)
    row[0, tokens] = torch.arange(tokens.numel(), device=tokens.device)
    row[1, tokens_fp.to(tokens.device)] = torch.arange(tokens_fp.numel(), device=tokens.device)
    both = (row >= 0).all(0).nonzero()[:, 0]
    return x[row[0, both].to(x.device)], x_fp[row[1, both].to(x_fp.device)]


def default_batch_size(seqlen: int, device="cpu") -> int:
    """Calibration sequences per forward batch: about 16384 tokens on a CUDA device (fewer, larger
    products), 4096 elsewhere."""
    return max(1, (16384 if torch.device(device).type == "cuda" else 4096) // seqlen)


def layer_seed(seed: int, index: int) -> int:
    """The decoder seed of the `index`-th quantized layer: distinct per layer, fixed by `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _skipped(full: str, rel: str, skip: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in skip)


def quantized_names(adapter: Model, skip: Sequence[str] = ()) -> list[str]:
    """Full names of the modules `calibrate` quantizes: `adapter.layer_names()` less those `skip` names."""
    path = adapter.blocks_path()
    return [f"{path}.{i}.{n}" for i, block in enumerate(adapter.blocks()) for n in adapter.modules(block)
            if not _skipped(f"{path}.{i}.{n}", n, skip)]


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def held_by_layer(adapter: Model, names: Sequence[str], copies: int) -> dict[str, int]:
    """Full layer name → the bytes a run holds on its device while that layer's block is open: `copies` of
    the block's parameters and buffers (two with the full-precision stream, `Run.held`)."""
    path = adapter.blocks_path()
    size = [module_bytes(b) for b in adapter.blocks()]
    return {n: copies * size[int(n[len(path) + 1:].split(".", 1)[0])] for n in names}


def check_skip(adapter: Model, skip: Sequence[str]) -> None:
    """`InputError` for a `quant.skip` pattern (fnmatch) that names no layer: none of the quantized layers
    by its full name or its name within a block, and no other leaf module (e.g. `lm_head`, never quantized);
    a pattern that matches only containers (`model.layers.0.mlp`) skips nothing and is refused too. The
    message names the nearest names."""
    if not skip:
        return
    within = sorted({n for block in adapter.blocks() for n in adapter.modules(block)})
    full = [name for name, _ in adapter.model.named_modules() if name]
    leaves = [name for name, m in adapter.model.named_modules() if name and not any(True for _ in m.children())]
    for p in skip:
        if any(fnmatch.fnmatchcase(n, p) for n in within) or any(fnmatch.fnmatchcase(n, p) for n in leaves):
            continue
        if any(fnmatch.fnmatchcase(n, p) for n in full):
            raise InputError(f"quant.skip: {p!r} matches only modules that hold layers, and skips nothing; name "
                             f"the layers, e.g. {p}.*")
        near = difflib.get_close_matches(p, within + full, n=3, cutoff=0.5)
        example = f"{adapter.blocks_path()}.0.{within[0]}" if within else "a module's full name"
        raise InputError(f"quant.skip: {p!r} matches no module of {type(adapter.model).__name__}"
                         + (f" (nearest: {', '.join(near)})" if near else "")
                         + f"; a pattern (with * and ?) matches full names ({example}) or names within a block"
                         + (f" ({within[0]})" if within else ""))


# --- the two streams ------------------------------------------------------------------------------

RESULT_BYTES = 12                     # per weight, a decoded layer's result on the device (float32 Q, int64 codes)
FULL_PRECISION_PASS_BYTES = 1 << 30   # a block's full-precision module inputs kept for one pass (Streams)
REUSE_BYTES = 1 << 30                 # outputs of a block's final modules kept across its passes (reuse.py) …
REUSE_SHARE = 0.25                    # … or on a CUDA device this share of its free memory


def reuse_budget(device: torch.device) -> int:
    """Bytes of kept outputs a block's passes may hold (`Streams.plan_reuse`): `REUSE_SHARE` of the free
    memory of a CUDA device, `REUSE_BYTES` elsewhere (0: none anywhere)."""
    if device.type == "cuda" and REUSE_BYTES:
        return int(REUSE_SHARE * torch.cuda.mem_get_info(device)[0])
    return REUSE_BYTES


@dataclass
class Streams:
    """The inputs of the current block for every calibration batch: `X[b]` (runtime) and `X_fp[b]`
    (full precision, None when not kept), each `(batch, L, d)` on `home` (the device, the CPU, or
    `"pinned"` host memory, overwritten in place by asynchronous copies), and `batches[b]` the other
    arguments of the block call (shared by both streams). `fp_propagated`: `X_fp` already holds the
    next block's inputs (its last statistics pass ran the whole block).

    `fp_modules`: when set (`plan_full_precision`), the full-precision block is run once per batch to its
    end with the inputs of all these modules kept (`fp_pass`, batch → (inputs, output)), instead of once
    per group up to the group's modules: the full-precision block never changes within a block.

    `reuse`: when set (`plan_reuse`), the runtime stream's passes of the current block take the kept
    outputs of its final modules instead of running them again (`reuse.Reuse`)."""

    batches: list[BlockInputs]
    X: list[torch.Tensor]
    X_fp: Optional[list[torch.Tensor]]
    home: Any = "cpu"
    fp_propagated: bool = False
    fp_modules: Optional[list[str]] = None
    fp_pass: dict = field(default_factory=dict)
    reuse: Optional[Reuse] = None

    def store(self, X: list, b: int, out: torch.Tensor) -> None:
        """`X[b] ← out` for one of the two lists: replaced where the stream lives on a device or the CPU,
        overwritten in place by an asynchronous copy in pinned memory (ordered after the forward that
        read it)."""
        if self.home == "pinned":
            X[b].copy_(out, non_blocking=True)
        else:
            X[b] = out.to(self.home)

    @staticmethod
    def full_precision_needed(needs: set, sampled: bool) -> bool:
        """The full-precision stream is kept when an objective reads `C` or `G`, or when objective
        parameters are drawn per layer (any draw may need them)."""
        return sampled or bool(set(needs) & {"C", "G"})

    @property
    def full_precision(self) -> bool:
        return self.X_fp is not None

    def __len__(self) -> int:
        return len(self.batches)

    def original(self, block: nn.Module) -> Optional[nn.Module]:
        """The full-precision copy of `block` that carries `X_fp` (None without that stream); take it
        before any of the block's modules is quantized."""
        return copy.deepcopy(block) if self.full_precision else None

    def module_inputs(self, block: nn.Module, orig: Optional[nn.Module], names: Sequence[str], b: int, device,
                      propagate_fp: bool = False, pending: Sequence[str] = ()):
        """`(x, x_fp)`: the inputs of the named modules for batch `b` in each stream (`x_fp` None
        without the full-precision stream). With `propagate_fp` the full-precision block runs to its
        end and its output replaces `X_fp[b]` (the caller then sets `fp_propagated`). `pending`: the
        block's modules not quantized yet (for `reuse`; the named modules among them)."""
        with self.reusing(block, b, pending):
            x = module_inputs(block, names, self.X[b], self.batches[b], device)
        x_fp = None
        if self.full_precision and self.fp_modules:
            if b not in self.fp_pass:
                self.fp_pass[b] = module_inputs(orig, self.fp_modules, self.X_fp[b], self.batches[b], device,
                                                finish=True)
            got, out = self.fp_pass[b]
            x_fp = Inputs()
            x_fp.update((n, got[n]) for n in names if n in got)
            x_fp.tokens.update((n, got.tokens[n]) for n in names if n in got.tokens)
            if propagate_fp:
                self.store(self.X_fp, b, out)
        elif self.full_precision and propagate_fp:
            x_fp, out = module_inputs(orig, names, self.X_fp[b], self.batches[b], device, finish=True)
            self.store(self.X_fp, b, out)
        elif self.full_precision:
            x_fp = module_inputs(orig, names, self.X_fp[b], self.batches[b], device)
        return x, x_fp

    def reusing(self, block: nn.Module, b: int, pending: Sequence[str]):
        """The context of one runtime-stream pass of `block` on batch `b` (`Reuse.around`; none without
        `reuse`)."""
        return self.reuse.around(block, b, pending) if self.reuse is not None else contextlib.nullcontext()

    def plan_reuse(self, block: nn.Module, names: Sequence[str], budget: int) -> None:
        """Keep the outputs of `names` (`block`'s quantized modules) and of the submodules holding them
        once they are final, within `budget` bytes, until the block is propagated."""
        self.reuse = Reuse(block, names, budget) if names else None

    def plan_full_precision(self, block: nn.Module, names: Sequence[str], budget: int) -> None:
        """Run the full-precision block once per batch for all of `names` (the block's modules, in every
        group) when their inputs over all batches fit in `budget` bytes (in the inputs' dtype; q, k and
        v counted separately, so an over-estimate); else once per group. Drops the last block's pass."""
        self.fp_pass = {}
        self.fp_modules = None
        if not self.full_precision or not names:
            return
        tokens = sum(x.numel() // x.shape[-1] for x in self.X_fp)
        width = sum(getattr(block.get_submodule(n), "in_features", 0) for n in names)
        if 0 < width and tokens * width * self.X_fp[0].element_size() <= budget:
            self.fp_modules = list(names)

    def snapshot(self) -> dict:
        """Copies of both streams on the CPU."""
        cpu = lambda xs: None if xs is None else [x.to("cpu", copy=True) for x in xs]  # noqa: E731
        return {"X": cpu(self.X), "X_fp": cpu(self.X_fp)}


# --- the steps ------------------------------------------------------------------------------------

def capture(adapter: Model, input_ids: torch.Tensor, batch_size: int, full_precision: bool, home="cpu",
            device="cpu") -> Streams:
    """Step 1: the first block's inputs for `input_ids` `(S, L)`; both streams start equal, on `home`
    (see `stream_home`), the other block arguments on `device`."""
    batches = capture_block_inputs(adapter, input_ids, batch_size, home=home, device=device)
    X = [b.hidden for b in batches]
    for b in batches:                                # the streams own the hidden states from here on
        b.hidden = None
    X_fp = None
    if full_precision:                               # pinned streams are overwritten in place: two copies
        X_fp = [to_home(x.clone(), home) for x in X] if home == "pinned" else list(X)
    return Streams(batches, X, X_fp, home)


@torch.no_grad()
def statistics(block: nn.Module, orig: Optional[nn.Module], needs: dict[str, set], streams: Streams, device,
               dtype: torch.dtype = torch.float32, propagate_fp: bool = False,
               pending: Sequence[str] = (), given=None) -> dict[str, Statistics]:
    """Step 2: the `Statistics` of each module named in `needs` (block-relative name → the statistics
    it needs, of `H`, `C`, `G`) over every batch of `streams`, running `block` on `X` and `orig` on
    `X_fp`. Modules called with the same input tensor in both streams (q, k, v) share one
    `Statistics` object, accumulating the union of their needs, in `dtype`. A module that runs in no
    batch (in both streams: an expert no token is routed to) gets a `Statistics` of zero sums and
    `count == 0`. An expert's rows are the tokens its router sends to it; with the full-precision
    stream, those that both streams' routers send to it (`paired`), so that `C` pairs each token's two
    inputs. `propagate_fp` (the block's last group): `orig` runs to its end and `X_fp`
    becomes the next block's inputs in the same pass. `pending`: the block's modules not quantized yet
    (this group's and the later groups'), for `streams.reuse`. `given`: module name → sums already
    known for its inputs (`Statistics(given=)`, e.g. `FullPrecisionCache.sums_of`), or None."""
    names = list(needs)
    owner: dict[str, str] = {}                    # module → the first module reading the same input
    stats: dict[str, Statistics] = {}
    for b in range(len(streams)):
        x, x_fp = streams.module_inputs(block, orig, names, b, device, propagate_fp, pending)
        ran = [n for n in names if n in x and (x_fp is None or n in x_fp)]
        for n in ran:
            if n not in owner:
                owner[n] = next(o for o in ran if x[o] is x[n] and (x_fp is None or x_fp[o] is x_fp[n]))
        for o in dict.fromkeys(owner[n] for n in ran if owner[n] in ran):
            if o not in stats:
                need = set().union(*(needs[n] for n in names if owner.get(n) == o))
                stats[o] = Statistics(x[o].shape[-1], needs=need, device=device, dtype=dtype,
                                      given=None if given is None else given(o))
            rows, rows_fp = x[o], None if x_fp is None else x_fp[o]
            if rows_fp is not None and o in x.tokens:     # an expert: the tokens both routers sent to it
                rows, rows_fp = paired(rows, x.tokens[o], rows_fp, x_fp.tokens[o])
            stats[o].add(rows, rows_fp)
    streams.fp_propagated = streams.fp_propagated or (propagate_fp and streams.full_precision)
    for n in names:                               # no calibration token reached it: zero sums
        if n not in owner:
            module = block.get_submodule(n)
            none = torch.zeros(0, getattr(module, "in_features", module.weight.shape[0]), device=device)
            owner[n], stats[n] = n, Statistics(none.shape[1], needs=needs[n], device=device, dtype=dtype)
            stats[n].add(none, none)
    return {n: stats[owner[n]] for n in names}


def shared(stats: dict[str, Statistics]) -> list[Statistics]:
    """The distinct `Statistics` objects of a group (modules reading one input share one), in the order
    of their first module."""
    return list({id(st): st for st in stats.values()}.values())


@dataclass
class LayerTask:
    """One module to quantize: `name` in its block, `full` name in the model, `index` in quantization
    order, its `objective` (sampled parameters already drawn) and the `draws`. `fallback`: set by the
    engine for an expert with too few routed tokens whose statistics come from every calibration token
    (`"all_tokens"`), with its `routed_tokens`."""

    name: str
    full: str
    index: int
    objective: Objective
    draws: dict
    fallback: Optional[str] = None
    routed_tokens: Optional[int] = None


@dataclass
class Settings:
    """What every layer is quantized with (besides its own objective and statistics)."""

    grid: GridSpec
    decoder: Decoder
    damp: float = QuantSpec.damp
    seed: int = 0
    score_objective: Optional[Objective] = None
    moe_min_tokens: int = 0
    moe_fallback: str = "rtn"

    def too_few(self, module: nn.Module, stats: Statistics) -> bool:
        """Whether `module` is an expert (a `RoutedLinear`) whose statistics hold fewer than
        `moe_min_tokens` tokens."""
        return getattr(module, "routed", False) and stats.count < self.moe_min_tokens


def layer_tasks(objective: Union[ObjectiveSpec, Objective], prefix: str, group: Sequence[str], first: int,
                seed: int, skip: Sequence[str] = ()) -> list[LayerTask]:
    """The group's modules not in `skip`; module `group[p]` is layer `first + p`, and draws its sampled
    objective parameters from `np.random.default_rng([seed, first + p])`."""
    tasks = []
    for pos, n in enumerate(group):
        full = f"{prefix}.{n}"
        if _skipped(full, n, skip):
            continue
        k = first + pos
        if isinstance(objective, ObjectiveSpec):
            obj, draws = objective.build(np.random.default_rng([seed, k]))
        else:
            obj, draws = objective, {}
        tasks.append(LayerTask(n, full, k, obj, draws))
    return tasks


@torch.no_grad()
def quantize(adapter: Model, module: nn.Module, stats: Statistics, task: LayerTask, settings: Settings,
             device, rows: Optional[tuple[int, int]] = None, shared: Optional[dict] = None) -> LayerResult:
    """Step 3: one module → `LayerResult` (tensors on `device`). Its `report` gains `draws`,
    `seconds` and `sym_loss`. `rows` `(r0, r1)`: only those rows of the weight, decoded as they are in
    the whole module (the result holds rows `r0…r1−1`). `shared`: factorizations of the group's
    statistics, reused by the modules reading the same input (see `quantize_layer`)."""
    r0, r1 = rows or (0, None)
    W = weight_of(adapter, module, device, r0, r1)
    t0 = time.perf_counter()
    if not reached(stats):
        log.warning("%s: no calibration token reached it (%d tokens, all-zero H); rounded to nearest",
                    task.full, stats.count)
        res = rounded(W, settings.grid)
        res.report["fallback"] = "rtn"
    elif settings.too_few(module, stats):
        log.info("%s: %d routed tokens, fewer than quant.moe_min_tokens=%d; rounded to nearest", task.full,
                 stats.count, settings.moe_min_tokens)
        res = rounded(W, settings.grid)
        res.row_loss = task.objective.value(W, res.qweight, stats)
        res.loss = float(res.row_loss.sum())
        res.report["fallback"] = "rtn"
    else:
        m, n = adapter.weight(module).shape              # the whole layer's form, also for a slice of its rows
        tall = full_height(settings.grid, settings.decoder, settings.score_objective)
        if not budget.keeps_statistics(m, n, device, stats.bytes_on(device), tall):
            stats.move("cpu")
        plan = budget.plan(m, n, device, statistics=stats.bytes_on(device), full_height=tall)
        res = quantize_layer(W, stats, task.objective, settings.grid, settings.decoder, damp=settings.damp,
                             seed=layer_seed(settings.seed, task.index), score_objective=settings.score_objective,
                             row0=r0, shared=shared, plan=plan)
    return annotated(res, task, W, stats, time.perf_counter() - t0)


def weight_of(adapter: Model, module: nn.Module, device, r0: int = 0, r1: Optional[int] = None) -> torch.Tensor:
    """Rows `r0…r1−1` of the module's weight `(m, n)`, a float32 copy on `device`."""
    return adapter.weight(module).detach()[r0:r1].to(device=device, dtype=torch.float32, copy=True)


def reached(stats: Statistics) -> bool:
    """Whether any calibration token reached the module (tokens counted and a non-zero `H`)."""
    return stats.count > 0 and ("H" not in stats.needs or bool(stats.sums["H"].any()))


def annotated(res: LayerResult, task: LayerTask, W: torch.Tensor, stats: Statistics, seconds: float) -> LayerResult:
    """`res` with the report fields every layer carries: `seconds`, `draws`, `tokens`, `sym_loss`, the fallback."""
    res.report["seconds"] = seconds
    res.report["draws"] = task.draws
    res.report["tokens"] = stats.count
    if task.fallback is not None:
        res.report["fallback"], res.report["routed_tokens"] = task.fallback, task.routed_tokens
    if res.report.get("fallback") == "rtn":
        res.report["sym_loss"] = None
    else:
        res.report["sym_loss"] = res.loss if task.objective.terms == SYMMETRIC else _sym_loss(W, res.qweight, stats)
    return res


def quantize_experts(adapter: Model, block: nn.Module, tasks: Sequence[LayerTask], stats: dict[str, Statistics],
                     settings: Settings, device) -> dict[str, LayerResult]:
    """The group's routed experts that calibrate normally (tokens reached them, enough of them), decoded
    together per weight shape (`layer.quantize_stack`: one decoder call for all of them) on a device of
    `STACK_DEVICES` when the decoder can stack problems and no separate scoring objective is set; module name
    → result. The others are left to `quantize`, one call each."""
    if (torch.device(device).type not in STACK_DEVICES or not settings.decoder.stackable
            or settings.score_objective is not None):
        return {}
    by_shape: dict[tuple, list[LayerTask]] = {}
    for t in tasks:
        module = block.get_submodule(t.name)
        if getattr(module, "routed", False) and reached(stats[t.name]) and not settings.too_few(module, stats[t.name]):
            by_shape.setdefault(tuple(adapter.weight(module).shape), []).append(t)
    out = {}
    limit = budget.budget(device)           # not the free memory: the same stacks, the same codes every run
    for (m, n), same in by_shape.items():
        # a stack holds per layer its U twice (its own, the stacked copy) and about eight (m, n) buffers
        step = len(same) if limit is None else max(2, limit // (8 * n * n + 32 * m * n))
        for k in range(0, len(same), step):
            chunk = same[k:k + step]
            if len(chunk) < 2:
                continue
            t0 = time.perf_counter()
            Ws = [weight_of(adapter, block.get_submodule(t.name), device) for t in chunk]
            results = quantize_stack(Ws, [stats[t.name] for t in chunk], [t.objective for t in chunk], settings.grid,
                                     settings.decoder, settings.damp, [layer_seed(settings.seed, t.index) for t in chunk])
            each = (time.perf_counter() - t0) / len(chunk)
            for t, W, res in zip(chunk, Ws, results):
                out[t.name] = annotated(res, t, W, stats[t.name], each)
    return out


def rounded(W: torch.Tensor, grid: GridSpec) -> LayerResult:
    """`W` `(m, n)` rounded to nearest on `grid` (RTN with `H = I`), for a module no calibration token
    reached: its objective over the calibration tokens is 0 whatever the codes, so `loss` is 0."""
    n = W.shape[1]
    eye = Statistics(n, needs=("H",), device=W.device)
    eye.add(torch.eye(n, device=W.device))
    res = quantize_layer(W, eye, Objective((Term(1.0, 0.0, 0.0),), "symmetric"), grid, RTN(), damp=0.0)
    res.row_loss, res.loss = torch.zeros_like(res.row_loss), 0.0
    return res


def quantize_group(adapter: Model, block: nn.Module, tasks: Sequence[LayerTask], stats: dict[str, Statistics],
                   settings: Settings, device) -> dict[str, LayerResult]:
    """Step 3 for a group: module name in the block → `LayerResult`, every module decoded here (the
    default `Events.decode_group`)."""
    shared: dict = {}
    done = quantize_experts(adapter, block, tasks, stats, settings, device)
    return {t.name: done[t.name] if t.name in done else
            quantize(adapter, block.get_submodule(t.name), stats[t.name], t, settings, device, shared=shared)
            for t in tasks}


def replace(adapter: Model, block: nn.Module, results: dict[str, LayerResult]) -> None:
    """Step 4: write each result's dequantized weight into its module of `block`, then move the
    result's tensors to the CPU: the codes in the narrowest integer type that holds them, the
    dequantized weight dropped (the module holds it; `LayerResult.qweight` rebuilds it)."""
    for name, res in results.items():
        adapter.set_weight(block.get_submodule(name), res.qweight)
        if not res.decoded_here:                     # another process keeps its codes
            res.qweight = None
            continue
        maxq = int(res.codes.max()) if res.codes.numel() else 0
        res.qweight, res.row_loss = None, res.row_loss.cpu()
        res.codes = res.codes.to(torch.uint8 if maxq <= 255 else torch.int32).cpu()
        res.scales, res.zeros = res.scales.cpu(), res.zeros.cpu()


@torch.no_grad()
def propagate(block: nn.Module, orig: Optional[nn.Module], streams: Streams, device) -> Streams:
    """Step 5: the next block's inputs, `X ← block(X)` and `X̃ ← orig(X̃)` (unless the statistics
    pass did it), batch by batch in place where the streams live."""
    for b, batch in enumerate(streams.batches):
        with streams.reusing(block, b, ()):
            out = run_block(block, streams.X[b], batch, device)
        streams.store(streams.X, b, out)
        if streams.full_precision and not streams.fp_propagated:
            streams.store(streams.X_fp, b, run_block(orig, streams.X_fp[b], batch, device))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    streams.fp_propagated = False
    streams.fp_pass = {}
    streams.reuse = None
    return streams


def check_finite(streams: Streams, where: str) -> None:
    """Raise `NonFiniteError` when a block input of either stream holds NaN or inf; `where` names
    the block (e.g. "outputs of model.layers.3 (block 3)")."""
    for label, X in (("runtime", streams.X), ("full-precision", streams.X_fp)):
        for b, x in enumerate(X or ()):
            if not torch.isfinite(x).all():
                what = "NaN" if torch.isnan(x).any() else "inf"
                hint = (f"the block overflows {str(x.dtype).replace('torch.', '')}: load the model in float32 or "
                        f"bfloat16 (model.dtype)" if x.dtype in (torch.float16, torch.bfloat16)
                        else "check the model's weights")
                raise NonFiniteError(f"{where}: {what} in the {label} stream (batch {b}); {hint}")


def _row(task: LayerTask, W_shape, res: LayerResult) -> dict:
    row = {
        "index": task.index, "shape": list(W_shape), "loss": res.loss, "sym_loss": res.report["sym_loss"],
        "draws": task.draws, "seconds": res.report["seconds"], "damp": res.report["damp"],
        "backend": res.report.get("backend", "reference"),
        "damp_steps": res.report["damp_steps"], "dead_columns": res.report["dead_columns"],
    }
    if "candidate_histogram" in res.report:
        row["candidate_histogram"] = res.report["candidate_histogram"]
    for key in ("blocked", "stacked"):
        if key in res.report:
            row[key] = res.report[key]
    row["tokens"] = res.report["tokens"]
    for key in ("fallback", "routed_tokens"):
        if res.report.get(key) is not None:
            row[key] = res.report[key]
    return row


# --- the engine -----------------------------------------------------------------------------------

@dataclass
class Progress:
    """How far a run is after block `block - 1`: what `Events.block_done` receives, and (less `layers`)
    what a resumed run starts from (`calibrate(start=...)`).

    `block`: the next block; `index`: the quantization index of its first module; `X`, `X_fp`: the
    inputs of block `block` in both streams (as `Streams` holds them); `rows`, `skipped`: the report's
    per-layer rows and skipped names so far; `layers`: the block just done, full name → `LayerResult`
    (codes on the CPU; a run with `keep_layers=False` holds no others); `evaluation`: the evaluation's two
    streams at block `block` (`EvalStreams.state`), None without evaluation."""

    block: int
    index: int
    X: list
    X_fp: Optional[list]
    rows: dict
    skipped: list
    layers: dict = field(default_factory=dict)
    evaluation: Optional[dict] = None


@dataclass
class Group:
    """One true-sequential group of a block being quantized (or a chunk of its modules, when its statistics
    do not fit at once): what the engine's events receive. `stats` (module name → `Statistics`) is set once
    the statistics pass has run."""

    adapter: Model
    block: nn.Module
    block_index: int
    tasks: list[LayerTask]
    settings: Settings
    device: torch.device
    stats: dict = field(default_factory=dict)


class Events:
    """The named points of a calibration run. Subclass and override what a run does differently; the
    defaults quantize every module here and never stop. The engine reaches them in this order:

        for each block i:
            for each group of its modules (those not skipped; a group whose statistics exceed
            budget.statistics_limit is taken a chunk of its modules at a time, each chunk a `Group`):
                statistics_ready(group)        → the group's statistics, to use from here on
                decode_group(group)            → module name → LayerResult
                group_decoded(group, results)  (the modules still hold their original weights)
                layer_done(group, task, row)   for each module decoded here, with its report row
                stop_requested()               → True ends the run after this group
            block_done(i, block, progress)     (the block quantized, the streams propagated: `Progress`)
            stop_requested()                   → True ends the run after this block
        head(adapter, device)                  the context the evaluation is scored in (with evaluation)

    A distributed run (distributed.py) sums the statistics over ranks in `statistics_ready` and shares a
    group's modules out in `decode_group`; `ojbkq gaps` keeps sub-problems in `group_decoded` and stops
    when it has them all; a streamed run (streaming.py) reads each block's weights in `block_start` and
    writes its tensors and the state to resume from in `block_done`.
    """

    def block_start(self, index: int, block: nn.Module) -> None:
        pass

    def statistics_ready(self, group: Group) -> dict[str, Statistics]:
        return group.stats

    def decode_group(self, group: Group) -> dict[str, LayerResult]:
        """Every module of the group: a `LayerResult` whose `qweight` the engine writes into the module.
        A result made by `LayerResult.weight_only` carries the weight alone (its codes are kept elsewhere)
        and is left out of the run's results."""
        return quantize_group(group.adapter, group.block, group.tasks, group.stats, group.settings, group.device)

    def group_decoded(self, group: Group, results: dict[str, LayerResult]) -> None:
        pass

    def layer_done(self, group: Group, task: LayerTask, row: dict) -> None:
        pass

    def block_done(self, index: int, block: nn.Module, progress: "Progress") -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def head(self, adapter: Model, device: torch.device):
        """The context in which the evaluation is scored: the modules outside the blocks on `device`
        (`evaluation.head_on`; a streamed run reads them there)."""
        return head_on(adapter, device)


@torch.no_grad()
def calibrate(
    adapter: Model,
    input_ids: torch.Tensor,
    objective: Union[ObjectiveSpec, Objective],
    grid: GridSpec,
    decoder: Decoder,
    damp: float = QuantSpec.damp,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    score_objective: Optional[Objective] = None,
    true_sequential: bool = True,
    skip: Sequence[str] = (),
    batch_size: Optional[int] = None,
    keep_streams: bool = False,
    progress: bool = True,
    events: Optional[Events] = None,
    stats_dtype: torch.dtype = torch.float32,
    keep_layers: bool = True,
    start: Optional[Progress] = None,
    moe_min_tokens: int = 0,
    moe_fallback: str = "rtn",
    fp_cache: Optional[FullPrecisionCache] = None,
    evaluation: Optional[dict[str, torch.Tensor]] = None,
    eval_batch_size: Optional[int] = None,
) -> CalibrationResult:
    """Quantize every listed linear module of `adapter.model` in place on calibration `input_ids`
    `(S, L)` int64.

    Layer `k` (in quantization order) draws its sampled objective parameters from
    `np.random.default_rng([seed, k])` and decodes with seed `layer_seed(seed, k)`. `skip` holds
    fnmatch patterns of module names (full, or relative to the block) left in full precision.
    `keep_streams` keeps every block's input streams (CPU) in the result, for inspection. `events`:
    what the run does at the engine's named points (`Events`; the defaults when None). A run that
    stops early (`Events.stop_requested`) returns what it quantized, with `stopped_after_block` in the
    report. `stats_dtype`: the accumulation dtype of the statistics. `keep_layers=False`: each block's
    results go to `Events.block_done` only, and the result's `layers` stays empty (a streamed run writes
    them as blocks finish). `start`: continue a run at `start.block` with its saved streams and rows
    (`Progress`); the blocks before it are not touched. `moe_min_tokens`: an expert whose statistics
    hold fewer tokens is rounded to nearest (`moe_fallback="rtn"`) or calibrated on every calibration
    token sent through it (`"all_tokens"`). `fp_cache`: full-precision passes and `G` sums kept across
    runs of this model on these tokens (`fullprecision.py`): the run takes the blocks' passes kept there
    and keeps those it computes; taken on the CPU for dense models only (`FullPrecisionCache.accepts`).
    `evaluation`: source name → evaluation windows `(W, L′)` int64 (`perplexity.windows`), scored before and
    after quantizing in this same pass (`evaluation.EvalStreams`, in batches of `eval_batch_size` windows);
    the report's `perplexity` holds both.

    The run is a loop over the phases of a `Run`:

        run = Run.begin(...)                capture both streams (and the evaluation's)
        for each block i from the start:
            run.open_block(i, block)        read it, put it on the device, plan its passes
            for each group of its modules:
                run.quantize_group(names)   statistics → decode → replace → report rows
            run.close_block()               propagate the streams, hand the block on
        run.finish()                        score the evaluation, the report
    """
    run = Run.begin(adapter, input_ids, objective, grid, decoder, damp, seed, device, score_objective, skip,
                    batch_size, keep_streams, progress, events, stats_dtype, keep_layers, start, moe_min_tokens,
                    moe_fallback, fp_cache, evaluation, eval_batch_size)
    with logging_redirect_tqdm(), run.bar:                # the bar is closed on errors too
        for i, block in enumerate(adapter.blocks()):
            if i < run.first:
                continue
            groups = run.open_block(i, block, true_sequential)
            with budget.holding(run.device, run.held()):
                for names in groups:
                    if run.quantize_group(names):
                        break
            if run.close_block():
                break
    return run.finish()


class Run:
    """One calibration run's state, moved through its phases by `calibrate`: the settings, the two streams
    (and the evaluation's), the report's rows, the timings, and the block being quantized."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    # -- phase 1: the first block's inputs -------------------------------------------------------------
    @classmethod
    def begin(cls, adapter, input_ids, objective, grid, decoder, damp, seed, device, score_objective, skip,
              batch_size, keep_streams, progress, events, stats_dtype, keep_layers, start, moe_min_tokens,
              moe_fallback, fp_cache, evaluation, eval_batch_size) -> "Run":
        t_start = time.perf_counter()
        events = events if events is not None else Events()
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise InputError(f"calibration input_ids must be a non-empty (samples, seqlen) tensor, got "
                             f"{tuple(input_ids.shape)}")
        device = torch.device(device)
        adapter.model.eval()
        S, L = input_ids.shape
        batch_size = batch_size or default_batch_size(L, device)
        if moe_fallback not in MOE_FALLBACKS:
            raise InputError(f"moe_fallback={moe_fallback!r}: choose one of {', '.join(MOE_FALLBACKS)}")
        settings = Settings(grid, decoder, damp, seed, score_objective, moe_min_tokens, moe_fallback)
        probe = objective if isinstance(objective, Objective) else objective.build(np.random.default_rng([seed, 0]))[0]
        needs = set(probe.needs) | (set(score_objective.needs) if score_objective is not None else set())
        sampled = isinstance(objective, ObjectiveSpec) and bool(objective.sampled)

        full_precision = Streams.full_precision_needed(needs, sampled)
        names = quantized_names(adapter, skip)
        budget.check_fits({n: tuple(adapter.weight(adapter.model.get_submodule(n)).shape) for n in names},
                          len(needs), device, torch.finfo(stats_dtype).bits // 8,
                          held=held_by_layer(adapter, names, 2 if full_precision else 1))
        cache = fp_cache if full_precision and fp_cache is not None and fp_cache.accepts(adapter, device) else None
        taken_before = 0
        if cache is not None:
            cache.bind(adapter, input_ids, batch_size, device)
            taken_before = cache.taken
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        eval_rows = sum(w.numel() for w in (evaluation or {}).values())
        place = stream_home(adapter, S, L, 2 if full_precision else 1, device, extra_tokens=2 * eval_rows)
        streams = capture(adapter, input_ids, batch_size, full_precision, place, device)
        ev = None
        if evaluation:
            seqlen = next(iter(evaluation.values())).shape[1]
            ev = EvalStreams.capture(adapter, evaluation, eval_batch_size or default_batch_size(seqlen, device),
                                     place, device)
        if start is not None:
            streams.X = [to_home(x, place) for x in start.X]
            streams.X_fp = None if start.X_fp is None else [to_home(x, place) for x in start.X_fp]
            if ev is not None:
                ev.restore(start.evaluation)
        first = 0 if start is None else start.block
        check_finite(streams, f"inputs of {adapter.blocks_path()}.{first} (block {first})")
        seconds = {"capture": time.perf_counter() - t0, "statistics": 0.0, "quantize": 0.0, "propagate": 0.0}
        if ev is not None:
            seconds["evaluation"] = 0.0
        rows = {} if start is None else dict(start.rows)
        skipped = [] if start is None else list(start.skipped)
        bar = tqdm(total=len(adapter.layer_names()), desc="quantize", unit="layer", disable=not progress, leave=False)
        bar.update(len(rows) + len(skipped))
        return cls(adapter=adapter, objective=objective, grid=grid, decoder=decoder, device=device, skip=skip,
                   seed=seed, score_objective=score_objective, S=S, L=L, batch_size=batch_size, keep_streams=keep_streams,
                   events=events, stats_dtype=stats_dtype, keep_layers=keep_layers, start=start,
                   settings=settings, probe=probe, needs=needs, cache=cache, taken_before=taken_before,
                   streams=streams, ev=ev, first=first, seconds=seconds, t_start=t_start,
                   layers={}, rows=rows, kept={}, skipped=skipped, index=0 if start is None else start.index,
                   stopped=None, statistics_passes=0, bar=bar, path=adapter.blocks_path(), blocks=adapter.blocks())

    # -- phase 2: a block enters ---------------------------------------------------------------------
    def open_block(self, i: int, block: nn.Module, true_sequential: bool = True) -> list[list[str]]:
        """Read block `i` (`Events.block_start`), put it on the device, keep its full-precision copy, run the
        evaluation's full-precision stream through it, and plan its passes. Returns its groups of modules."""
        streams, cache, device = self.streams, self.cache, self.device
        if self.keep_streams:
            self.kept[i] = streams.snapshot()
        self.bar.set_description(f"block {i}/{len(self.blocks)}")
        self.events.block_start(i, block)
        self.i, self.block, self.home = i, block, model_device(block)
        for b in streams.batches + (self.ev.batches if self.ev is not None else []):
            b.select(i)                                  # this block's mask and rotary tables
        block.to(device)
        self.orig = streams.original(block)
        if self.ev is not None:
            t0 = time.perf_counter()
            self.ev.before(block, device)
            self.seconds["evaluation"] += time.perf_counter() - t0
        groups = self.adapter.groups(block)
        mf = self.settings
        self.all_tokens = mf.moe_fallback == "all_tokens" and mf.moe_min_tokens > 0 and bool(sparse_blocks(block))
        self.true_sequential = true_sequential
        if not true_sequential:
            groups = [[n for g in groups for n in g]]
        self.groups = groups
        streams.plan_full_precision(block, [n for g in groups for n in g], FULL_PRECISION_PASS_BYTES)
        if cache is not None:
            cache.check_block(i, block)
        kept_pass = cache.pass_of(i) if cache is not None and streams.fp_modules else None
        if kept_pass is not None:
            streams.fp_pass = kept_pass
        streams.plan_reuse(block, [n for g in groups for n in g], reuse_budget(device))
        self.done: dict[str, LayerResult] = {}                 # this block's results
        self.gi = 0
        return groups

    def held(self) -> int:
        """Bytes the run holds on its device for the open block: the block's parameters and buffers and
        their full-precision copy (the budgets are shares of the rest, `budget.holding`). The same on every
        rank and in every run; the streams, which live on the device only when they take at most a quarter
        of what was free at the start (`stream_home`), are not counted."""
        return sum(module_bytes(m) for m in (self.block, self.orig) if m is not None)

    # -- phase 3: one true-sequential group --------------------------------------------------------------
    def quantize_group(self, names: list[str]) -> bool:
        """Statistics, decoding and replacement of one group of the open block, with its report rows.
        Returns True when the run is asked to stop after it."""
        i, block = self.i, self.block
        gi, groups = self.gi, self.groups
        self.gi += 1
        tasks = layer_tasks(self.objective, f"{self.path}.{i}", names, self.index, self.seed, self.skip)
        self.index += len(names)
        self.skipped += [f"{self.path}.{i}.{n}" for n in names if n not in {t.name for t in tasks}]
        self.bar.update(len(names) - len(tasks))
        if not tasks:
            return False
        later = [n for g in groups[gi + 1:] for n in g]
        item = torch.finfo(self.stats_dtype).bits // 8
        shapes = {t.name: tuple(self.adapter.weight(block.get_submodule(t.name)).shape) for t in tasks}
        # a module's sums and its result (the dequantized weight in float32, the codes in int64) stay on the
        # device until its chunk is written back
        size = {t.name: len(self.needs | t.objective.needs) * shapes[t.name][1] ** 2 * item
                + RESULT_BYTES * shapes[t.name][0] * shapes[t.name][1] for t in tasks}
        # modules of one true-sequential group read inputs the group does not change: they may be taken a chunk
        # at a time; a block run as one group (true_sequential=False) may not
        limit = budget.statistics_limit(self.device) if self.true_sequential else None
        chunks = budget.chunks([t.name for t in tasks], size.__getitem__, limit)
        by_name = {t.name: t for t in tasks}
        for c, chunk in enumerate(chunks):
            last = c == len(chunks) - 1
            pending = [n for ch in chunks[c:] for n in ch] + later
            self.quantize_chunk([by_name[n] for n in chunk], gi == len(groups) - 1 and last, pending)
        if self.events.stop_requested():
            self.stopped = i
            return True
        return False

    def quantize_chunk(self, tasks: list[LayerTask], last: bool, pending: list[str]) -> None:
        """Statistics, decoding and replacement of modules of one group (all of it, or a chunk of its modules
        whose statistics fit `budget.statistics_limit`: their inputs do not depend on each other)."""
        i, block, streams, cache, settings = self.i, self.block, self.streams, self.cache, self.settings
        group = Group(self.adapter, block, i, tasks, settings, self.device)
        t0 = time.perf_counter()
        wants = {t.name: self.needs | t.objective.needs for t in tasks}
        group.stats = statistics(block, self.orig, wants, streams, self.device, self.stats_dtype,
                                 propagate_fp=last and not self.all_tokens, pending=pending,
                                 given=None if cache is None else (lambda n: cache.sums_of(i, n, self.stats_dtype)))
        group.stats = self.events.statistics_ready(group)
        if cache is not None:
            cache.keep_sums(i, group.stats)
        few = [t for t in tasks if settings.too_few(block.get_submodule(t.name), group.stats[t.name])]
        if few and self.all_tokens:
            group.stats.update(statistics_of_all_tokens(group, few, self.orig, wants, streams, self.events,
                                                        self.stats_dtype))
        if self.device.type == "cuda":                  # the products queued above count here
            torch.cuda.synchronize(self.device)
        self.seconds["statistics"] += time.perf_counter() - t0
        results = self.events.decode_group(group)
        self.events.group_decoded(group, results)
        replace(self.adapter, block, results)
        for t in tasks:
            self.report_layer(group, t, results[t.name])
        self.statistics_passes += 1

    def report_layer(self, group: Group, t: LayerTask, res: LayerResult) -> None:
        self.bar.update(1)
        if not res.decoded_here:                         # its codes are kept by another process
            return
        self.rows[t.full] = _row(t, res.codes.shape, res)
        self.done[t.full] = res
        if self.keep_layers:
            self.layers[t.full] = res
        self.seconds["quantize"] += res.report["seconds"]
        extra = "".join(f" {key}={v:.3f}" for key, v in t.draws.items())
        log.info("%s: %s loss=%.6g%s (%.2fs)", t.full, t.objective.describe(), res.loss, extra, res.report["seconds"])
        self.events.layer_done(group, t, self.rows[t.full])

    # -- phase 4: the block leaves --------------------------------------------------------------------
    def close_block(self) -> bool:
        """Propagate both streams (and the evaluation's quantized stream) through the quantized block, put it
        back where the model is and hand it on (`Events.block_done`). Returns True when the run ends here."""
        i, block, streams, cache, device = self.i, self.block, self.streams, self.cache, self.device
        if cache is not None and streams.fp_modules and len(streams.fp_pass) == len(streams):
            cache.keep_pass(i, streams.fp_pass)
        if self.stopped is None:
            t0 = time.perf_counter()
            self.streams = streams = propagate(block, self.orig, streams, device)
            check_finite(streams, f"outputs of {self.path}.{i} (block {i})")
            self.seconds["propagate"] += time.perf_counter() - t0
            if self.ev is not None:
                t0 = time.perf_counter()
                self.ev.after(block, device)
                self.seconds["evaluation"] += time.perf_counter() - t0
        block.to(self.home)
        self.orig = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if self.stopped is not None:
            return True
        self.events.block_done(i, block, Progress(i + 1, self.index, streams.X, streams.X_fp, self.rows, self.skipped,
                                                  self.done, None if self.ev is None else self.ev.state()))
        self.done = {}
        log.info("block %d/%d done (%.1fs since the start; %s)", i + 1, len(self.blocks),
                 time.perf_counter() - self.t_start, memory_line(device))
        if i + 1 < len(self.blocks) and self.events.stop_requested():
            self.stopped = i
            return True
        return False

    # -- phase 5: the evaluation scored, the report ---------------------------------------------------------
    def finish(self) -> CalibrationResult:
        rows, streams, device, grid = self.rows, self.streams, self.device, self.grid
        report = {}
        if self.ev is not None and self.stopped is None:
            t0 = time.perf_counter()
            with self.events.head(self.adapter, device):
                report["perplexity"] = self.ev.score(self.adapter, device)
            self.seconds["evaluation"] += time.perf_counter() - t0
        self.seconds["total"] = time.perf_counter() - self.t_start
        objective = self.objective
        report = {
            "adapter": self.adapter.name,
            "blocks": len(self.blocks),
            "samples": self.S,
            "seqlen": self.L,
            "objective": self.probe.describe() if not isinstance(objective, ObjectiveSpec) else describe_objective(objective),
            "score_objective": None if self.score_objective is None else self.score_objective.describe(),
            "decoder": repr(self.decoder),
            "backends": sorted({r.get("backend", "reference") for r in rows.values()}),
            "grid": {"bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym, "act_order": grid.act_order,
                     "static_groups": grid.static_groups, "scale_method": grid.scale_method},
            "full_precision_stream": streams.full_precision,
            "objective_sum": float(sum(r["loss"] for r in rows.values())),
            "sym_loss_sum": float(sum(r["sym_loss"] or 0.0 for r in rows.values())),
            "layers": rows,
            "skipped": self.skipped,
            "rounded_without_tokens": [k for k, r in rows.items() if r.get("fallback") == "rtn"],
            "seconds": self.seconds,
            "statistics_passes": self.statistics_passes,
            "statistics_dtype": str(self.stats_dtype).removeprefix("torch."),
            "streams": "pinned" if streams.home == "pinned" else str(streams.home),
            "batch_size": self.batch_size,
            "device_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            **report,
        }
        experts = tokens_per_expert(rows)
        settings = self.settings
        if experts:
            report["experts"] = {"min_tokens": settings.moe_min_tokens, "fallback": settings.moe_fallback,
                                 "tokens": experts,
                                 "fallbacks": {k: {"fallback": r["fallback"], "tokens": r.get("routed_tokens", r["tokens"])}
                                               for k, r in rows.items() if r.get("fallback")}}
        if self.cache is not None:
            report["full_precision_cache"] = {**self.cache.describe(), "blocks_taken": self.cache.taken - self.taken_before}
        if self.stopped is not None:
            report["stopped_after_block"] = self.stopped
        if self.start is not None:
            report["resumed_at_block"] = self.start.block
        return CalibrationResult(self.layers, report, self.kept)


EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.[^.]+$")


def tokens_per_expert(rows: dict) -> dict[str, list]:
    """`experts module → [tokens of expert 0, 1, …]` from the report's rows (the tokens its statistics
    hold, before any fallback; `None` for an expert left out)."""
    out: dict[str, dict] = {}
    for name, row in rows.items():
        m = EXPERT.match(name)
        if m and "tokens" in row:
            e = out.setdefault(m.group(1), {})
            e[int(m.group(2))] = max(e.get(int(m.group(2)), 0), row.get("routed_tokens", row["tokens"]))
    return {k: [v.get(e) for e in range(max(v) + 1)] for k, v in out.items()}


@torch.no_grad()
def statistics_of_all_tokens(group: Group, few: list, orig, wants: dict, streams: Streams, events: Events,
                             dtype: torch.dtype) -> dict[str, Statistics]:
    """The statistics of the experts in `few` (`LayerTask`s) from every calibration token sent through
    them (`Experts.capture_all`, in both streams), summed by `events.statistics_ready`; each task is
    marked `fallback="all_tokens"` with its routed token count."""
    names = [t.name for t in few]
    marked = []
    for model in (group.block, orig):
        for name, experts in sparse_blocks(model) if model is not None else ():
            chosen = {int(n[len(name) + 1:].split(".")[0]) for n in names if n.startswith(name + ".")}
            experts.capture_all = frozenset(chosen)
            marked.append(experts)
    streams.fp_pass = {}
    reuse, streams.reuse = streams.reuse, None          # the experts run differently in this pass
    try:
        sub = Group(group.adapter, group.block, group.block_index, few, group.settings, group.device)
        sub.stats = statistics(group.block, orig, {n: wants[n] for n in names}, streams, group.device, dtype)
        sub.stats = events.statistics_ready(sub)
    finally:
        for experts in marked:
            experts.capture_all = frozenset()
        streams.fp_pass = {}
        streams.reuse = reuse
    for t in few:
        t.fallback, t.routed_tokens = "all_tokens", group.stats[t.name].count
        log.info("%s: %d routed tokens, fewer than quant.moe_min_tokens=%d; calibrated on all %d tokens", t.full,
                 t.routed_tokens, group.settings.moe_min_tokens, sub.stats[t.name].count)
    return sub.stats


def describe_objective(spec: ObjectiveSpec) -> str:
    """`name(param=value, …)` of an objective before its draws, e.g. `regularized(alpha=uniform:0.4:0.8)`."""
    args = ", ".join(f"{k}={v}" for k, v in spec.params.items() if k != "terms")
    if "terms" in spec.params:
        args = ", ".join(f"(w={t['w']}, a={t['a']}, b={t['b']})" for t in spec.params["terms"])
    return f"{spec.name}({args})" if args else spec.name


def _sym_loss(W: torch.Tensor, Q: torch.Tensor, stats: Statistics) -> Optional[float]:
    """`‖W X − Q X‖²_F / N = tr((W − Q) H (W − Q)ᵀ)` on the runtime inputs, when `H` was accumulated."""
    if "H" not in stats.needs:
        return None
    E = (W - Q.to(W.device)).double()
    n = E.shape[1]
    block = n if n <= budget.COLUMN_BLOCK else budget.COLUMN_BLOCK     # no (n, n) float64 copy of a wide H
    sums = stats.sums["H"]
    return float(sum(((E @ (sums[:, c:c + block].to(E.device) / stats.count).double()) * E[:, c:c + block]).sum()
                     for c in range(0, n, block)))

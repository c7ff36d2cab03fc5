"""The sequential calibration engine: a whole model, block by block (MATH.md §1).

Two activation streams flow through the blocks:

- `X`  — the runtime stream: block inputs produced by the already quantized earlier blocks;
- `X̃`  — the full-precision stream: block inputs produced by the original blocks.

For block `i` and each of its true-sequential groups, the group's modules are hooked and
`orig_i(X̃)` (a full-precision copy of the block) and `block_i(X)` are run batch by batch; each
module's inputs `x̃`, `x` go into a streaming `Statistics` (only the statistics the objective needs),
the module is quantized by `quantize_layer` and its dequantized weight written back, so later groups
and blocks see it quantized. Then `X ← block_i(X)`, `X̃ ← orig_i(X̃)`.

Only the current block (and its full-precision copy) sits on `device`; the streams and every other
block stay on the CPU. The full-precision stream is skipped when the objective reads only `H`.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .decoders.base import Decoder
from .errors import InputError
from .grid import GridSpec
from .layer import LayerResult, quantize_layer
from .model import Model
from .objectives import Objective, ObjectiveSpec
from .stats import Statistics

log = logging.getLogger("ojbkq")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every input it wanted was seen."""


@dataclass
class BlockInputs:
    """One calibration batch at the input of a block: `hidden` `(b, L, d)` on the CPU, plus the other
    positional and keyword arguments the model passed to its first block (attention mask, position
    ids, position embeddings, …), shared by every block and both streams."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


@dataclass
class CalibrationResult:
    """`layers`: full module name → `LayerResult`; `report`: per-layer losses, draws and timings."""

    layers: dict[str, LayerResult]
    report: dict
    streams: dict = field(default_factory=dict)     # block index → {"X": [...], "X_fp": [...]} when kept


def to_device(obj: Any, device) -> Any:
    """Tensors inside (nested tuples, lists, dicts) moved to `device`; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _first_tensor(out) -> torch.Tensor:
    """A block's output hidden states (blocks return a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(adapter: Model, input_ids: torch.Tensor, batch_size: int) -> list[BlockInputs]:
    """Run the model on `input_ids` `(S, L)` in batches up to its first block and keep that block's
    inputs (on the CPU). The model's front (embeddings, rotary tables) runs where the model is."""
    block0 = adapter.blocks()[0]
    seen: list = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    model = adapter.model
    dev = model_device(model)
    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(dev)
            seen.clear()
            try:
                model(input_ids=ids, **adapter.call_kwargs())
            except _Stop:
                pass
            if not seen:
                raise RuntimeError(f"{type(model).__name__}'s forward never reached {adapter.blocks_path()}.0")
            args, kwargs = seen[0]
            kwargs = dict(kwargs)
            if args:
                hidden, args = args[0], tuple(args[1:])
            else:
                hidden = kwargs.pop("hidden_states")
            for k in ("past_key_values", "past_key_value", "layer_past"):
                if k in kwargs:
                    kwargs[k] = None
            out.append(BlockInputs(hidden.detach().cpu(), to_device(args, "cpu"), to_device(kwargs, "cpu")))
    finally:
        handle.remove()
    return out


def _run(block: nn.Module, hidden: torch.Tensor, b: BlockInputs, device) -> torch.Tensor:
    return _first_tensor(block(hidden.to(device), *to_device(b.args, device), **to_device(b.kwargs, device)))


def module_inputs(block: nn.Module, names: Sequence[str], hidden: torch.Tensor, b: BlockInputs, device) -> dict:
    """The input of each named submodule of `block` when it runs on `hidden`; the forward stops as
    soon as all of them were seen. Modules called with the same tensor get the same object."""
    want = set(names)
    got: dict[str, torch.Tensor] = {}
    handles = []

    def make(name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            got.setdefault(name, x.detach())
            if want <= got.keys():
                raise _Stop
        return hook

    for name in names:
        handles.append(block.get_submodule(name).register_forward_pre_hook(make(name), with_kwargs=True))
    try:
        _run(block, hidden, b, device)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = want - got.keys()
    if missing:
        raise RuntimeError(f"modules {sorted(missing)} were never called by {type(block).__name__}.forward")
    return got


def layer_seed(seed: int, index: int) -> int:
    """The decoder seed of the `index`-th quantized layer: distinct per layer, fixed by `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _skipped(full: str, rel: str, skip: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in skip)


@torch.no_grad()
def calibrate(
    adapter: Model,
    input_ids: torch.Tensor,
    objective: Union[ObjectiveSpec, Objective],
    grid: GridSpec,
    decoder: Decoder,
    damp: float = 0.01,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    score_objective: Optional[Objective] = None,
    true_sequential: bool = True,
    skip: Sequence[str] = (),
    batch_size: Optional[int] = None,
    keep_streams: bool = False,
    progress: bool = True,
) -> CalibrationResult:
    """Quantize every listed linear module of `adapter.model` in place on calibration `input_ids`
    `(S, L)` int64.

    Layer `k` (in quantization order) draws its sampled objective parameters from
    `np.random.default_rng([seed, k])` and decodes with seed `layer_seed(seed, k)`. `skip` holds
    fnmatch patterns of module names (full, or relative to the block) left in full precision.
    `keep_streams` keeps every block's input streams (CPU) in the result, for inspection.
    """
    t_start = time.perf_counter()
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise InputError(f"calibration input_ids must be a non-empty (samples, seqlen) tensor, got {tuple(input_ids.shape)}")
    device = torch.device(device)
    model = adapter.model
    model.eval()
    S, L = input_ids.shape
    batch_size = batch_size or max(1, 4096 // L)
    spec_sampled = isinstance(objective, ObjectiveSpec) and bool(objective.sampled)
    probe = objective if isinstance(objective, Objective) else objective.build(np.random.default_rng([seed, 0]))[0]
    needs = set(probe.needs) | (set(score_objective.needs) if score_objective is not None else set())
    need_fp = spec_sampled or bool(needs & {"C", "G"})

    t0 = time.perf_counter()
    X = capture_block_inputs(adapter, input_ids, batch_size)
    X_fp = [b.hidden for b in X] if need_fp else None
    X_rt = [b.hidden for b in X]
    seconds = {"capture": time.perf_counter() - t0, "statistics": 0.0, "quantize": 0.0, "propagate": 0.0}

    blocks = adapter.blocks()
    path = adapter.blocks_path()
    layers: dict[str, LayerResult] = {}
    rows: dict[str, dict] = {}
    streams: dict = {}
    skipped: list[str] = []
    index = 0
    total = len(adapter.layer_names())
    bar = tqdm(total=total, desc="quantize", unit="layer", disable=not progress, leave=False)
    with logging_redirect_tqdm():
        for i, block in enumerate(blocks):
            if keep_streams:
                streams[i] = {"X": list(X_rt), "X_fp": None if X_fp is None else list(X_fp)}
            bar.set_description(f"block {i}/{len(blocks)}")
            home = model_device(block)
            block.to(device)
            orig = copy.deepcopy(block) if need_fp else None
            groups = adapter.groups(block)
            if not true_sequential:
                groups = [[n for g in groups for n in g]]
            for group in groups:
                names = [n for n in group if not _skipped(f"{path}.{i}.{n}", n, skip)]
                skipped += [f"{path}.{i}.{n}" for n in group if n not in names]
                built = {}                           # module → (objective, draws, layer index)
                for pos, n in enumerate(group):
                    if n not in names:
                        continue
                    k = index + pos
                    if isinstance(objective, ObjectiveSpec):
                        built[n] = (*objective.build(np.random.default_rng([seed, k])), k)
                    else:
                        built[n] = (objective, {}, k)
                index += len(group)
                bar.update(len(group) - len(names))
                if not names:
                    continue
                t0 = time.perf_counter()
                stats: dict[str, Statistics] = {}
                shared: dict[str, str] = {}          # module → module whose statistics it shares
                for bi, b in enumerate(X):
                    rt = module_inputs(block, names, X_rt[bi], b, device)
                    fp = module_inputs(orig, names, X_fp[bi], b, device) if need_fp else {}
                    if bi == 0:
                        for n in names:
                            shared[n] = next(o for o in names if rt[o] is rt[n] and (not need_fp or fp[o] is fp[n]))
                        for n in set(shared.values()):
                            need = set(needs)
                            for o in names:
                                if shared[o] == n:
                                    need |= built[o][0].needs
                            stats[n] = Statistics(rt[n].shape[-1], needs=need, device=device)
                    for n in stats:
                        stats[n].add(rt[n], fp.get(n))
                seconds["statistics"] += time.perf_counter() - t0
                for n in names:
                    full = f"{path}.{i}.{n}"
                    module = block.get_submodule(n)
                    obj, draws, k = built[n]
                    st = stats[shared[n]]
                    W = adapter.weight(module).detach().to(device=device, dtype=torch.float32, copy=True)
                    t0 = time.perf_counter()
                    res = quantize_layer(W, st, obj, grid, decoder, damp=damp, seed=layer_seed(seed, k),
                                         score_objective=score_objective)
                    dt = time.perf_counter() - t0
                    seconds["quantize"] += dt
                    res.report["draws"] = draws
                    adapter.set_weight(module, res.qweight)
                    row = {
                        "index": k, "shape": list(W.shape), "loss": res.loss,
                        "sym_loss": _sym_loss(W, res.qweight, st),
                        "draws": draws, "seconds": dt, "damp": res.report["damp"],
                        "dead_columns": res.report["dead_columns"],
                    }
                    if "candidate_histogram" in res.report:
                        row["candidate_histogram"] = res.report["candidate_histogram"]
                    rows[full] = row
                    res.qweight, res.row_loss = res.qweight.cpu(), res.row_loss.cpu()
                    res.codes, res.scales, res.zeros = res.codes.cpu(), res.scales.cpu(), res.zeros.cpu()
                    layers[full] = res
                    extra = "".join(f" {key}={v:.3f}" for key, v in draws.items())
                    log.info("%s: %s loss=%.6g%s (%.2fs)", full, obj.describe(), res.loss, extra, dt)
                    bar.update(1)
                del stats
            t0 = time.perf_counter()
            X_rt = [_run(block, X_rt[bi], b, device).cpu() for bi, b in enumerate(X)]
            if need_fp:
                X_fp = [_run(orig, X_fp[bi], b, device).cpu() for bi, b in enumerate(X)]
            seconds["propagate"] += time.perf_counter() - t0
            block.to(home)
            del orig
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    seconds["total"] = time.perf_counter() - t_start
    report = {
        "adapter": adapter.name,
        "blocks": len(blocks),
        "samples": S,
        "seqlen": L,
        "objective": probe.describe() if not isinstance(objective, ObjectiveSpec) else _describe_spec(objective),
        "score_objective": None if score_objective is None else score_objective.describe(),
        "decoder": repr(decoder),
        "grid": {"bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym, "act_order": grid.act_order,
                 "static_groups": grid.static_groups, "scale_method": grid.scale_method},
        "full_precision_stream": need_fp,
        "objective_sum": float(sum(r["loss"] for r in rows.values())),
        "sym_loss_sum": float(sum(r["sym_loss"] or 0.0 for r in rows.values())),
        "layers": rows,
        "skipped": skipped,
        "seconds": seconds,
    }
    return CalibrationResult(layers, report, streams)


def _describe_spec(spec: ObjectiveSpec) -> str:
    args = ", ".join(f"{k}={v}" for k, v in spec.params.items() if k != "terms")
    if "terms" in spec.params:
        args = ", ".join(f"(w={t['w']}, a={t['a']}, b={t['b']})" for t in spec.params["terms"])
    return f"{spec.name}({args})" if args else spec.name


def _sym_loss(W: torch.Tensor, Q: torch.Tensor, stats: Statistics) -> Optional[float]:
    """`‖W X − Q X‖²_F / N = tr((W − Q) H (W − Q)ᵀ)` on the runtime inputs, when `H` was accumulated."""
    if "H" not in stats.needs:
        return None
    E = (W - Q.to(W.device)).double()
    return float(((E @ stats.H.to(device=E.device, dtype=torch.float64)) * E).sum())

"""Models larger than host memory: read the checkpoint one block at a time, write the quantized
checkpoint one block at a time, and save what a killed run needs to continue.

A streamed run (`model.stream`, pipeline.py) builds the model with its parameters on the meta device
(`empty_model`) and hands the engine a `Streamed` set of events around its usual ones:

- `block_start(i)`: block `i`'s parameters are read from the checkpoint's safetensors files, on the
  calibration device (`Weights.load`), and rotated with a `rotation` (`rotation.Rotator`); the model's front
  (embeddings) was read for the capture and is dropped here;
- `block_done(i)`: the block's stored tensors (the format's `layer_tensors` for its quantized modules,
  every other tensor as it is) go to the `ShardWriter`, which writes a shard whenever one is full; the
  block's parameters go back to the meta device; every `output.checkpoint_every` the state to resume
  from is saved (`Saved`);
- `head()`: the modules outside the blocks are read (and rotated) while the evaluation is scored, then dropped.

Everything is written into the output's partial sibling `.NAME.partial` (`Partial`): the finished
shards, and in its `resume/` folder the inputs of the next block in both streams (and in the evaluation's
two), the tensors of the shard being filled, the report rows so far and the RNG states. The folder holds no `config.json` until
the run ends, when the rest of the model (embeddings, final norm, head: read from the checkpoint, rotated
with a `rotation`) is written and the folder is published in one rename, as `save_quantized` does.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from .calibrate import Events, Progress
from .errors import InputError
from .export.base import INDEX_NAME, WEIGHTS_NAME, Format, ShardWriter, read_json, weight_files
from .model import Model

log = logging.getLogger("ojbkq")

RESUME = "resume"
STATE_FILE = "state.json"


# --- reading the checkpoint -------------------------------------------------------------------------

class Checkpoint:
    """The safetensors files of a model folder, read tensor by tensor: each `read` opens the files it
    needs and closes them again, so no mapping outlives it."""

    def __init__(self, path: str):
        self.path = path
        files = weight_files(path)
        if not all(f.endswith(".safetensors") for f in files):
            raise InputError(f"{path}: the weights are torch .bin files; a streamed run reads safetensors "
                             f"(save the model with save_pretrained, or set model.stream: false)")
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            self.file_of = {k: os.path.join(path, v) for k, v in read_json(index)["weight_map"].items()}
        else:
            from safetensors import safe_open
            single = os.path.join(path, WEIGHTS_NAME)
            with safe_open(single, framework="pt") as f:
                self.file_of = {k: single for k in f.keys()}

    def fingerprint(self) -> list:
        """Name, size and modification time of each weight file: a resumed run reads the same ones."""
        return [[os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))]
                for f in sorted(set(self.file_of.values()))]

    def read(self, names: dict[str, str], device, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """`{key: tensor}` for `names` (key → checkpoint name), each cast to `dtypes[key]` on `device`."""
        from safetensors import safe_open
        by_file: dict[str, list[str]] = {}
        for key, name in names.items():
            by_file.setdefault(self.file_of[name], []).append(key)
        out = {}
        for file, keys in sorted(by_file.items()):
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in keys:
                    out[key] = f.get_tensor(names[key]).to(device=device, dtype=dtypes[key])
        return out


def empty_model(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """The transformers model of `config` with its parameters on the meta device (its buffers, e.g. the
    rotary tables, computed as usual): nothing of the checkpoint is read."""
    import transformers
    from accelerate import init_empty_weights
    archs = " ".join(getattr(config, "architectures", None) or [])
    causal = any(s in archs for s in ("ForCausalLM", "LMHeadModel")) or (
        not archs and getattr(config, "is_decoder", False))
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()                    # as from_pretrained does: tied parameters are one object
    return model.eval()


def materialized(model: nn.Module) -> int:
    """Parameters of `model` that hold data (not on the meta device), counted once each."""
    return sum(p.numel() for p in model.parameters() if p.device.type != "meta")


class Weights:
    """Where a streamed model's parameters come from: `load` reads a module's parameters from the
    checkpoint, `release` puts them back on the meta device; `peak` is the most parameters the model
    held at once (counted at every load)."""

    def __init__(self, model: nn.Module, adapter: Model, checkpoint: Checkpoint, device):
        self.model, self.adapter, self.checkpoint, self.device = model, adapter, checkpoint, torch.device(device)
        params = dict(model.named_parameters(remove_duplicate=False))
        aliases: dict[int, list[str]] = {}                 # a tied parameter's names, in model order
        for name, p in params.items():
            aliases.setdefault(id(p), []).append(name)
        names = {key: aliases[id(params[key])] if key in params else [key] for key in model.state_dict()}
        self.canonical = {key: names[key][0] for key in names}      # the name a tied tensor is stored under
        self.source = self._find(names)
        self.peak = 0

    def _find(self, names: dict[str, list[str]]) -> dict[str, str]:
        """Model tensor name → checkpoint name, for every stored tensor; a tied parameter is found under any
        of its `names`, with or without the model's base prefix. A parameter the checkpoint lacks is an
        `InputError` (a buffer it lacks keeps the model's value)."""
        have = self.checkpoint.file_of
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        buffers = {n for n, _ in self.model.named_buffers()}
        found, missing = {}, []
        for key, aliases in names.items():
            cands = [c for n in aliases for c in (n, f"{prefix}.{n}", n.removeprefix(f"{prefix}."))]
            hit = next((c for c in cands if c in have), None)
            if hit is not None:
                found[key] = hit
            elif key not in buffers:
                missing.append(key)
        if missing:
            raise InputError(f"{self.checkpoint.path}: the checkpoint has no tensor for {', '.join(missing[:3])}"
                             f"{' …' if len(missing) > 3 else ''} under the model's names; set model.stream: false "
                             f"to load it through transformers")
        return found

    def load(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Read the parameters (and stored buffers) of `module`, named `prefix` in the model, onto the
        calibration device; with `recurse=False` only those it holds itself."""
        want, dtypes, slots = {}, {}, {}
        for kind, items in (("p", module.named_parameters(recurse=recurse, remove_duplicate=False)),
                            ("b", module.named_buffers(recurse=recurse))):
            for rel, t in items:
                full = f"{prefix}.{rel}" if prefix else rel
                if full in self.source and (kind == "b" or t.device.type == "meta"):
                    want[full], dtypes[full], slots[full] = self.source[full], t.dtype, (kind, rel)
        tensors = self.checkpoint.read(want, self.device, dtypes)
        for full, (kind, rel) in slots.items():
            owner, _, leaf = rel.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            if kind == "p":
                sub._parameters[leaf] = nn.Parameter(tensors[full], requires_grad=False)
            else:
                sub._buffers[leaf] = tensors[full]
        self.peak = max(self.peak, materialized(self.model))

    @staticmethod
    def release(module: nn.Module) -> None:
        """`module`'s parameters back on the meta device (their memory freed)."""
        for sub in module.modules():
            for leaf, p in list(sub._parameters.items()):
                if p is not None and p.device.type != "meta":
                    sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def front(self) -> list[nn.Module]:
        """Read every module outside the blocks except the output head: what the forward runs before the
        first block, for the capture. Returns them, to `release` once the capture is done."""
        path = self.adapter.blocks_path()
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        skip = {id(m) for m in head.modules()} if head is not None else set()
        out = []
        for name, sub in self.model.named_modules():
            if name == path or name.startswith(path + ".") or id(sub) in skip:
                continue
            if any(p is not None for p in sub._parameters.values()):
                self.load(sub, name, recurse=False)
                out.append(sub)
        return out

    def rest(self) -> dict[str, torch.Tensor]:
        """Every stored tensor outside the blocks, on the CPU in the model's dtypes, one name per tied
        parameter (the first in `state_dict` order, as `export.base.state_dict` keeps)."""
        path = self.adapter.blocks_path() + "."
        want, dtypes, out = {}, {}, {}
        tensors = {**dict(self.model.named_parameters(remove_duplicate=False)), **dict(self.model.named_buffers())}
        for key in self.model.state_dict():
            if key.startswith(path) or self.canonical[key] != key:
                continue
            if key in self.source:
                want[key], dtypes[key] = self.source[key], tensors[key].dtype
            else:                                        # a buffer the checkpoint does not store
                out[key] = tensors[key].detach().cpu().contiguous()
        out.update(self.checkpoint.read(want, "cpu", dtypes))
        return out


# --- the partial output folder and the saved state ---------------------------------------------------

class Partial:
    """The output's partial sibling `.NAME.partial`, locked by this run while it writes (a second run on
    the same output is refused), published over `out_dir` when the run ends."""

    def __init__(self, out_dir: str, main: bool = True):
        target = os.path.abspath(out_dir)
        self.out_dir = out_dir
        self.path = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial")
        self.main = main
        self._lock = None

    @property
    def resume_dir(self) -> str:
        return os.path.join(self.path, RESUME)

    def saved(self) -> Optional[dict]:
        """The saved state (`state.json`), or None when no checkpoint was saved."""
        f = os.path.join(self.resume_dir, STATE_FILE)
        return read_json(f) if os.path.isfile(f) else None

    def open(self, resume: bool) -> Optional[dict]:
        """Create or take over the folder (rank 0) and lock it; returns the saved state when `resume`.
        A saved state without `resume` is refused (it would be lost), so is a folder another live run
        holds."""
        if self.main:
            os.makedirs(self.path, exist_ok=True)
            self._lock = open(os.path.join(self.path, ".lock"), "w")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"output.dir={self.out_dir!r}: another run is writing {self.path}; wait for it "
                                 f"or stop it") from None
        state = self.saved()
        if state is not None and not resume:
            raise InputError(f"output.dir={self.out_dir!r}: a run that stopped saved its state at block "
                             f"{state['progress']['block']}/{state['blocks']} in {self.path}; continue it with "
                             f"--resume, or remove that folder to start again")
        if state is None and self.main:                  # a run killed before its first checkpoint
            for name in os.listdir(self.path):
                if name != ".lock":
                    p = os.path.join(self.path, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        return state

    def publish(self) -> None:
        from .export.base import publish
        shutil.rmtree(self.resume_dir, ignore_errors=True)
        self.close()
        os.remove(os.path.join(self.path, ".lock"))
        publish(self.path, self.out_dir)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        """Remove the folder, unless it holds a saved state to resume from or another run holds it."""
        if self._lock is None:
            return
        self.close()
        if self.main and self.saved() is None:
            shutil.rmtree(self.path, ignore_errors=True)


def fingerprint(spec_yaml: str, checkpoint: Checkpoint, world_size: int) -> dict:
    """What a resumed run must share with the one that saved: the resolved recipe (less
    `output.overwrite`), the checkpoint's files and the number of processes; and what it should share, the
    number of torch threads (the products' rounding, and so a near tie between two codes or candidates, can
    depend on it)."""
    import yaml
    cfg = yaml.safe_load(spec_yaml)
    cfg.get("output", {}).pop("overwrite", None)
    return {"config": cfg, "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
            "weights": checkpoint.fingerprint(), "world_size": world_size, "threads": torch.get_num_threads()}


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_same(saved: dict, now: dict, where: str) -> None:
    """One line refusing a resume whose recipe, weights or process count differ from the saved run's."""
    if saved["config_sha256"] != now["config_sha256"]:
        a, b = _flat(saved["config"]), _flat(now["config"])
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        shown = ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in diff[:3])
        raise InputError(f"--resume: the run saved in {where} used another config ({shown}); rerun with its "
                         f"config, or remove {where} to start again")
    if saved["weights"] != now["weights"]:
        raise InputError(f"--resume: the model's weight files changed since the run saved in {where}; remove "
                         f"{where} to start again")
    if saved["world_size"] != now["world_size"]:
        raise InputError(f"--resume: the run saved in {where} had {saved['world_size']} processes, this one "
                         f"{now['world_size']}; rerun with --nproc {saved['world_size']}")
    if saved.get("threads", now["threads"]) != now["threads"]:
        log.warning("warning: --resume: the run saved in %s used %d torch threads, this one %d; the blocks from "
                    "here on may differ in a last bit from an uninterrupted run (set OMP_NUM_THREADS=%d to match)",
                    where, saved["threads"], now["threads"], saved["threads"])


class Saved:
    """The state a run saves every `every` (blocks, or seconds when `seconds` is set) and a resumed run
    starts from: `resume/` holds `state.json` (progress, report rows, writer, RNG states), the streams
    (`streams-r<rank>-<batch>.safetensors`, and the evaluation's `evaluation-r<rank>-<batch>.safetensors`) and the tensors of the shard being filled
    (`pending.safetensors`). Written into `resume.tmp/` and renamed into place, so a kill while saving
    leaves the previous state."""

    def __init__(self, partial: Partial, stamp: dict, blocks: int, rank: int, every: int = 0, seconds: float = 0.0):
        self.partial, self.stamp, self.blocks, self.rank = partial, stamp, blocks, rank
        self.every, self.seconds = every, seconds
        self.last = time.monotonic()
        self.saves, self.save_seconds = 0, 0.0

    def due(self, done_blocks: int) -> bool:
        if done_blocks >= self.blocks:
            return False
        if self.every:
            return done_blocks % self.every == 0
        return bool(self.seconds) and time.monotonic() - self.last >= self.seconds

    def save(self, progress: Progress, writer: Optional[ShardWriter], world=None) -> None:
        from safetensors.torch import save_file
        t0 = time.perf_counter()
        tmp = self.partial.resume_dir + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier(world)
        for b, x in enumerate(progress.X):
            tensors = {"X": x.detach().cpu().contiguous()}
            if progress.X_fp is not None:
                tensors["X_fp"] = progress.X_fp[b].detach().cpu().contiguous()
            save_file(tensors, os.path.join(tmp, f"streams-r{self.rank}-{b:05d}.safetensors"))
        ev = progress.evaluation
        for b in range(len(ev["X_fp"]) if ev is not None else 0):
            save_file({k: ev[k][b].detach().cpu().contiguous() for k in ("X_fp", "X_q")},
                      os.path.join(tmp, f"evaluation-r{self.rank}-{b:05d}.safetensors"))
        _barrier(world)
        if self.rank == 0:
            if writer is not None and writer.pending:
                save_file(writer.pending, os.path.join(tmp, "pending.safetensors"))
            state = {"blocks": self.blocks, "stamp": self.stamp,
                     "progress": {"block": progress.block, "index": progress.index, "batches": len(progress.X),
                                  "full_precision": progress.X_fp is not None,
                                  "evaluation_batches": len(ev["X_fp"]) if ev is not None else None},
                     "rows": progress.rows, "skipped": progress.skipped,
                     "writer": writer.state() if writer is not None else None, "rng": rng_state()}
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f)
            old = self.partial.resume_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.isdir(self.partial.resume_dir):
                os.replace(self.partial.resume_dir, old)
            os.replace(tmp, self.partial.resume_dir)
            shutil.rmtree(old, ignore_errors=True)
        _barrier(world)
        self.last = time.monotonic()
        self.saves += 1
        self.save_seconds += time.perf_counter() - t0
        log.info("saved the state to resume from at block %d/%d in %s (%.1fs)", progress.block, self.blocks,
                 self.partial.resume_dir, time.perf_counter() - t0)


def _barrier(world) -> None:
    if world is not None:
        import torch.distributed as dist
        dist.barrier()


def restore(partial: Partial, resume: bool, stamp: dict, world, main: bool
            ) -> tuple[Optional[Progress], Optional[ShardWriter]]:
    """Open `partial` for this run and return `(start, writer)`: where the run starts (None: block 0) and
    the shard writer (rank 0 only; with the saved shards and the tensors of the shard being filled).
    Every rank gets rank 0's view of the saved state; one saved by another config,
    other weights or another process count is refused (`check_same`)."""
    state = partial.open(resume) if main else None
    if world is not None:
        import torch.distributed as dist
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    start, pending = None, {}
    if state is not None:
        check_same(state["stamp"], stamp, partial.path)
        start, pending = load_start(partial, state, 0 if world is None else world.rank)
        log.info("resuming at block %d/%d from %s", start.block, state["blocks"], partial.resume_dir)
    elif resume:
        log.info("--resume: no saved state in %s; starting at block 0", partial.path)
    if not main:
        return start, None
    writer = ShardWriter(partial.path)
    if state is not None:
        writer.restore(state["writer"], pending)
        kept = {f for f, _ in writer.written}
        for name in os.listdir(partial.path):              # shards written after the saved state
            if name.endswith(".safetensors.part") and name not in kept:
                os.remove(os.path.join(partial.path, name))
    return start, writer


def load_start(partial: Partial, state: dict, rank: int) -> tuple[Progress, dict[str, torch.Tensor]]:
    """The `Progress` a resumed run starts from (this rank's streams) and the pending shard tensors."""
    from safetensors.torch import load_file
    p = state["progress"]
    X, X_fp = [], [] if p["full_precision"] else None
    for b in range(p["batches"]):
        f = os.path.join(partial.resume_dir, f"streams-r{rank}-{b:05d}.safetensors")
        if not os.path.isfile(f):
            raise InputError(f"{f}: missing from the saved state; remove {partial.path} to start again")
        t = load_file(f)
        X.append(t["X"])
        if X_fp is not None:
            X_fp.append(t["X_fp"])
    evaluation = None
    if p.get("evaluation_batches") is not None and rank == 0:            # rank 0 alone evaluates
        evaluation = {"X_fp": [], "X_q": []}
        for b in range(p["evaluation_batches"]):
            f = os.path.join(partial.resume_dir, f"evaluation-r{rank}-{b:05d}.safetensors")
            if not os.path.isfile(f):
                raise InputError(f"{f}: missing from the saved state; remove {partial.path} to start again")
            t = load_file(f)
            evaluation["X_fp"].append(t["X_fp"])
            evaluation["X_q"].append(t["X_q"])
    pending_file = os.path.join(partial.resume_dir, "pending.safetensors")
    pending = load_file(pending_file) if os.path.isfile(pending_file) else {}
    set_rng_state(state["rng"])
    return Progress(p["block"], p["index"], X, X_fp, state["rows"], state["skipped"], evaluation=evaluation), pending


def rng_state() -> dict:
    return {"torch": torch.get_rng_state().tolist(), "numpy": _jsonable(np.random.get_state()),
            "python": _jsonable(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


# --- the events of a streamed run ------------------------------------------------------------------------

class Streamed(Events):
    """The events of `inner` (the defaults, or a distributed `Engine`) plus streaming: each block's weights
    read in `block_start` (and rotated, with a `rotator`), its tensors written (`writer`, rank 0 only) and its
    weights dropped in `block_done`, the state saved when `saved.due`."""

    @property
    def rotation_report(self) -> Optional[dict]:
        return None if self.rotator is None else self.rotator.report

    def read_front(self) -> None:
        """Read what the forward runs before the first block (`Weights.front`), rotated with a `rotator`."""
        self.front = self.weights.front()
        if self.rotator is not None:
            self.rotator.front(self.weights.model)

    def rest(self) -> dict[str, torch.Tensor]:
        """Every stored tensor outside the blocks, as `Weights.rest` gives them; with a `rotator`, read and
        rotated (embeddings, final norm, head) as the blocks were."""
        if self.rotator is None:
            return self.weights.rest()
        model, path, out = self.weights.model, self.weights.adapter.blocks_path() + ".", {}
        head = next((f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
        with self.head(self.weights.adapter, self.weights.device):
            for key, t in model.state_dict().items():
                own = self.weights.canonical.get(key, key) == key or (key == head and self.rotator.report["untied"])
                if key.startswith(path) or t.device.type == "meta" or not own:
                    continue
                out[key] = t.detach().cpu().contiguous()
        return out

    def __init__(self, weights: Weights, fmt: Optional[Format], writer: Optional[ShardWriter],
                 saved: Optional[Saved], world=None, rotator=None):
        self.inner: Events = Events()
        self.weights, self.fmt, self.writer, self.saved, self.world = weights, fmt, writer, saved, world
        self.rotator = rotator                          # rotation.Rotator: the rotations applied as weights are read
        self.front: list[nn.Module] = []
        self.seconds = {"read": 0.0, "write": 0.0}

    def around(self, inner: Optional[Events]) -> "Streamed":
        """These events around `inner` (the engine's defaults when None); returns self."""
        self.inner = inner if inner is not None else Events()
        return self

    def block_start(self, index: int, block: nn.Module) -> None:
        for m in self.front:                            # the capture is over
            self.weights.release(m)
        self.front = []
        t0 = time.perf_counter()
        self.weights.load(block, f"{self.weights.adapter.blocks_path()}.{index}")
        if self.rotator is not None:
            self.rotator.block(block)
        self.seconds["read"] += time.perf_counter() - t0
        self.inner.block_start(index, block)

    def statistics_ready(self, group):
        return self.inner.statistics_ready(group)

    def decode_group(self, group):
        return self.inner.decode_group(group)

    def group_decoded(self, group, results) -> None:
        self.inner.group_decoded(group, results)

    def layer_done(self, group, task, row) -> None:
        self.inner.layer_done(group, task, row)

    def block_done(self, index: int, block: nn.Module, progress: Progress) -> None:
        self.inner.block_done(index, block, progress)
        self.weights.peak = max(self.weights.peak, materialized(self.weights.model))
        t0 = time.perf_counter()
        if self.writer is not None:
            self.writer.add(block_tensors(self.fmt, block, f"{self.weights.adapter.blocks_path()}.{index}",
                                          progress.layers))
        self.weights.release(block)
        self.seconds["write"] += time.perf_counter() - t0
        if self.saved is not None and self._due(progress.block):
            self.saved.save(progress, self.writer, self.world)

    def _due(self, done_blocks: int) -> bool:
        due = self.saved.due(done_blocks)
        if self.world is not None:                       # every rank saves at the same block
            import torch.distributed as dist
            flag = [due]
            dist.broadcast_object_list(flag, src=0)
            due = bool(flag[0])
        return due

    def stop_requested(self) -> bool:
        return self.inner.stop_requested()

    @contextlib.contextmanager
    def head(self, adapter, device):
        """The modules outside the blocks (embeddings, final norm, output head) read onto the device while
        the evaluation is scored, released afterwards; a parameter tied between two of them (the embeddings
        and the head) is read once and stays one object."""
        from .evaluation import outside_blocks
        t0 = time.perf_counter()
        modules = [(name, sub) for name, sub in outside_blocks(adapter)]
        untied = self.rotator is not None and self.rotator.report["untied"]
        head = adapter.model.get_output_embeddings() if hasattr(adapter.model, "get_output_embeddings") else None

        def key(name, sub, leaf):                        # the checkpoint's tie, unless the rotation untied the head
            full = f"{name}.{leaf}" if name else leaf
            return full if untied and sub is head else self.weights.canonical.get(full, full)
        slots = [(sub, leaf, key(name, sub, leaf)) for name, sub in modules
                 for leaf, p in sub._parameters.items() if p is not None]

        def tie():                                       # every slot of a tied parameter: its first slot's object
            first: dict[str, nn.Parameter] = {}
            for sub, leaf, k in slots:
                sub._parameters[leaf] = first.setdefault(k, sub._parameters[leaf])

        for name, sub in modules:
            tie()
            self.weights.load(sub, name, recurse=False)
        tie()
        if self.rotator is not None:
            self.rotator.head(adapter.model)
        self.seconds["read"] += time.perf_counter() - t0
        try:
            yield
        finally:
            for _, sub in modules:
                self.weights.release(sub)
            tie()


def block_tensors(fmt: Format, block: nn.Module, prefix: str, layers: dict) -> dict[str, torch.Tensor]:
    """The stored tensors of block `prefix` once quantized: the format's tensors for each module in
    `layers` (full name → `LayerResult`), every other tensor of the block as it is (CPU)."""
    out = {}
    quantized = {name[len(prefix) + 1:] for name in layers}
    for rel, t in block.state_dict().items():
        if rel.endswith(".weight") and rel[: -len(".weight")] in quantized:
            continue
        out[f"{prefix}.{rel}"] = t.detach().cpu().contiguous()
    for name in sorted(layers):
        out.update(fmt.layer_tensors(name, block.get_submodule(name[len(prefix) + 1:]), layers[name]))
    return out


CHECKPOINT_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)\s*$")


def checkpoint_policy(value) -> tuple[int, float]:
    """`(blocks, seconds)` from `output.checkpoint_every`: an integer counts blocks (0: never), a string
    such as `5m`, `300s` or `1h` is a time."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, 0.0
    m = CHECKPOINT_EVERY.match(str(value))
    scale = {"s": 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
    return 0, float(m.group(1)) * scale

"""What every checkpoint format shares: the `Format` interface, the linear modules' shapes, the
model's tensors, safetensors shards, `config.json`, and publishing a finished folder in one rename."""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import torch

from ..errors import InputError
from ..experts import unfuse

SAFETENSORS_METADATA = {"format": "pt"}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


class Format:
    """A checkpoint format, registered by name through the `register_formats` hook.

    `check` refuses, before any calibration, what the format cannot store. Writing goes in three
    steps, which `save` runs for a model in memory and a streamed run (`streaming.py`) runs block by
    block: `begin` (what the format needs to know of the whole run), `layer_tensors` (the stored
    tensors of one quantized module, replacing its weight) and `write_config` (config.json and the
    format's own files). `detect` says whether a checkpoint's `config.json` (as a dict) is in this
    format; `load` reads one back as a transformers model with dequantized weights.
    """

    name: str = ""

    def check_quant(self, quant) -> None:
        """Raise `InputError` when the `quant` section (a `QuantSpec`) asks for what the format cannot store."""

    def check(self, model, layer_names, quant) -> None:
        """Raise `InputError` when a module in `layer_names` of `model` cannot be stored with `quant`."""
        self.check_quant(quant)
        modules = dict(model.named_modules())
        for name in layer_names:
            if name not in modules:
                raise InputError(f"layer '{name}' is not a module of {type(model).__name__}")
            layer_shape(name, modules[name])

    def begin(self, model, quantized: set, quant) -> None:
        """Before the first module's tensors: `quantized` names every module that will be stored
        quantized, `quant` is the run's `QuantSpec`. `model` may hold its weights on the meta device."""
        self.quantized, self.quant = set(quantized), quant

    def layer_tensors(self, name: str, module, res) -> dict[str, torch.Tensor]:
        """The tensors (CPU) that store module `name` of the model, quantized as `res` (`LayerResult`),
        in place of its `weight`."""
        raise NotImplementedError

    def write_config(self, model, folder: str, untie: bool, provenance: dict) -> None:
        """`config.json` and the format's other files; `untie`: a quantized weight was tied to one that
        stays in full precision, so the checkpoint stores both; `provenance`: what to record of how the
        codes were found (the objective and decoder, as text)."""
        raise NotImplementedError

    def save(self, model, layers: dict, folder: str, quant, max_shard_size: int, provenance: dict) -> None:
        """Write `model` with the quantized `layers` (module name → `LayerResult`) into `folder`: every
        other tensor of the model as it is, each layer's `layer_tensors`, then `write_config`
        (publishing the folder is the caller's)."""
        self.begin(model, set(layers), quant)
        modules = dict(model.named_modules())
        untie = quantized_tied(model, layers)
        tensors = {k: v for k, v in state_dict(model).items()
                   if not (k.endswith(".weight") and k[: -len(".weight")] in layers)}
        for name in sorted(layers):
            tensors.update(self.layer_tensors(name, modules[name], layers[name]))
        write_safetensors(tensors, folder, max_shard_size)
        self.write_config(model, folder, untie, provenance)

    def detect(self, config: dict) -> bool:
        """Whether `config` (a checkpoint's parsed config.json) is written in this format."""
        raise NotImplementedError

    def load(self, path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
        """`(model, info)`: the checkpoint in `path` with dequantized weights, and what the format knows
        about it (`info["quantization_config"]`, format-specific entries)."""
        raise NotImplementedError


# --- modules --------------------------------------------------------------------------------------

def is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def layer_shape(name: str, module) -> tuple[int, int]:
    """`(m, n)` = (outputs, inputs) of a linear module (nn.Linear stores `(m, n)`, Conv1D `(n, m)`)."""
    w = getattr(module, "weight", None)
    if w is None or w.ndim != 2:
        raise InputError(f"layer '{name}': {type(module).__name__} has no 2-D weight; only linear layers are packed")
    if is_conv1d(module):
        return w.shape[1], w.shape[0]
    if isinstance(module, torch.nn.Linear):
        return tuple(w.shape)
    raise InputError(f"layer '{name}': {type(module).__name__} is not nn.Linear or Conv1D")


def as_module_weight(module, W: torch.Tensor) -> torch.Tensor:
    """A `(m, n)` weight in the module's own layout and dtype."""
    return (W.T if is_conv1d(module) else W).contiguous().to(module.weight.dtype)


# --- writing ----------------------------------------------------------------------------------------

def state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, one name per storage (tied weights are saved once)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.device.type == "meta":
            raise InputError(f"tensor '{k}' is on the meta device; load the model's weights before saving")
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def quantized_tied(model, layers) -> bool:
    """Whether a quantized module's weight is also a weight that stays in full precision: the same
    storage, or, for weights on the meta device (a streamed run), the same parameter."""
    def key(p):
        return id(p) if p.device.type == "meta" else p.untyped_storage().data_ptr()
    params = [(n[: -len(".weight")], p) for n, p in model.named_parameters(remove_duplicate=False)
              if n.endswith(".weight")]
    quantized = {key(p) for n, p in params if n in layers}
    return any(key(p) in quantized for n, p in params if n not in layers)


MAX_SHARD_BYTES = 2 * 2**30     # a safetensors file holds at most this much (one tensor larger gets a file alone)


class ShardWriter:
    """Safetensors files written as tensors arrive: `add` appends a dict of tensors (its names sorted)
    to the current shard, which is written once the next tensor would take it past `max_shard_size`;
    `close` writes the last one and names them: `model.safetensors` when there is one,
    `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json` otherwise. Given the whole
    model in one `add`, the files are those of one sorted pass over its names.

    Only the shard being filled is held in memory. `written` (file names in order, each with its tensor
    names) and `pending` (the tensors not yet written) are what a resumed run needs to continue
    (`state`, `restore`)."""

    def __init__(self, folder: str, max_shard_size: Optional[int] = None):
        self.folder = folder
        self.max_shard_size = MAX_SHARD_BYTES if max_shard_size is None else max_shard_size
        self.written: list[tuple[str, list[str]]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total = 0

    @staticmethod
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in sorted(tensors):
            if k in self.pending or any(k in names for _, names in self.written):
                raise ValueError(f"tensor {k!r} written twice")
            size = self.nbytes(tensors[k])
            if self.pending and self.pending_bytes + size > self.max_shard_size:
                self._flush()
            self.pending[k] = tensors[k].detach().cpu().contiguous()
            self.pending_bytes += size
            self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file
        name = f"model-{len(self.written) + 1:05d}.safetensors.part"
        save_file(self.pending, os.path.join(self.folder, name), metadata=SAFETENSORS_METADATA)
        self.written.append((name, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and give every shard its final name; returns the file names."""
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            os.replace(os.path.join(self.folder, self.written[0][0]), os.path.join(self.folder, WEIGHTS_NAME))
            return [WEIGHTS_NAME]
        weight_map, files = {}, []
        for i, (part, names) in enumerate(self.written):
            fname = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.replace(os.path.join(self.folder, part), os.path.join(self.folder, fname))
            weight_map.update({k: fname for k in names})
            files.append(fname)
        write_json(os.path.join(self.folder, INDEX_NAME), {"metadata": {"total_size": self.total}, "weight_map": weight_map})
        return files

    def state(self) -> dict:
        """What `restore` needs, beside the pending tensors (saved by the caller)."""
        return {"written": [[f, names] for f, names in self.written], "total": self.total,
                "max_shard_size": self.max_shard_size}

    def restore(self, state: dict, pending: dict[str, torch.Tensor]) -> None:
        for f, _ in state["written"]:
            if not os.path.isfile(os.path.join(self.folder, f)):
                raise InputError(f"{os.path.join(self.folder, f)}: a shard of the saved run is missing")
        self.written = [(f, list(names)) for f, names in state["written"]]
        self.total, self.max_shard_size = state["total"], state["max_shard_size"]
        self.pending = dict(pending)
        self.pending_bytes = sum(self.nbytes(t) for t in pending.values())


def write_safetensors(tensors: dict[str, torch.Tensor], folder: str, max_shard_size: int) -> None:
    """`model.safetensors`, or shards `model-0000i-of-0000N.safetensors` with an index, names sorted."""
    writer = ShardWriter(folder, max_shard_size)
    writer.add(tensors)
    writer.close()


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_config(model, folder: str, quantization: Optional[dict], untie: bool) -> None:
    """`config.json` (with `quantization_config` when given) and the generation config."""
    cfg = copy.deepcopy(model.config)
    if getattr(cfg, "architectures", None) is None:
        cfg.architectures = [type(model).__name__]
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if quantization is not None:
        cfg.quantization_config = quantization
    if untie:
        cfg.tie_word_embeddings = False
    cfg.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(folder)


# --- publishing ---------------------------------------------------------------------------------------

def check_target(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output {out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise InputError(f"output {out_dir}: exists and is not empty; choose another folder or overwrite it "
                         f"(--overwrite, output.overwrite: true)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise InputError(f"output {out_dir}: parent folder {parent} does not exist")


def extra_path(folder: str, rel: str) -> str:
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm.startswith("..") or norm in (".", ""):
        raise InputError(f"extra file name {rel!r}: give a relative path inside the output folder")
    return os.path.join(folder, norm)


def temporary_folder(out_dir: str) -> str:
    """An empty sibling folder of `out_dir` to write into before `publish`, named after this process
    (`.NAME.tmp-PID-…`) so that a later run can tell a killed run's leftover from a live one."""
    target = os.path.abspath(out_dir)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-{os.getpid()}-", dir=os.path.dirname(target))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(out_dir: str) -> list[str]:
    """Remove the temporary siblings of `out_dir` left by runs that were killed (their process is gone);
    returns their paths. Folders of a run still writing are kept."""
    target = os.path.abspath(out_dir)
    parent, base = os.path.dirname(target), os.path.basename(target)
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m = re.fullmatch(rf"\.{re.escape(base)}\.(?:tmp|old)-(\d+)-.*", name)
        if m and not _alive(int(m.group(1))) and os.path.isdir(os.path.join(parent, name)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap the folders `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or file system has no such call."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def publish(tmp: str, out_dir: str) -> None:
    """Move the finished `tmp` folder to `out_dir`. An existing `out_dir` is swapped with `tmp` in one
    step and the old folder (now at `tmp`) removed, so `out_dir` always holds a complete checkpoint,
    the old or the new; where the system cannot swap, the old folder is first moved aside."""
    if not os.path.isdir(out_dir):
        os.replace(tmp, out_dir)
    elif exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        target = os.path.abspath(out_dir)
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-{os.getpid()}-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------------

def read_json(path: str) -> dict:
    """A JSON file holding an object (config.json, an index, a tokenizer file); a file that does not
    parse is an `InputError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:120]}); "
                         f"restore the file or save the model again") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def read_config(path: str) -> dict:
    """A checkpoint folder's `config.json` as a dict."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise InputError(f"{path}: not a checkpoint folder (no config.json)")
    return read_json(cfg_path)


def check_safetensors(file: str) -> None:
    """Read the header of a safetensors `file`: a truncated, corrupt or non-safetensors file is an
    `InputError` naming it (the tensor data itself is read when the model loads)."""
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
    except Exception as exc:                      # safetensors raises its own error types
        why = " ".join(str(exc).split())[:120]
        raise InputError(f"{file}: not a readable safetensors file ({why}); the file is truncated, corrupt "
                         f"or in another format: copy or save it again") from None


def weight_files(path: str) -> list[str]:
    """The weight files of a model folder, checked: `model.safetensors`, the shards of
    `model.safetensors.index.json`, or `pytorch_model.bin` (or its shards). A folder without weights,
    a missing shard, an unreadable safetensors header or a `.bin` that is not a torch archive is an
    `InputError` naming the file."""
    import zipfile
    for index_name, single in ((INDEX_NAME, WEIGHTS_NAME), (BIN_INDEX_NAME, BIN_NAME)):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map \
                    or not all(isinstance(v, str) for v in weight_map.values()):
                raise InputError(f"{index}: no 'weight_map' of tensor names to files")
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not os.path.isfile(f):
                    raise InputError(f"{index}: names {os.path.basename(f)}, which is not in the folder")
            break
        if os.path.isfile(os.path.join(path, single)):
            files = [os.path.join(path, single)]
            break
    else:
        raise InputError(f"{path}: no weights in the folder (no {WEIGHTS_NAME}, {INDEX_NAME} or {BIN_NAME}); "
                         f"save the model with save_pretrained")
    for f in files:
        if f.endswith(".safetensors"):
            check_safetensors(f)
        elif not zipfile.is_zipfile(f):
            raise InputError(f"{f}: not a torch checkpoint archive; the file is truncated or corrupt")
    return files


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (`model.safetensors` or its shards)."""
    from safetensors.torch import load_file
    files = weight_files(path)
    out = {}
    for file in files:
        if not file.endswith(".safetensors"):
            raise InputError(f"{file}: quantized checkpoints are read from safetensors files only")
        try:
            out.update(load_file(file))
        except Exception as exc:
            raise InputError(f"{file}: cannot read safetensors ({exc})") from None
    return out


def _model_class(config):
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in arch or "LMHead" in arch:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def empty_model(path: str, dtype: Optional[torch.dtype] = None):
    """`(model, quantization_config)`: the transformers model of the checkpoint in `path`, built from its
    config with freshly initialised weights, fused experts split into one module per expert
    (`experts.unfuse`); `dtype` defaults to the config's, else float32."""
    import transformers
    path = os.fspath(path)
    read_config(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{os.path.join(path, 'config.json')}: not a transformers model config "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is None:
        dtype = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
        dtype = dtype or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, torch.float32)
    cls = _model_class(config)
    model = (cls._from_config(config, dtype=dtype) if hasattr(cls, "_from_config")
             else cls.from_config(config, dtype=dtype))
    unfuse(model)                                  # experts stored one module each, as ojbkq writes them
    return model, qc


def load_state(model, tensors: dict[str, torch.Tensor], path: str, replaced: set = frozenset()) -> None:
    """Load `tensors` into `model`; every model tensor must come from them (or share storage with one
    that does), except the names in `replaced`, which the format fills itself."""
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise InputError(f"{path}: tensors the model does not have: {', '.join(result.unexpected_keys[:5])}")
    sd = model.state_dict()
    loaded_ptrs = {sd[k].untyped_storage().data_ptr() for k in tensors}
    missing = [k for k in result.missing_keys
               if k not in replaced and sd[k].untyped_storage().data_ptr() not in loaded_ptrs]
    if missing:
        raise InputError(f"{path}: missing tensors: {', '.join(missing[:5])}")


def load_packed(path: str, dtype: Optional[torch.dtype], names: tuple[str, ...]):
    """`(model, quantization_config, packed)` for a packed checkpoint: the model with every full-precision
    tensor loaded, and for each module storing `<module>.<names[0]>` the tensors `<module>.<name>` it
    stores (the format turns them into the module's weight)."""
    model, qc = empty_model(path, dtype)
    tensors = read_tensors(path)
    first = "." + names[0]
    qnames = sorted(k[: -len(first)] for k in tensors if k.endswith(first))
    packed = {n: {s: tensors.pop(f"{n}.{s}") for s in names if f"{n}.{s}" in tensors} for n in qnames}
    load_state(model, tensors, path, replaced={f"{n}.weight" for n in qnames})
    modules = dict(model.named_modules())
    for name in qnames:
        if name not in modules:
            raise InputError(f"{path}: packed module {name} is not part of {type(model).__name__}")
    return model, qc, packed

"""The run specification: what `ojbkq quantize`, `quantize()`, `ojbkq compare` and `ojbkq gaps` run.

A recipe (a built-in name, or a YAML/TOML/JSON file: docs/interfaces.md "Run configuration") is merged
over the defaults section by section, `--set section.key=value` overrides (or, from Python, a mapping of
the same dotted keys) are applied, and every value is checked once, where it enters, before any model
loads. The result is a `RunSpec` of typed sections:

    RunSpec
      model        ModelSpec         path, dtype, adapter, trust_remote_code
      calibration  CalibrationSpec   dataset, path, samples, seqlen, seed, text_field, stats_dtype
      quant        QuantSpec         the grid (bits, group_size, sym, act_order, static_groups,
                                     scale_method), damp, true_sequential, skip, moe_min_tokens,
                                     moe_fallback
      rotation     RotationSpec      residual (R1) and heads (R2) rotations folded into the weights, seed
      objective    ObjectiveChoice   the decoded objective (sampled parameters drawn per layer) and
                                     the one candidates are scored by
      decoder      DecoderSpec       name, seed, options and the backend, resolved to one implementation
      device       str               auto, cpu, cuda or cuda:N (and `target`, the device it resolves to)
      output       OutputSpec        dir, format, overwrite
      eval         EvalSpec          perplexity sources, path, seqlen, samples

Each default is the default of its dataclass field (`DEFAULTS` is read from them). `RunSpec.to_dict()`
is the resolved recipe, written beside a checkpoint as `ojbkq_config.yaml`; reading it back gives the
same spec. Errors are `InputError`s naming the key, e.g. `quant.bits=9: ...` or
`unknown key 'quant.bitz' (did you mean 'quant.bits'?)`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

from .config import dump_yaml, parse_override, read_recipe
from .decoders.base import Decoder
from .errors import InputError
from .errors import suggest as _suggest
from .grid import GRIDS, SCALE_METHODS, QuantSpec
from .objectives import Objective, ObjectiveSpec, from_terms

# device: bfloat16 on a GPU or a CPU that computes it natively, else float32 (precision.py); auto: the checkpoint's
DTYPES = ("device", "bfloat16", "float16", "float32", "auto")
# accumulation dtype of the calibration statistics; auto: float64 in a distributed run, else float32
STATS_DTYPES = ("auto", "float32", "float64")


# --- the sections ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """The model to quantize: a local folder or hub name, the dtype it runs in during calibration
    (`device`: bfloat16 on a GPU or a CPU with native bfloat16, else float32, `precision.resolve_dtype`;
    `auto`: the checkpoint's), the adapter (`auto`: recognised by module structure). `stream`: read
    the weights one block at a time and write the checkpoint as blocks finish (streaming.py); `auto`
    streams a local safetensors folder, its evaluation included (evaluation.py)."""

    path: Optional[str] = None
    dtype: str = "device"
    adapter: str = "auto"
    trust_remote_code: bool = False
    stream: Union[str, bool] = "auto"


@dataclass(frozen=True)
class CalibrationSpec:
    """`samples` windows of `seqlen` tokens at seeded random starts in the text of `dataset` (a name of
    ojbkq_core.data) or of the local files `path`; `stats_dtype` is the accumulation dtype of `H`, `C`, `G`."""

    dataset: str = "wikitext2"
    path: Union[None, str, tuple] = None
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    text_field: str = "text"
    stats_dtype: str = "auto"

    def ids(self, tokenizer):
        """The calibration windows, int64 `(samples, seqlen)`."""
        from .data import calibration_ids
        return calibration_ids(tokenizer, self)

    def accumulation_dtype(self, distributed: bool):
        """`stats_dtype` as a torch dtype; `auto` is float64 in a distributed run (sums independent of the
        split), else float32."""
        import torch
        name = self.stats_dtype if self.stats_dtype != "auto" else ("float64" if distributed else "float32")
        return getattr(torch, name)


@dataclass(frozen=True)
class ObjectiveChoice:
    """The decoded objective (`decoded.build(rng)` draws a layer's sampled parameters) and, when
    `score` is set, the fixed objective by which a decoder's candidates are chosen."""

    decoded: ObjectiveSpec
    score: Optional[ObjectiveSpec] = None

    DEFAULT = {"name": "jta"}

    def scoring(self) -> Optional[Objective]:
        return None if self.score is None else self.score.build(None)[0]

    def to_dict(self) -> dict:
        out = _resolved(self.decoded)
        if self.score is not None:
            out["score"] = _resolved(self.score)
        return out


@dataclass(frozen=True)
class DecoderSpec:
    """A registered decoder with its checked `options` (every parameter spelled out), the seed of its
    draws, the `backend` asked for and the `decoder` it resolved to on the run's device."""

    name: str
    seed: int
    options: dict
    backend: str
    decoder: Decoder = field(compare=False)

    DEFAULT = {"name": "babai", "seed": 0}
    DEFAULT_BACKEND = "auto"

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, **self.options}


@dataclass(frozen=True)
class OutputSpec:
    """Where the checkpoint goes, in which registered format, and whether an existing folder is replaced.
    `checkpoint_every`: how often a streamed run saves the state `--resume` continues from: a number of
    blocks (0: never) or a time (`5m`, `300s`, `1h`)."""

    dir: str = "./out"
    format: str = "gptq"
    overwrite: bool = False
    checkpoint_every: Union[str, int] = "5m"

    def prepare(self) -> None:
        """Check that the output folder can be written, and create its missing parents: `InputError` for
        a file in its place, a non-empty folder without `overwrite`, or a parent that cannot be written."""
        d = self.dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise InputError(f"output.dir={d!r} is a file; name a folder")
        if os.path.isdir(d) and os.listdir(d) and not self.overwrite:
            raise InputError(f"output.dir={d!r} exists and is not empty: choose another folder or "
                             f"replace it with --overwrite (output.overwrite: true)")
        parent = os.path.dirname(os.path.abspath(d))
        existing = parent
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not a folder" if not os.path.isdir(existing) else "cannot be written"
            raise InputError(f"output.dir={d!r}: {existing} {what}; choose an output folder you can write")
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise InputError(f"output.dir={d!r}: cannot create {parent} ({exc.strerror})") from None


@dataclass(frozen=True)
class EvalSpec:
    """Perplexity before and after quantizing: the dataset names in `perplexity` (`text` reads `path`),
    windows of `seqlen` tokens, at most `samples` of them (None: all)."""

    perplexity: tuple = ()
    path: Union[None, str, tuple] = None
    seqlen: int = 2048
    samples: Optional[int] = None

    def sources(self) -> list[tuple[str, Optional[object]]]:
        """`(label, local path or None)` for each source: `text` (added when only `path` is given) reads
        `path`, other names are datasets."""
        names = list(self.perplexity)
        if self.path and "text" not in names:
            names.append("text")
        return [(n, self.path if n == "text" else None) for n in names]


@dataclass(frozen=True)
class RotationSpec:
    """Orthogonal rotations folded into the weights before calibration (rotation.py): `residual` (R1) rotates
    the residual stream by a randomized Hadamard matrix (`hadamard`, a seeded random orthogonal one where the
    width has no Hadamard construction) or a seeded random orthogonal matrix (`random`); `heads` (R2) rotates
    each attention head's values and the output projection by a head-width Hadamard. `none` leaves them."""

    residual: str = "none"
    heads: str = "none"
    seed: int = 0

    RESIDUAL = ("none", "hadamard", "random")
    HEADS = ("none", "hadamard")

    @property
    def on(self) -> bool:
        return self.residual != "none" or self.heads != "none"


SECTIONS = {"model": ModelSpec, "calibration": CalibrationSpec, "quant": QuantSpec, "rotation": RotationSpec,
            "output": OutputSpec, "eval": EvalSpec}


def _field_defaults(cls) -> dict:
    """A section's keys (in `cls.KEYS` order where the class names them) with their dataclass defaults."""
    fields = {f.name: ([] if f.default == () else f.default) for f in dataclasses.fields(cls)}
    return {k: fields[k] for k in getattr(cls, "KEYS", fields)}


# the sections of a recipe with their defaults, each read from its dataclass
DEFAULTS: dict = {
    "model": _field_defaults(ModelSpec),
    "calibration": _field_defaults(CalibrationSpec),
    "quant": _field_defaults(QuantSpec),
    "rotation": _field_defaults(RotationSpec),
    "objective": dict(ObjectiveChoice.DEFAULT),
    "decoder": dict(DecoderSpec.DEFAULT),
    "backend": DecoderSpec.DEFAULT_BACKEND,
    "device": "auto",
    "output": _field_defaults(OutputSpec),
    "eval": _field_defaults(EvalSpec),
}
# sections whose keys are fixed; `objective` and `decoder` take the parameters of what they name
FIXED = ("model", "calibration", "quant", "rotation", "output", "eval")
SCALARS = ("backend", "device")


@dataclass(frozen=True)
class RunSpec:
    """A whole run, checked. `target` is the device `device` resolves to (`auto`: cuda when available);
    `source` names the recipe it was read from."""

    model: ModelSpec
    calibration: CalibrationSpec
    quant: QuantSpec
    objective: ObjectiveChoice
    decoder: DecoderSpec
    device: str
    output: OutputSpec
    eval: EvalSpec
    rotation: RotationSpec = RotationSpec()
    target: str = "cpu"
    source: str = field(default="", compare=False)

    @property
    def dtype(self) -> str:
        """The dtype the model runs in on `target`: `model.dtype` with `device` resolved (precision.py)."""
        from .precision import resolve_dtype
        return resolve_dtype(self.model.dtype, self.target)

    def to_dict(self) -> dict:
        """The resolved recipe (sections in `DEFAULTS` order); `spec_from_dict` reads it back."""
        plain = lambda s: {k: (list(v) if isinstance(v, tuple) else v)  # noqa: E731
                           for k, v in dataclasses.asdict(s).items()}
        return {"model": plain(self.model), "calibration": plain(self.calibration), "quant": self.quant.to_dict(),
                "rotation": plain(self.rotation), "objective": self.objective.to_dict(), "decoder": self.decoder.to_dict(),
                "backend": self.decoder.backend, "device": self.device, "output": plain(self.output),
                "eval": plain(self.eval)}

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict(), order=DEFAULTS)

    def with_overrides(self, overrides: Union[Iterable[str], Mapping[str, Any]]) -> "RunSpec":
        """This spec with more overrides, checked again."""
        return spec_from_dict(self.to_dict(), overrides, where=self.source or "spec")


# --- building one ---------------------------------------------------------------------------------

def load_spec(recipe: Union[str, os.PathLike, Mapping], overrides: Union[Iterable[str], Mapping[str, Any]] = ()
              ) -> RunSpec:
    """The `RunSpec` of `recipe` — a built-in recipe's name (`ojbkq recipes`), a .yaml/.yml/.toml/.json
    file, or a mapping of sections — with `overrides`: `section.key=value` strings (as `--set` takes
    them) or a mapping `{"section.key": value}`. Errors name the recipe and the key."""
    if isinstance(recipe, Mapping):
        return spec_from_dict(recipe, overrides, where="recipe")
    path = recipe_path(os.fspath(recipe))
    return spec_from_dict(read_recipe(path), overrides, where=os.fspath(recipe))


def recipes() -> dict[str, str]:
    """Name → file of every registered recipe (`register_recipes`: the built-in ones and plugins')."""
    from .registry import get_registry
    return {name: e.obj for name, e in get_registry().recipes.items()}


def recipe_path(recipe: str) -> str:
    """The file of `recipe`: a registered name, or a path to a .yaml/.yml/.toml/.json file."""
    if os.path.splitext(recipe)[1] or os.sep in recipe or os.path.exists(recipe):
        return recipe                                 # a file: reading it reports what is wrong with it
    known = recipes()
    if recipe in known:
        return known[recipe]
    raise InputError(f"{recipe}: no recipe of that name{_suggest(recipe, known)} and no such file; "
                     f"recipes: {', '.join(known)} (or give a .yaml, .toml or .json file)")


def spec_from_dict(data: Mapping, overrides: Union[Iterable[str], Mapping[str, Any]] = (), where: str = "recipe"
                   ) -> RunSpec:
    """Merge `data` over `DEFAULTS`, apply `overrides`, check every section and build the `RunSpec`."""
    label = f"{where} (with --set)" if overrides else where
    try:
        pairs = _override_pairs(overrides)
        cfg = _merge(data)
        apply_overrides(cfg, pairs)
        return _build(cfg, where)
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None


def _override_pairs(overrides) -> list[tuple[str, Any, str]]:
    """`(dotted key, value, as written)` from `--set` strings or a mapping of dotted keys to values."""
    if isinstance(overrides, Mapping):
        return [(str(k), v, f"{k}={v!r}") for k, v in overrides.items()]
    out = []
    for text in overrides or ():
        key, value = parse_override(text)
        out.append((key, value, text))
    return out


def _unknown_section(name: str) -> InputError:
    return InputError(f"unknown section '{name}'{_suggest(name, DEFAULTS)}; sections: {', '.join(DEFAULTS)}")


def _merge(data: Mapping) -> dict:
    """`data` over `DEFAULTS`, one section at a time."""
    cfg = copy.deepcopy(DEFAULTS)
    for section, value in data.items():
        if section not in DEFAULTS:
            raise _unknown_section(section)
        if section in SCALARS:
            cfg[section] = value
            continue
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise InputError(f"{section}={value!r}: the section must be a mapping of keys")
        value = copy.deepcopy(dict(value))
        if section == "objective" and ("name" in value or "terms" in value):
            cfg[section] = value                          # a different objective: none of the defaults apply
        elif section == "decoder" and "name" in value and value["name"] != cfg["decoder"]["name"]:
            cfg[section] = {"name": value["name"], "seed": cfg["decoder"]["seed"], **value}
        else:
            cfg[section].update(value)
    return cfg


def apply_overrides(cfg: dict, pairs: Iterable[tuple[str, Any, str]]) -> dict:
    """Apply `(section.key, value, as written)` overrides in place; nested keys use more dots."""
    for key, value, text in pairs:
        parts = key.split(".")
        section = parts[0]
        if section not in DEFAULTS or not all(parts):
            raise _unknown_section(section) if section not in DEFAULTS else \
                InputError(f"--set {text!r}: empty key in {key!r}")
        if section in SCALARS:
            if len(parts) != 1:
                raise InputError(f"--set {text!r}: '{section}' is a single value; use --set {section}=VALUE")
            cfg[section] = value
            continue
        if len(parts) == 1:
            raise InputError(f"--set {text!r}: name a key of the section, e.g. --set {section}.KEY=VALUE")
        if section in ("objective", "decoder") and parts[1:] == ["name"] and value != cfg[section].get("name"):
            # another objective or decoder: the parameters of the previous one no longer apply
            keep = ("seed",) if section == "decoder" else ("score",)
            cfg[section] = {"name": value, **{k: v for k, v in cfg[section].items() if k in keep}}
            continue
        node = cfg[section]
        for p in parts[1:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return cfg


# --- checking each section ------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys(sec: dict, section: str) -> None:
    allowed = list(DEFAULTS[section])
    for k in sec:
        if k not in allowed:
            raise InputError(f"unknown key '{section}.{k}'{_suggest(str(k), allowed, section + '.')}; "
                             f"keys of '{section}': {', '.join(allowed)}")


def _int(sec, section, key, lo: int = 1, allow_none: bool = False) -> None:
    v = sec[key]
    if v is None and allow_none:
        return
    if not _is_int(v) or v < lo:
        extra = " or null" if allow_none else ""
        raise InputError(f"{section}.{key}={v!r}: must be an integer ≥ {lo}{extra}")


def _bool(sec, section, key) -> None:
    if not isinstance(sec[key], bool):
        raise InputError(f"{section}.{key}={sec[key]!r}: must be true or false")


def _choice(sec, section, key, choices) -> None:
    v = sec[key]
    if v not in choices:
        raise InputError(f"{section}.{key}={v!r}: choose one of {', '.join(map(str, choices))}"
                         f"{_suggest(str(v), choices) if isinstance(v, str) else ''}")


def _str(sec, section, key) -> None:
    v = sec[key]
    if not isinstance(v, str) or not v:
        raise InputError(f"{section}.{key}={v!r}: must be a non-empty string")


def _names(sec, section, key) -> tuple:
    """A list of names, or one comma-separated string, as a tuple."""
    v = sec[key]
    if v is None:
        v = []
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise InputError(f"{section}.{key}={v!r}: must be a list of names (or one comma-separated string)")
    return tuple(v)


def _paths(sec, section, key):
    """`null`, one path or a list of paths (a tuple), each of which must exist."""
    v = sec[key]
    if v is None:
        return None
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    if not items or not all(isinstance(p, str) and p for p in items):
        raise InputError(f"{section}.{key}={v!r}: must be null, a path, or a list of paths")
    for p in items:
        if not os.path.exists(p):
            raise InputError(f"{section}.{key}={p!r}: no such file or folder")
    return tuple(v) if isinstance(v, (list, tuple)) else v


def model_section(sec: dict) -> ModelSpec:
    _check_keys(sec, "model")
    if sec["path"] in (None, ""):
        raise InputError("model.path is required: a local folder or hub name "
                         "(in the config, or with --set model.path=./my-model)")
    if not isinstance(sec["path"], str):
        raise InputError(f"model.path={sec['path']!r}: must be a string (a folder or hub name)")
    _choice(sec, "model", "dtype", DTYPES)
    _str(sec, "model", "adapter")
    _bool(sec, "model", "trust_remote_code")
    if not (isinstance(sec["stream"], bool) or sec["stream"] == "auto"):
        raise InputError(f"model.stream={sec['stream']!r}: choose auto, true or false")
    if sec["adapter"] != "auto":
        from .registry import get_registry
        try:
            get_registry().adapter(sec["adapter"])
        except InputError as exc:
            raise InputError(f"model.adapter={sec['adapter']!r}: {exc}") from None
    return ModelSpec(**sec)


def calibration_section(sec: dict) -> CalibrationSpec:
    _check_keys(sec, "calibration")
    _str(sec, "calibration", "dataset")
    path = _paths(sec, "calibration", "path")
    if sec["dataset"] == "text" and path is None:
        raise InputError("calibration.dataset='text' reads local files: set calibration.path to a file, "
                         "a list of files or a folder")
    for key in ("samples", "seqlen"):
        _int(sec, "calibration", key)
    _int(sec, "calibration", "seed", lo=0)
    _str(sec, "calibration", "text_field")
    _choice(sec, "calibration", "stats_dtype", STATS_DTYPES)
    return CalibrationSpec(**{**sec, "path": path})


def quant_section(sec: dict) -> QuantSpec:
    _check_keys(sec, "quant")
    for k in ("sym", "act_order", "static_groups", "true_sequential"):
        _bool(sec, "quant", k)
    if not _is_num(sec["damp"]) or sec["damp"] < 0:
        raise InputError(f"quant.damp={sec['damp']!r}: must be a number ≥ 0 (fraction of mean diag H, e.g. 0.01)")
    _choice(sec, "quant", "scale_method", SCALE_METHODS)
    _choice(sec, "quant", "grid", GRIDS)
    return QuantSpec(**{**sec, "skip": _names(sec, "quant", "skip")})      # GridSpec checks bits and group_size


def _objective_spec(sec, where: str) -> ObjectiveSpec:
    """An `ObjectiveSpec` from `{name, ...params}` or `{terms: [...]}`; `where` prefixes key names."""
    from .registry import get_registry
    if not isinstance(sec, Mapping):
        raise InputError(f"{where}={sec!r}: must be a mapping such as {{name: symmetric}}")
    params = {k: v for k, v in sec.items() if k not in ("name", "terms", "score")}
    if "terms" in sec:
        if sec.get("name", "terms") != "terms" or params:
            extra = ", ".join(sorted(params)) or f"name={sec.get('name')!r}"
            raise InputError(f"{where}: 'terms' defines the objective by itself; remove {extra}")
        try:
            return from_terms(sec["terms"])
        except InputError as exc:
            raise InputError(f"{where}.terms: {exc}") from None
    name = sec.get("name")
    reg = get_registry()
    if not isinstance(name, str) or name not in reg.objectives:
        raise InputError(f"{where}.name={name!r}: unknown objective{_suggest(str(name), reg.objectives)}; "
                         f"registered: {', '.join(sorted(reg.objectives))}, or give terms: [{{w, a, b}}, ...]")
    schema = reg.objectives[name].extra["schema"]
    for k in params:
        if k not in schema:
            allowed = ", ".join(sorted(schema)) or "none"
            raise InputError(f"unknown key '{where}.{k}' for objective '{name}'"
                             f"{_suggest(str(k), schema, where + '.')}; its parameters: {allowed}")
    try:
        return reg.objective(name, params)
    except InputError as exc:
        raise InputError(str(exc) if where == "objective" else f"{where}: {exc}") from None


def _resolved(spec: ObjectiveSpec) -> dict:
    """An objective section with every parameter spelled out (distributions as their text)."""
    if spec.name == "terms":
        return {"terms": spec.params["terms"]}
    return {"name": spec.name, **{k: (v if isinstance(v, (int, float)) else str(v)) for k, v in spec.params.items()}}


def objective_section(sec) -> ObjectiveChoice:
    decoded = _objective_spec(sec, "objective")
    score = None
    if sec.get("score") is not None:
        score = _objective_spec(sec["score"], "objective.score")
        if score.sampled:
            raise InputError(f"objective.score.{score.sampled[0]}={sec['score'][score.sampled[0]]!r}: a scoring "
                             f"objective needs fixed parameters, not a distribution")
    return ObjectiveChoice(decoded, score)


def resolve_device(device) -> str:
    """`device` checked: `auto` is cuda when available, else cpu; cuda or cuda:N needs a CUDA device."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise InputError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return device
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise InputError(f"device={device!r}: CUDA is not available on this machine; use cpu or auto")
    return device


def decoder_section(sec: dict, backend, device: str) -> DecoderSpec:
    """The decoder of `sec` with its options checked, built once by `backend` for `device`."""
    from .registry import get_registry
    reg = get_registry()
    name = sec.get("name")
    if not isinstance(name, str) or name not in reg.decoders:
        raise InputError(f"decoder.name={name!r}: unknown decoder{_suggest(str(name), reg.decoders)}; "
                         f"registered: {', '.join(sorted(reg.decoders))}")
    if not _is_int(sec.get("seed")) or sec["seed"] < 0:
        raise InputError(f"decoder.seed={sec.get('seed')!r}: must be an integer ≥ 0")
    if not isinstance(backend, str) or not backend:
        raise InputError(f"backend={backend!r}: must be 'auto', 'reference' or the name of a registered backend")
    if backend not in ("auto", "reference"):
        known = sorted({b.plugin for b in reg.backends} | {b.obj.__name__ for b in reg.backends}
                       | {i.plugin for i in reg.primitives})
        if backend not in known:
            raise InputError(f"backend={backend!r}: no such registered backend{_suggest(backend, known)}; "
                             f"available: {', '.join(['auto', 'reference', *known])}")
    cls = reg.decoder_class(name)
    params = {k: v for k, v in sec.items() if k not in ("name", "seed")}
    for k in params:
        if k not in cls.params:
            allowed = ", ".join(sorted(cls.params)) or "none"
            raise InputError(f"unknown key 'decoder.{k}' for decoder '{name}'"
                             f"{_suggest(str(k), cls.params, 'decoder.')}; its parameters: {allowed}")
    decoder = reg.decoder(name, params, device=device, backend=backend)     # the parameters' own checks run here
    return DecoderSpec(name, sec["seed"], dict(decoder.options), backend, decoder)


def output_section(sec: dict, quant: QuantSpec) -> OutputSpec:
    _check_keys(sec, "output")
    _str(sec, "output", "dir")
    _str(sec, "output", "format")
    _bool(sec, "output", "overwrite")
    every = sec["checkpoint_every"]
    from .streaming import CHECKPOINT_EVERY
    if not ((_is_int(every) and every >= 0) or (isinstance(every, str) and CHECKPOINT_EVERY.match(every))):
        raise InputError(f"output.checkpoint_every={every!r}: a number of blocks (0: never) or a time such as "
                         f"5m, 300s or 1h")
    from .registry import get_registry
    get_registry().format(sec["format"])().check_quant(quant)
    return OutputSpec(**sec)


def eval_section(sec: dict) -> EvalSpec:
    _check_keys(sec, "eval")
    names = _names(sec, "eval", "perplexity")
    path = _paths(sec, "eval", "path")
    if "text" in names and path is None:
        raise InputError("eval.perplexity lists 'text': set eval.path to the local file(s) to evaluate on")
    _int(sec, "eval", "seqlen")
    _int(sec, "eval", "samples", allow_none=True)
    return EvalSpec(**{**sec, "perplexity": names, "path": path})


def rotation_section(sec: dict) -> RotationSpec:
    _check_keys(sec, "rotation")
    sec = {k: ("none" if v is None and k in ("residual", "heads") else v) for k, v in sec.items()}  # YAML's null
    _choice(sec, "rotation", "residual", RotationSpec.RESIDUAL)
    _choice(sec, "rotation", "heads", RotationSpec.HEADS)
    _int(sec, "rotation", "seed", lo=0)
    return RotationSpec(**sec)


def _build(cfg: dict, source: str) -> RunSpec:
    """Every section of a merged recipe checked and typed."""
    for section in cfg:
        if section not in DEFAULTS:
            raise _unknown_section(section)
    model = model_section(cfg["model"])
    calibration = calibration_section(cfg["calibration"])
    quant = quant_section(cfg["quant"])
    objective = objective_section(cfg["objective"])
    target = resolve_device(cfg["device"])
    decoder = decoder_section(cfg["decoder"], cfg["backend"], target)
    output = output_section(cfg["output"], quant)
    ev = eval_section(cfg["eval"])
    rotation = rotation_section(cfg["rotation"])
    return RunSpec(model, calibration, quant, objective, decoder, cfg["device"], output, ev, rotation=rotation,
                   target=target, source=source)

"""The run configuration of `ojbkq quantize` (INTERFACES.md "Run configuration").

A config is YAML, TOML or JSON with the sections of `DEFAULTS`. `load_config` reads it, merges it over
`DEFAULTS` section by section, applies `--set section.key=value` overrides and validates every value
where it enters, building the grid, objective and decoder once so that their own checks run. Errors
are `InputError`s that name the file and the key, e.g. `quant.bits=9: ...` or
`unknown key 'quant.bitz' (did you mean 'quant.bits'?)`.

The result is a plain dict (the resolved config); `build_grid`, `build_objective` and
`build_decoder` turn it into the objects `quantize_layer` takes, and `dump_config` writes it back.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
from typing import Any, Iterable, Optional

import numpy as np
import yaml

from .errors import InputError
from .grid import QUANT_DEFAULTS, SCALE_METHODS, GridSpec
from .objectives import Objective, ObjectiveSpec, from_terms

DTYPES = ("bfloat16", "float16", "float32", "auto")
# accumulation dtype of the calibration statistics; auto: float64 in a distributed run, else float32
STATS_DTYPES = ("auto", "float32", "float64")
EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}

DEFAULTS: dict = {
    "model": {"path": None, "dtype": "bfloat16", "adapter": "auto", "trust_remote_code": False},
    "calibration": {"dataset": "wikitext2", "path": None, "samples": 128, "seqlen": 2048, "seed": 0,
                    "text_field": "text", "stats_dtype": "auto"},
    "quant": QUANT_DEFAULTS,
    "objective": {"name": "jta"},
    "decoder": {"name": "babai", "seed": 0},
    "backend": "auto",
    "device": "auto",
    "output": {"dir": "./out", "format": "gptq", "overwrite": False},
    "eval": {"perplexity": [], "path": None, "seqlen": 2048, "samples": None},
}

# sections whose keys are fixed; `objective` and `decoder` take the parameters of what they name
FIXED = ("model", "calibration", "quant", "output", "eval")
SCALARS = ("backend", "device")
LIST_KEYS = {("quant", "skip"), ("eval", "perplexity")}


# --- reading ----------------------------------------------------------------------------------

def _read(path: str) -> dict:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(f"{path}: unknown config extension {ext!r}; use .yaml, .yml, .toml or .json")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such config file")
    kind = EXTENSIONS[ext]
    try:
        if kind == "yaml":
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        elif kind == "json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
    except (yaml.YAMLError, json.JSONDecodeError, ValueError, UnicodeDecodeError) as exc:
        msg = " ".join(str(exc).split())
        raise InputError(f"{path}: cannot parse as {kind.upper()}: {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _suggest(word: str, options: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _unknown_section(name: str) -> InputError:
    return InputError(f"unknown section '{name}'{_suggest(name, DEFAULTS)}; sections: {', '.join(DEFAULTS)}")


def _merge(data: dict) -> dict:
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
        if not isinstance(value, dict):
            raise InputError(f"{section}={value!r}: the section must be a mapping of keys")
        value = copy.deepcopy(value)
        if section == "objective" and ("name" in value or "terms" in value):
            cfg[section] = value                          # a different objective: none of the defaults apply
        elif section == "decoder" and "name" in value and value["name"] != cfg["decoder"]["name"]:
            cfg[section] = {"name": value["name"], "seed": cfg["decoder"]["seed"], **value}
        else:
            cfg[section].update(value)
    return cfg


def parse_value(text: str):
    """`KEY=VALUE` values: int, float, bool, or string, in that order."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _parse_override(text: str):
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected section.key=value (e.g. --set quant.bits=3)")
    key, raw = (s.strip() for s in text.split("=", 1))
    if raw[:1] in ("[", "{"):
        try:
            return key, yaml.safe_load(raw)
        except yaml.YAMLError:
            raise InputError(f"--set {text!r}: cannot read {raw!r} as a list or mapping") from None
    if raw.lower() in ("null", "none", "~"):
        return key, None
    return key, parse_value(raw)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply `section.key=value` (or `backend=value`) overrides in place; nested keys use more dots."""
    for text in overrides:
        key, value = _parse_override(text)
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


# --- validation -------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys(cfg: dict, section: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for k in cfg[section]:
        if k not in allowed:
            raise InputError(f"unknown key '{section}.{k}'{_suggest(str(k), allowed, section + '.')}; "
                             f"keys of '{section}': {', '.join(allowed)}")


def _int(cfg, section, key, lo: int = 1, allow_none: bool = False) -> None:
    v = cfg[section][key]
    if v is None and allow_none:
        return
    if not _is_int(v) or v < lo:
        extra = " or null" if allow_none else ""
        raise InputError(f"{section}.{key}={v!r}: must be an integer ≥ {lo}{extra}")


def _bool(cfg, section, key) -> None:
    v = cfg[section][key]
    if not isinstance(v, bool):
        raise InputError(f"{section}.{key}={v!r}: must be true or false")


def _choice(cfg, section, key, choices) -> None:
    v = cfg[section][key]
    if v not in choices:
        raise InputError(f"{section}.{key}={v!r}: choose one of {', '.join(map(str, choices))}"
                         f"{_suggest(str(v), choices) if isinstance(v, str) else ''}")


def _str(cfg, section, key) -> None:
    v = cfg[section][key]
    if not isinstance(v, str) or not v:
        raise InputError(f"{section}.{key}={v!r}: must be a non-empty string")


def _str_list(cfg, section, key) -> None:
    v = cfg[section][key]
    if v is None:
        v = []
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise InputError(f"{section}.{key}={v!r}: must be a list of names (or one comma-separated string)")
    cfg[section][key] = v


def _paths(cfg, section, key) -> None:
    """`null`, one path or a list of paths, each of which must exist."""
    v = cfg[section][key]
    if v is None:
        return
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(p, str) and p for p in items):
        raise InputError(f"{section}.{key}={v!r}: must be null, a path, or a list of paths")
    for p in items:
        if not os.path.exists(p):
            raise InputError(f"{section}.{key}={p!r}: no such file or folder")


def _validate_model(cfg) -> None:
    sec = cfg["model"]
    _check_keys(cfg, "model", DEFAULTS["model"])
    if sec["path"] in (None, ""):
        raise InputError("model.path is required: a local folder or hub name "
                         "(in the config, or with --set model.path=./my-model)")
    if not isinstance(sec["path"], str):
        raise InputError(f"model.path={sec['path']!r}: must be a string (a folder or hub name)")
    _choice(cfg, "model", "dtype", DTYPES)
    _str(cfg, "model", "adapter")
    _bool(cfg, "model", "trust_remote_code")
    if sec["adapter"] != "auto":
        from .registry import get_registry
        try:
            get_registry().adapter(sec["adapter"])
        except InputError as exc:
            raise InputError(f"model.adapter={sec['adapter']!r}: {exc}") from None


def _validate_calibration(cfg) -> None:
    sec = cfg["calibration"]
    _check_keys(cfg, "calibration", DEFAULTS["calibration"])
    _str(cfg, "calibration", "dataset")
    _paths(cfg, "calibration", "path")
    if sec["dataset"] == "text" and sec["path"] is None:
        raise InputError("calibration.dataset='text' reads local files: set calibration.path to a file, "
                         "a list of files or a folder")
    _int(cfg, "calibration", "samples")
    _int(cfg, "calibration", "seqlen")
    _int(cfg, "calibration", "seed", lo=0)
    _str(cfg, "calibration", "text_field")
    _choice(cfg, "calibration", "stats_dtype", STATS_DTYPES)


def _validate_quant(cfg) -> None:
    sec = cfg["quant"]
    _check_keys(cfg, "quant", DEFAULTS["quant"])
    for k in ("sym", "act_order", "static_groups", "true_sequential"):
        _bool(cfg, "quant", k)
    if not _is_num(sec["damp"]) or sec["damp"] < 0:
        raise InputError(f"quant.damp={sec['damp']!r}: must be a number ≥ 0 (fraction of mean diag H, e.g. 0.01)")
    sec["damp"] = float(sec["damp"])
    _choice(cfg, "quant", "scale_method", SCALE_METHODS)
    _str_list(cfg, "quant", "skip")
    build_grid(cfg)                                       # GridSpec checks bits and group_size


def _objective_spec(sec: dict, where: str) -> ObjectiveSpec:
    """An `ObjectiveSpec` from `{name, ...params}` or `{terms: [...]}`; `where` prefixes key names."""
    from .registry import get_registry
    if not isinstance(sec, dict):
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
    """The objective section with every parameter spelled out (distributions as their text)."""
    if spec.name == "terms":
        return {"terms": spec.params["terms"]}
    return {"name": spec.name, **{k: (v if isinstance(v, (int, float)) else str(v)) for k, v in spec.params.items()}}


def _validate_objective(cfg) -> None:
    sec = cfg["objective"]
    resolved = _resolved(_objective_spec(sec, "objective"))
    if sec.get("score") is not None:
        _score_objective(sec["score"])
        resolved["score"] = _resolved(_objective_spec(sec["score"], "objective.score"))
    cfg["objective"] = resolved


def _score_objective(sec: dict) -> Objective:
    spec = _objective_spec(sec, "objective.score")
    if spec.sampled:
        raise InputError(f"objective.score.{spec.sampled[0]}={sec[spec.sampled[0]]!r}: a scoring objective "
                         f"needs fixed parameters, not a distribution")
    return spec.build(None)[0]


def _decoder_params(cfg) -> dict:
    return {k: v for k, v in cfg["decoder"].items() if k not in ("name", "seed")}


def _validate_decoder(cfg) -> None:
    from .registry import get_registry
    sec = cfg["decoder"]
    reg = get_registry()
    name = sec.get("name")
    if not isinstance(name, str) or name not in reg.decoders:
        raise InputError(f"decoder.name={name!r}: unknown decoder{_suggest(str(name), reg.decoders)}; "
                         f"registered: {', '.join(sorted(reg.decoders))}")
    if not _is_int(sec.get("seed")) or sec["seed"] < 0:
        raise InputError(f"decoder.seed={sec.get('seed')!r}: must be an integer ≥ 0")
    cls = reg.decoder_class(name)
    for k in _decoder_params(cfg):
        if k not in cls.params:
            allowed = ", ".join(sorted(cls.params)) or "none"
            raise InputError(f"unknown key 'decoder.{k}' for decoder '{name}'"
                             f"{_suggest(str(k), cls.params, 'decoder.')}; its parameters: {allowed}")
    try:
        dec = cls(**_decoder_params(cfg))
    except InputError as exc:
        raise InputError(str(exc)) from None
    cfg["decoder"] = {"name": name, "seed": sec["seed"], **dec.options}


def _validate_backend_device(cfg) -> None:
    from .registry import get_registry
    backend, device = cfg["backend"], cfg["device"]
    if not isinstance(backend, str) or not backend:
        raise InputError(f"backend={backend!r}: must be 'auto', 'reference' or the name of a registered backend")
    if backend not in ("auto", "reference"):
        reg = get_registry()
        known = sorted({b.plugin for b in reg.backends} | {b.obj.__name__ for b in reg.backends})
        if backend not in known:
            raise InputError(f"backend={backend!r}: no such registered backend{_suggest(backend, known)}; "
                             f"available: {', '.join(['auto', 'reference', *known])}")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise InputError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise InputError(f"device={device!r}: CUDA is not available on this machine; use cpu or auto")
    build_decoder(cfg, resolve_device(cfg))               # the backend implements the decoder on that device


def _validate_output(cfg) -> None:
    sec = cfg["output"]
    _check_keys(cfg, "output", DEFAULTS["output"])
    _str(cfg, "output", "dir")
    _str(cfg, "output", "format")
    _bool(cfg, "output", "overwrite")
    from .registry import get_registry
    get_registry().format(sec["format"])().check_quant(cfg["quant"])
    d = sec["dir"]
    if os.path.isfile(d):
        raise InputError(f"output.dir={d!r} is a file; name a folder")
    if os.path.isdir(d) and os.listdir(d) and not sec["overwrite"]:
        raise InputError(f"output.dir={d!r} exists and is not empty: choose another folder or "
                         f"replace it with --overwrite (output.overwrite: true)")


def _validate_eval(cfg) -> None:
    sec = cfg["eval"]
    _check_keys(cfg, "eval", DEFAULTS["eval"])
    _str_list(cfg, "eval", "perplexity")
    _paths(cfg, "eval", "path")
    if "text" in sec["perplexity"] and sec["path"] is None:
        raise InputError("eval.perplexity lists 'text': set eval.path to the local file(s) to evaluate on")
    _int(cfg, "eval", "seqlen")
    _int(cfg, "eval", "samples", allow_none=True)


def validate(cfg: dict) -> dict:
    """Check every section of a merged config in place (normalising lists and numbers); returns it."""
    for section in cfg:
        if section not in DEFAULTS:
            raise _unknown_section(section)
    _validate_model(cfg)
    _validate_calibration(cfg)
    _validate_quant(cfg)
    _validate_objective(cfg)
    _validate_decoder(cfg)
    _validate_backend_device(cfg)
    _validate_output(cfg)
    _validate_eval(cfg)
    return cfg


def load_config(path: str, overrides: Iterable[str] = ()) -> dict:
    """Read `path` (.yaml/.yml, .toml or .json), merge it over `DEFAULTS`, apply the `--set`
    `overrides` (`section.key=value`) and validate. Returns the resolved config (a plain dict)."""
    path = os.fspath(path)
    overrides = list(overrides or ())
    data = _read(path)
    where = f"{path} (with --set)" if overrides else path
    try:
        cfg = _merge(data)
        apply_overrides(cfg, overrides)
        return validate(cfg)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


# --- what the pipeline builds from a config ----------------------------------------------------

def build_grid(cfg: dict) -> GridSpec:
    q = cfg["quant"]
    return GridSpec(bits=q["bits"], group_size=q["group_size"], sym=q["sym"], act_order=q["act_order"],
                    static_groups=q["static_groups"], scale_method=q["scale_method"])


def build_objective(cfg: dict) -> tuple[ObjectiveSpec, Optional[Objective]]:
    """The decoded objective (an `ObjectiveSpec`: sampled parameters are drawn per layer) and the
    scoring objective candidates are chosen by (`objective.score`), or None to score by the decoded one."""
    sec = cfg["objective"]
    spec = _objective_spec(sec, "objective")
    score = _score_objective(sec["score"]) if sec.get("score") is not None else None
    return spec, score


def resolve_device(cfg: dict) -> str:
    """`device: auto` is cuda when available, else cpu."""
    device = cfg["device"]
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_decoder(cfg: dict, device: str):
    """The configured decoder for `device`, implemented by `cfg["backend"]` (see `Registry.decoder`)."""
    from .registry import get_registry
    return get_registry().decoder(cfg["decoder"]["name"], _decoder_params(cfg), device=device,
                                  backend=cfg["backend"])


def _plain(v: Any) -> Any:
    """YAML-safe copy: tuples to lists, numpy scalars to Python numbers."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def dump_yaml(cfg: dict) -> str:
    """The config as YAML text, sections in `DEFAULTS` order."""
    ordered = {k: cfg[k] for k in DEFAULTS if k in cfg}
    ordered.update({k: v for k, v in cfg.items() if k not in ordered})
    return yaml.safe_dump(_plain(ordered), sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_config(cfg: dict, path: str) -> None:
    """Write the resolved config as YAML to `path` through a temporary file renamed into place."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise InputError(f"{path}: folder {d} does not exist")
    text = dump_yaml(cfg)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

"""Recipe files as text: reading YAML, TOML or JSON, `--set section.key=value` values, writing YAML.

What the sections mean, their defaults and their checks live in `spec.py`; this module only turns text
into plain values and back.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
import yaml

from .errors import InputError

EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


def read_recipe(path: str) -> dict:
    """The mapping of sections in a .yaml/.yml, .toml or .json file (`InputError` naming the file otherwise)."""
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


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` → `(key, value)`: lists and mappings as YAML, `null` as None, else `parse_value`."""
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


def _plain(v: Any) -> Any:
    """YAML-safe copy: tuples to lists, numpy scalars to Python numbers."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def dump_yaml(cfg: dict, order: Optional[dict] = None) -> str:
    """A recipe as YAML text, sections in the order of `order`'s keys (then the others)."""
    ordered = {k: cfg[k] for k in (order or {}) if k in cfg}
    ordered.update({k: v for k, v in cfg.items() if k not in ordered})
    return yaml.safe_dump(_plain(ordered), sort_keys=False, default_flow_style=False, allow_unicode=True)

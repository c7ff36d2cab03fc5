"""Plugin discovery with pluggy: entry points in the group `ojbkq`, failures isolated and reported."""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import pluggy

from . import hookspecs
from .errors import InputError

log = logging.getLogger("ojbkq")
GROUP = "ojbkq"


@dataclass
class Entry:
    name: str
    obj: Any
    plugin: str
    extra: dict = field(default_factory=dict)


@dataclass
class Registry:
    decoders: dict[str, Entry] = field(default_factory=dict)
    objectives: dict[str, Entry] = field(default_factory=dict)
    adapters: dict[str, Entry] = field(default_factory=dict)
    backends: list[Entry] = field(default_factory=list)
    primitives: list = field(default_factory=list)              # primitives.Impl, as registered
    formats: dict[str, Entry] = field(default_factory=dict)
    recipes: dict[str, Entry] = field(default_factory=dict)      # name -> Entry(obj=path of the recipe file)
    failures: dict[str, str] = field(default_factory=dict)      # plugin -> error
    conflicts: list[str] = field(default_factory=list)
    pm: Optional[pluggy.PluginManager] = None

    # -- lookups ------------------------------------------------------------------------------
    def decoder_class(self, name: str):
        if name not in self.decoders:
            raise InputError(f"unknown decoder '{name}'; registered: {', '.join(sorted(self.decoders))} "
                             f"(`ojbkq plugins` lists them with their plugins)")
        return self.decoders[name].obj

    def decoder(self, name: str, params: Optional[dict] = None, device: str = "cpu", backend: str = "auto"):
        """An instance of decoder `name` for `device`, calling the primitives (walk, beam, row budget) of
        the backends registered for that device type: under `backend="auto"` those of priority above 0,
        highest first; under a plugin's name only that plugin's; under `"reference"` none. A whole decoder
        class registered with `register_backends` replaces the reference class the same way."""
        from .decoders.primitives import choose
        params = params or {}
        ref = self.decoder_class(name)
        dtype = str(device).split(":")[0]
        impls = [b for b in self.backends if b.name == name and b.extra["device"] in (dtype, "any")]
        prims = [i for i in self.primitives if i.device in (dtype, "any")]
        if backend == "reference":
            cls = ref
        elif backend == "auto":
            impls.sort(key=lambda b: -b.extra["priority"])
            cls = impls[0].obj if impls and impls[0].extra["priority"] > 0 else ref
        else:
            named = [b for b in impls if backend in (b.plugin, b.obj.__name__)]
            if not named and not any(i.plugin == backend for i in prims):
                have = sorted({b.plugin for b in impls} | {i.plugin for i in prims}) + ["reference", "auto"]
                raise InputError(f"backend '{backend}' has no implementation for decoder '{name}' on device "
                                 f"'{dtype}'; available: {', '.join(have)}")
            cls = named[0].obj if named else ref
        return cls(**params).use(choose(prims, dtype, backend))

    def objective(self, name: str, params: Optional[dict] = None):
        """An `ObjectiveSpec` for a registered objective name with its parameters checked."""
        from .objectives import preset
        if name not in self.objectives:
            raise InputError(f"unknown objective '{name}'; registered: {', '.join(sorted(self.objectives))}")
        e = self.objectives[name]
        return preset(name, e.obj, e.extra["schema"], **(params or {}))

    def format(self, name: str):
        """The checkpoint `Format` class registered as `name`."""
        if name not in self.formats:
            near = difflib.get_close_matches(str(name), list(self.formats), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise InputError(f"output.format={name!r}: unknown format{hint}; registered: "
                             f"{', '.join(self.formats)}")
        return self.formats[name].obj

    def adapter(self, name: str):
        if name not in self.adapters:
            raise InputError(f"unknown adapter '{name}'; registered: {', '.join(sorted(self.adapters)) or 'none'}")
        return self.adapters[name].obj


def _collect(pm: pluggy.PluginManager, reg: Registry) -> None:
    def run(hook, make_register):
        for impl in getattr(pm.hook, hook).get_hookimpls():
            try:
                impl.function(register=make_register(impl.plugin_name))
            except Exception as exc:  # a broken plugin must not break the others
                reg.failures[impl.plugin_name] = f"{hook}: {type(exc).__name__}: {exc}"

    def add(table, name, entry):
        if name in table:
            reg.conflicts.append(f"'{name}' from {entry.plugin} ignored: already registered by {table[name].plugin}")
        else:
            table[name] = entry

    run("register_decoders", lambda p: lambda cls: add(reg.decoders, cls.name, Entry(cls.name, cls, p)))
    run("register_objectives", lambda p: lambda name, factory, schema=None:
        add(reg.objectives, name, Entry(name, factory, p, {"schema": schema or {}})))
    run("register_adapters", lambda p: lambda cls: add(reg.adapters, cls.name, Entry(cls.name, cls, p)))
    run("register_formats", lambda p: lambda cls: add(reg.formats, cls.name, Entry(cls.name, cls, p)))
    run("register_recipes", lambda p: lambda name, path: add(reg.recipes, name, Entry(name, str(path), p)))
    run("register_backends", lambda p: lambda decoder, device, cls, priority=1:
        reg.backends.append(Entry(decoder, cls, p, {"device": device, "priority": priority})))

    from .decoders.primitives import NAMES, Impl

    def primitive(p):
        def register(name, device, fn, priority=1, accepts=lambda problem: True):
            if name not in NAMES:
                raise ValueError(f"unknown primitive {name!r} (known: {', '.join(NAMES)})")
            reg.primitives.append(Impl(name, device, fn, priority, accepts, p))
        return register
    run("register_primitives", primitive)


def load(extra_plugins: tuple = ()) -> Registry:
    """Discover every plugin of the entry-point group `ojbkq`, plus `extra_plugins` (module objects or
    dotted names, e.g. for tests), and collect what they register."""
    pm = pluggy.PluginManager("ojbkq")
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm=pm)
    eps = list(importlib.metadata.entry_points(group=GROUP))
    seen = set()
    for ep in eps:
        if ep.name in seen:
            continue
        seen.add(ep.name)
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:
            reg.failures[ep.name] = f"import {ep.value}: {type(exc).__name__}: {exc}"
    if "builtin" not in seen:  # running from a source tree that was never installed
        from . import builtin
        pm.register(builtin, name="builtin")
    for p in extra_plugins:
        mod = importlib.import_module(p) if isinstance(p, str) else p
        name = p if isinstance(p, str) else getattr(p, "__name__", repr(p))
        if pm.get_plugin(name) is None and not pm.is_registered(mod):   # not already found by its entry point
            pm.register(mod, name=name)
    _collect(pm, reg)
    for name, err in reg.failures.items():
        log.warning("plugin %s failed: %s", name, err)
    return reg


_REGISTRY: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load()
    return _REGISTRY


def reset() -> None:
    global _REGISTRY
    _REGISTRY = None

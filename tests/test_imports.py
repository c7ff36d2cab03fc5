"""The import graphs of ojbkq_core and of the plugin packages (module-level and function-local imports alike)
have no cycle."""
import ast
import os

import pytest

import ojbkq_core

PKG = os.path.dirname(os.path.abspath(ojbkq_core.__file__))
ROOT = os.path.dirname(PKG)
PLUGINS = {"ojbkq_cuda": os.path.join(ROOT, "plugins", "ojbkq-cuda", "ojbkq_cuda"),
           "ojbkq_cpu": os.path.join(ROOT, "plugins", "ojbkq-cpu", "ojbkq_cpu"),
           "ojbkq_colreorder": os.path.join(ROOT, "plugins", "ojbkq-colreorder", "ojbkq_colreorder")}


def _modules(pkg: str = PKG) -> dict[str, str]:
    """Dotted module name → file, for every module of the package in the folder `pkg`."""
    out = {}
    for root, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(pkg))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def import_graph(pkg: str = PKG) -> dict[str, set[str]]:
    """Module → the package's modules it imports anywhere in its body."""
    mods = _modules(pkg)
    name = os.path.basename(pkg)
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import module` needs the module (its parent package is loaded first by any import)
                targets = subs if all(t in mods for t in subs) else [base] + subs
            for t in targets:
                while t and t not in mods:           # `import a.b.c` names a, a.b and a.b.c
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith(name):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_reads_relative_and_local_imports():
    g = import_graph()
    assert "ojbkq_core.errors" in g["ojbkq_core.config"]            # from .errors import InputError
    assert "ojbkq_core.registry" in g["ojbkq_core.spec"]            # a function-local import
    assert "ojbkq_core.hookspecs" in g["ojbkq_core.registry"]       # from . import hookspecs
    assert "ojbkq_core" not in g["ojbkq_core.registry"]
    assert "ojbkq_core.decoders.base" in g["ojbkq_core.calibrate"]  # from .decoders.base import Decoder


def test_ojbkq_core_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_the_plugins_have_no_import_cycle(plugin):
    graph = import_graph(PLUGINS[plugin])
    assert len(graph) > 1 and any(graph.values())
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)

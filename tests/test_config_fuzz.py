"""Random mutations of a valid run config — keys, types, values, whole sections, names of objectives,
decoders and backends, in the file or as `--set` — give `ojbkq quantize` exit status 2 with one line
naming what was changed, or a config that passes every check made before the model loads and that
builds its grid, objective, decoder and format afterwards (and whose resolved recipe reads back as
the same spec); never a traceback.

The command runs in-process up to `load_model`, which is replaced: no model is loaded."""
import contextlib
import io
import os

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ojbkq_core import cli, pipeline
from ojbkq_core.export import get_format
from ojbkq_core.spec import load_spec
from ojbkq_core.registry import get_registry
from tiny_models import CALIB_TXT, EVAL_TXT

REG = get_registry()
SECTIONS = ["model", "calibration", "quant", "objective", "decoder", "backend", "device", "output", "eval"]
KEYS = {
    "model": ["path", "dtype", "adapter", "trust_remote_code"],
    "calibration": ["dataset", "path", "samples", "seqlen", "seed", "text_field", "stats_dtype"],
    "quant": ["bits", "group_size", "sym", "act_order", "static_groups", "damp", "scale_method", "true_sequential",
              "skip"],
    "objective": ["name", "alpha", "mu", "lam", "terms", "score"],
    "decoder": ["name", "seed", *sorted({p for e in REG.decoders.values() for p in e.obj.params})],
    "output": ["dir", "format", "overwrite"],
    "eval": ["perplexity", "path", "seqlen", "samples"],
}
NAMES = {"objective": sorted(REG.objectives), "decoder": sorted(REG.decoders),
         "backend": ["auto", "reference", *sorted({b.plugin for b in REG.backends})]}


class Reached(Exception):
    """The command got past every check made before loading the model."""


def valid(tmp: str) -> dict:
    return {"model": {"path": tmp, "dtype": "float32"},
            "calibration": {"dataset": "text", "path": CALIB_TXT, "samples": 2, "seqlen": 16},
            "quant": {"bits": 4, "group_size": 32},
            "objective": {"name": "jta", "mu": 0.5},
            "decoder": {"name": "klein", "k": 4},
            "backend": "auto", "device": "cpu",
            "output": {"dir": os.path.join(tmp, "out"), "format": "gptq"},
            "eval": {"perplexity": ["text"], "path": EVAL_TXT, "seqlen": 16}}


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
ident = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2, 3, 8, 9, 64]),
                   st.floats(allow_nan=True, allow_infinity=True), text)
value = st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(ident, scalar, max_size=2),
                  st.just([{"w": 1.0, "a": 0.5, "b": 0}]), st.just([{"w": "x"}]))
name_of = {s: st.one_of(st.sampled_from(NAMES[s]), text) for s in NAMES}


@st.composite
def mutation(draw):
    """`(kind, where, value)`: what to change and the names an error about it would mention."""
    kind = draw(st.sampled_from(["set", "set", "set", "name", "add", "drop", "section", "new_section"]))
    if kind == "name":
        s = draw(st.sampled_from(sorted(NAMES)))
        return ("set", s, None if s == "backend" else "name", draw(name_of[s]))
    if kind == "new_section":
        return (kind, draw(ident.filter(lambda k: k not in SECTIONS)), None, draw(value))
    s = draw(st.sampled_from(SECTIONS))
    if kind == "section" or s in ("backend", "device"):
        return ("section", s, None, draw(value))
    key = draw(ident) if kind == "add" else draw(st.sampled_from(KEYS[s]))
    return (kind, s, key, draw(value))


def _apply_to_file(cfg: dict, m) -> None:
    kind, s, key, v = m
    if kind in ("section", "new_section"):
        cfg[s] = v
    elif kind == "drop":
        cfg.get(s, {}).pop(key, None) if isinstance(cfg.get(s), dict) else None
    elif key is None:
        cfg[s] = v
    elif isinstance(cfg.get(s), dict):
        cfg[s][key] = v
    else:
        cfg[s] = {key: v}


def _as_set(m, raw: str) -> str:
    kind, s, key, v = m
    return f"{s}={raw}" if key is None else f"{s}.{key}={raw}"


def _mentions(message: str, m) -> bool:
    kind, s, key, v = m
    if kind in ("add", "new_section"):
        name = s if key is None else f"{s}.{key}"
        return f"'{name}'" in message or f"'{key}'" in message or f"'{name}=" in message   # or as --set 'k=v'
    return s in message or (key is not None and key in message)


@settings(max_examples=settings.default.max_examples * 5, deadline=None)
@given(muts=st.lists(mutation(), min_size=1, max_size=3),
       via_set=st.lists(st.booleans(), min_size=3, max_size=3),
       raw=st.lists(st.one_of(text, st.sampled_from(["null", "[]", "[1, x]", "{a: 1}", "1e400", "nan", "-0", "true"])),
                    min_size=3, max_size=3))
def test_mutated_configs_exit_0_or_2_never_a_traceback(tmp_path_factory, muts, via_set, raw):
    tmp = str(tmp_path_factory.mktemp("fuzz"))
    cfg, sets = valid(tmp), []
    for i, m in enumerate(muts):
        if via_set[i] and m[0] in ("set", "add") or (via_set[i] and m[0] == "section" and m[1] in ("backend", "device")):
            sets.append(_as_set(m, raw[i]))
            muts[i] = (m[0], m[1], m[2], raw[i])
        else:
            _apply_to_file(cfg, m)
    path = os.path.join(tmp, "run.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, allow_unicode=True)

    def reached(*a, **k):
        raise Reached

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(pipeline, "load_model", reached)
        mp.setattr(pipeline, "load_empty", reached)        # a run that streams reads the model this way
        try:
            rc = cli.main(["quantize", path, *sum((["--set", s] for s in sets), [])])
        except Reached:
            rc = 0
    event(f"exit {rc}")
    if rc == 0:                                   # valid: what runs after loading builds without error
        spec = load_spec(path, sets)
        spec.quant.grid_spec, spec.objective.scoring(), spec.decoder.decoder
        get_format(spec.output.format).check_quant(spec.quant)
        assert load_spec(spec.to_dict()) == spec          # the resolved recipe reproduces the run
        yaml.safe_load(spec.to_yaml())
        return
    message = err.getvalue()
    assert rc == 2, message
    assert message.startswith("ojbkq quantize: ") and message.count("\n") == 1, message
    detail = message.split(": ", 2)[-1] if message.startswith(f"ojbkq quantize: {path}") else message
    assert any(_mentions(detail, m) for m in muts), (muts, sets, message)


def test_the_unmutated_config_passes(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(valid(str(tmp_path))))
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    monkeypatch.setattr(pipeline, "load_empty", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        cli.main(["quantize", str(path)])

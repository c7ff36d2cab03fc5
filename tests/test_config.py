"""The run configuration: formats, merging, overrides, validation, builders and the recipes."""
import json
import os
from pathlib import Path

import pytest
import yaml

from ojbkq_core.config import (DEFAULTS, build_decoder, build_grid, build_objective, dump_config, load_config,
                               resolve_device)
from ojbkq_core.decoders import Beam, Klein
from ojbkq_core.errors import InputError
from ojbkq_core.grid import GridSpec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ["gptq.yaml", "gptaq.yaml", "regularized-successive.yaml", "regularized-beam.yaml", "ojbkq.yaml"]

BODY = {
    "model": {"path": "./m", "dtype": "float16"},
    "quant": {"bits": 3, "group_size": 64, "sym": True},
    "objective": {"name": "regularized", "alpha": 0.25},
    "decoder": {"name": "klein", "k": 8, "seed": 3},
    "backend": "auto",
    "eval": {"perplexity": ["wikitext2", "c4"]},
}

TOML = """
backend = "auto"

[model]
path = "./m"
dtype = "float16"

[quant]
bits = 3
group_size = 64
sym = true

[objective]
name = "regularized"
alpha = 0.25

[decoder]
name = "klein"
k = 8
seed = 3

[eval]
perplexity = ["wikitext2", "c4"]
"""


def write(tmp_path, name, data):
    p = tmp_path / name
    if isinstance(data, str):
        p.write_text(data)
    elif name.endswith(".json"):
        p.write_text(json.dumps(data))
    else:
        p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # relative output.dir / paths resolve in a clean folder


@pytest.mark.parametrize("name", ["c.yaml", "c.yml", "c.json", "c.toml"])
def test_formats_give_the_same_config(tmp_path, name):
    path = write(tmp_path, name, TOML if name.endswith(".toml") else BODY)
    cfg = load_config(path)
    ref = load_config(write(tmp_path, "ref.json", BODY))
    assert cfg == ref
    assert cfg["model"] == {"path": "./m", "dtype": "float16", "adapter": "auto", "trust_remote_code": False}
    assert cfg["quant"]["bits"] == 3 and cfg["quant"]["group_size"] == 64 and cfg["quant"]["sym"] is True
    assert cfg["quant"]["damp"] == DEFAULTS["quant"]["damp"]          # default kept beside the given keys
    assert cfg["calibration"] == DEFAULTS["calibration"]
    assert cfg["objective"] == {"name": "regularized", "alpha": 0.25}
    assert cfg["decoder"] == {"name": "klein", "seed": 3, **Klein.params, "k": 8}     # defaults spelled out
    assert cfg["eval"]["perplexity"] == ["wikitext2", "c4"]


def test_defaults_fill_a_minimal_config(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", {"model": {"path": "./m"}}))
    assert cfg["quant"] == DEFAULTS["quant"]
    assert cfg["objective"] == {"name": "jta", "mu": 0.6, "lam": 0.6}      # preset defaults spelled out
    assert cfg["decoder"] == {"name": "babai", "seed": 0}
    assert cfg["output"] == {"dir": "./out", "format": "gptq", "overwrite": False}
    assert DEFAULTS["model"]["path"] is None                               # DEFAULTS not mutated


def test_overrides(tmp_path):
    path = write(tmp_path, "c.yaml", BODY)
    cfg = load_config(path, ["quant.bits=8", "quant.damp=0.1", "quant.act_order=true", "decoder.k=32",
                             "objective.alpha=uniform:0.4:0.8", "model.dtype=bfloat16", "backend=reference",
                             "calibration.samples=16", "quant.skip=lm_head,model.layers.0.mlp",
                             "eval.samples=4", "eval.perplexity=[c4]"])
    assert cfg["quant"]["bits"] == 8 and cfg["quant"]["damp"] == 0.1 and cfg["quant"]["act_order"] is True
    assert cfg["decoder"]["k"] == 32 and cfg["objective"]["alpha"] == "uniform:0.4:0.8"
    assert cfg["backend"] == "reference" and cfg["calibration"]["samples"] == 16
    assert cfg["quant"]["skip"] == ["lm_head", "model.layers.0.mlp"]
    assert cfg["eval"]["samples"] == 4 and cfg["eval"]["perplexity"] == ["c4"]
    spec, _ = build_objective(cfg)
    assert spec.sampled == ("alpha",)


def test_override_of_name_drops_previous_parameters(tmp_path):
    path = write(tmp_path, "c.yaml", BODY)
    cfg = load_config(path, ["objective.name=jta", "objective.mu=0.3", "decoder.name=beam", "decoder.width=2"])
    assert cfg["objective"] == {"name": "jta", "mu": 0.3, "lam": 0.6}
    assert cfg["decoder"] == {"name": "beam", "seed": 3, **Beam.params, "width": 2}


def test_nested_override_sets_scoring_objective(tmp_path):
    path = write(tmp_path, "c.yaml", BODY)
    cfg = load_config(path, ["objective.score.name=jta", "objective.score.mu=1.0"])
    spec, score = build_objective(cfg)
    assert spec.name == "regularized"
    assert score.name == "jta" and score.params == {"mu": 1.0, "lam": 0.6}
    assert cfg["objective"]["score"] == {"name": "jta", "mu": 1.0, "lam": 0.6}


def test_terms_objective(tmp_path):
    body = {**BODY, "objective": {"terms": [{"w": 0.6, "a": 0.6, "b": 0}, {"w": 0.4, "a": 1, "b": 1}]}}
    cfg = load_config(write(tmp_path, "c.yaml", body))
    spec, score = build_objective(cfg)
    obj, draws = spec.build(None)
    assert [(t.w, t.a, t.b) for t in obj.terms] == [(0.6, 0.6, 0), (0.4, 1, 1)] and score is None and draws == {}


def test_builders(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", BODY), ["quant.scale_method=clip"])
    assert build_grid(cfg) == GridSpec(bits=3, group_size=64, sym=True, act_order=False, static_groups=False,
                                       scale_method="clip")
    dec = build_decoder(cfg, "cpu")
    assert isinstance(dec, Klein) and dec.options["k"] == 8
    cfg = load_config(write(tmp_path, "b.yaml", {**BODY, "decoder": {"name": "beam", "width": 3}}),
                      ["backend=reference"])
    dec = build_decoder(cfg, "cpu")
    assert isinstance(dec, Beam) and dec.options == {**Beam.params, "width": 3}
    assert resolve_device(cfg) in ("cpu", "cuda")


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "c.yaml", BODY), ["objective.alpha=beta:2:2"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, str(out))
    assert list(yaml.safe_load(out.read_text())) == list(DEFAULTS)
    assert load_config(str(out)) == cfg
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    with pytest.raises(InputError, match="does not exist"):
        dump_config(cfg, str(tmp_path / "no" / "x.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_load(recipe, tmp_path):
    path = CONFIGS / recipe
    assert path.read_text().lstrip().startswith("#"), "each recipe starts with a comment"
    cfg = load_config(str(path), ["model.path=x", f"output.dir={tmp_path / 'out'}"])
    assert cfg["model"]["path"] == "x"
    spec, _ = build_objective(cfg)
    build_decoder(cfg, "cpu")
    build_grid(cfg)
    expected = {"gptq.yaml": ("symmetric", "babai"), "gptaq.yaml": ("asymmetric", "babai"),
                "regularized-successive.yaml": ("regularized", "successive"),
                "regularized-beam.yaml": ("regularized", "beam"), "ojbkq.yaml": ("jta", "klein")}[recipe]
    assert (spec.name, cfg["decoder"]["name"]) == expected


def test_recipe_parameters():
    cfg = load_config(str(CONFIGS / "ojbkq.yaml"), ["model.path=x"])
    assert cfg["objective"] == {"name": "jta", "mu": 0.6, "lam": 1.0} and cfg["decoder"]["k"] == 16
    cfg = load_config(str(CONFIGS / "regularized-beam.yaml"), ["model.path=x"])
    assert cfg["decoder"]["width"] == 4 and cfg["decoder"]["expand"] == 2
    cfg = load_config(str(CONFIGS / "regularized-successive.yaml"), ["model.path=x"])
    assert cfg["objective"]["alpha"] in ("uniform:0.4:0.8", 0.5)


# --- errors -------------------------------------------------------------------------------------

def error_of(tmp_path, body, overrides=(), name="c.yaml"):
    path = write(tmp_path, name, body)
    with pytest.raises(InputError) as exc:
        load_config(path, overrides)
    msg = str(exc.value)
    assert "\n" not in msg and path in msg            # one line naming the file
    return msg


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        load_config(str(tmp_path / "nope.yaml"))
    p = write(tmp_path, "c.ini", "[model]\n")
    with pytest.raises(InputError, match=r"c\.ini.*\.yaml, \.yml, \.toml or \.json"):
        load_config(p)


@pytest.mark.parametrize("name,text", [("c.yaml", "model: {path: [unclosed\n"), ("c.json", "{\"model\": "),
                                       ("c.toml", "[model\npath = 1"), ("c.yaml", "- a list\n")])
def test_unparsable_files(tmp_path, name, text):
    msg = error_of(tmp_path, text, name=name)
    assert "cannot parse" in msg or "top level must be a mapping" in msg


def test_missing_model_path(tmp_path):
    assert "model.path is required" in error_of(tmp_path, {"quant": {"bits": 4}})
    assert "model.path is required" in error_of(tmp_path, "")


def test_unknown_section(tmp_path):
    msg = error_of(tmp_path, {**BODY, "qaunt": {"bits": 4}})
    assert "unknown section 'qaunt'" in msg and "did you mean 'quant'" in msg
    msg = error_of(tmp_path, BODY, ["evaluation.seqlen=8"])
    assert "unknown section 'evaluation'" in msg


def test_misspelled_keys_suggest_the_nearest(tmp_path):
    msg = error_of(tmp_path, BODY, ["quant.bitz=3"])
    assert "unknown key 'quant.bitz' (did you mean 'quant.bits'?)" in msg
    msg = error_of(tmp_path, {**BODY, "calibration": {"sample": 3}})
    assert "did you mean 'calibration.samples'" in msg
    msg = error_of(tmp_path, BODY, ["decoder.kk=3"])
    assert "unknown key 'decoder.kk'" in msg and "did you mean 'decoder.k'" in msg
    msg = error_of(tmp_path, BODY, ["objective.alhpa=0.3"])
    assert "unknown key 'objective.alhpa'" in msg and "did you mean 'objective.alpha'" in msg
    msg = error_of(tmp_path, BODY, ["objective.name=symetric"])
    assert "did you mean 'symmetric'" in msg
    msg = error_of(tmp_path, BODY, ["decoder.name=klien"])
    assert "did you mean 'klein'" in msg


@pytest.mark.parametrize("override,needle", [
    ("quant.bits=9", "quant.bits=9"),
    ("quant.bits=four", "quant.bits='four'"),
    ("quant.group_size=0", "quant.group_size=0"),
    ("quant.damp=-1", "quant.damp=-1"),
    ("quant.sym=yes", "quant.sym='yes'"),
    ("quant.scale_method=mse", "quant.scale_method='mse'"),
    ("model.dtype=fp8", "model.dtype='fp8'"),
    ("calibration.samples=0", "calibration.samples=0"),
    ("calibration.seqlen=1.5", "calibration.seqlen=1.5"),
    ("calibration.path=missing.txt", "calibration.path='missing.txt'"),
    ("calibration.dataset=text", "calibration.path"),
    ("objective.alpha=2", "alpha=2"),
    ("objective.alpha=uniform:0.8:0.4", "uniform:0.8:0.4"),
    ("decoder.k=0", "k=0"),
    ("decoder.seed=-1", "decoder.seed=-1"),
    ("backend=turbo", "backend='turbo'"),
    ("device=tpu", "device='tpu'"),
    ("output.format=gguf", "output.format='gguf'"),
    ("quant.bits=5", "output.format=fake"),
    ("eval.perplexity=text", "eval.path"),
    ("eval.samples=0", "eval.samples=0"),
    ("model.adapter=nosuch", "model.adapter='nosuch'"),
    ("quant", "expected section.key=value"),
    ("backend.x=1", "single value"),
    ("model=x", "name a key"),
])
def test_bad_values_name_the_key(tmp_path, override, needle):
    assert needle in error_of(tmp_path, BODY, [override])


def test_fixed_objective_for_scoring(tmp_path):
    body = {**BODY, "objective": {"name": "symmetric", "score": {"name": "regularized", "alpha": "uniform:0.1:0.2"}}}
    assert "scoring objective needs fixed parameters" in error_of(tmp_path, body)


def test_terms_with_name_or_bad_term(tmp_path):
    body = {**BODY, "objective": {"name": "jta", "terms": [{"w": 1, "a": 0, "b": 0}]}}
    assert "'terms' defines the objective by itself" in error_of(tmp_path, body)
    body = {**BODY, "objective": {"terms": [{"w": 1, "a": 2, "b": 0}]}}
    assert "objective.terms" in error_of(tmp_path, body)


def test_existing_output_dir_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert "output.dir='./out' exists and is not empty" in error_of(tmp_path, BODY)
    cfg = load_config(write(tmp_path, "d.yaml", BODY), ["output.overwrite=true"])
    assert cfg["output"]["overwrite"] is True


def test_local_paths_accepted(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "docs").mkdir()
    cfg = load_config(write(tmp_path, "c.yaml", BODY), ["calibration.dataset=text", "calibration.path=a.txt",
                                                        "eval.perplexity=text", "eval.path=[a.txt, docs]"])
    assert cfg["calibration"]["path"] == "a.txt" and cfg["eval"]["path"] == ["a.txt", "docs"]


def test_cli_quantize_reports_config_errors(tmp_path, capsys):
    from ojbkq_core.cli import main
    path = write(tmp_path, "c.yaml", BODY)
    try:
        import ojbkq_core.pipeline  # noqa: F401
    except ImportError:
        pytest.skip("the model pipeline is not present")
    assert main(["quantize", path, "--set", "quant.bitz=3"]) == 2
    assert "did you mean 'quant.bits'" in capsys.readouterr().err

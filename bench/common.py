"""What the benchmark scripts share: where results go, `ojbkq compare` run from a script, and the
scripts' command lines (their own options before `--`, `ojbkq compare`'s after it)."""
from __future__ import annotations

import os
import sys

from ojbkq_core import compare
from ojbkq_core.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
CACHE = os.path.join(ROOT, "runs", "cache")          # SmolLM2 converted once, as `make main` does


def compare_main(argv: list[str]) -> int:
    """`ojbkq compare ARGV` with the repository's model cache."""
    return compare.main(["--cache-dir", CACHE, *argv])


def split_passthrough(argv) -> tuple[list[str], list[str]]:
    """`(own, passed)`: a sweep script's arguments before `--`, and those after it, which go to `ojbkq compare`."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def run_script(main, name: str) -> None:
    """`sys.exit(main())`, with bad input reported on one line and exit status 2."""
    try:
        sys.exit(main())
    except InputError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(2)

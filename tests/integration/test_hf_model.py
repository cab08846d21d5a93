"""A whole transformers model on ktgen: patch_model, freezing,
PEFT-default adapters, deepcopy / torch.save, .to(dtype), save_pretrained, load_adapter's
log, the max_len message. Tiny models built from configs (hidden 64, 4 experts, 2 layers)."""

from __future__ import annotations

import copy
import io
import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import ktgen  # noqa: E402
from ktgen.torch import (KTMoE, UnsupportedExpertsError, load_adapter, patch_model,  # noqa: E402
                         save_adapter)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)


def tiny(kind, seed=0):
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=64, intermediate_size=64,
                                          norm_topk_prob=True, head_dim=16, **COMMON)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, intermediate_size=64, head_dim=16, **COMMON)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.DeepseekV3Config(n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                                            moe_intermediate_size=64, intermediate_size=64,
                                            first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=32,
                                            qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                                            **{**COMMON, "num_key_value_heads": 4})
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():           # weights bf16-representable, so ktgen's bf16 copy is exact
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.1).bfloat16().float())
    return model.eval()


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def ids(seed=1, batch=2, seq=12):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


KW = dict(max_len=64, threads=1, progress=False)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_patch_model_replaces_freezes_and_matches(kind):
    model = tiny(kind)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    total = sum(p.numel() for p in model.parameters())
    report = patch_model(model, **KW)
    assert report.layers == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    experts = [model.get_submodule(p) for p in report.layers]
    assert all(isinstance(m, KTMoE) for m in experts)
    # only the LoRA trains: PEFT's default rank 8 on 4 experts, gate/up/down
    lora = 2 * 4 * (8 * 64 + 64 * 8) * 3
    assert report.lora_parameters == report.trainable_parameters == lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ktgen.LORA_NAMES for n in trainable)
    assert report.total_parameters == total - 2 * 4 * 3 * 64 * 64 + lora   # experts left the parameters
    assert experts[0].spec.lora.alpha == 8.0 and experts[0].spec.lora.rank == 8   # PEFT's defaults
    assert "2 MoE expert layers" in str(report)
    with torch.no_grad():
        got = model(x).logits
    assert rel_l2(got, want) <= 2e-2, kind        # B = 0: the base model, at bf16 precision
    loss = model(x, labels=x).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert experts[0].gate_b.grad is not None and experts[0].gate_b.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
def test_peft_default_adapter_loads_and_matches_peft(tmp_path, caplog):
    # An adapter trained with PEFT's defaults (r=8, lora_alpha=8) on the experts and on q_proj.
    lc = peft.LoraConfig(target_modules=["q_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert (lc.r, lc.lora_alpha) == (8, 8)
    pm = peft.get_peft_model(tiny("qwen3_moe"), lc)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n and "q_proj" not in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.save_pretrained(str(tmp_path / "peft"))
    for n, p in pm.named_parameters():
        if "q_proj" in n and "lora_B" in n:
            with torch.no_grad():
                p.zero_()   # q_proj's LoRA is ignored by load_adapter: compare without it
    model = tiny("qwen3_moe")
    patch_model(model, **KW)              # lora=None: PEFT's defaults, so the scale check passes
    with caplog.at_level(logging.WARNING, logger="ktgen.torch"):
        report = load_adapter(model, tmp_path / "peft")
    assert report["loaded"] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert len(report["unexpected"]) == 4 and all("q_proj" in k for k in report["unexpected"])
    for key in report["unexpected"]:
        assert key in caplog.text
    x = ids()
    with torch.no_grad():
        want, got = pm(x).logits, model(x).logits
    assert rel_l2(got, want) <= 2e-2

    # An adapter of a model with another expert count is named as such.
    other = peft.get_peft_model(tiny_qwen_experts(8), peft.LoraConfig(
        target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="trained for 8 experts.*expert_num = 4"):
        load_adapter(model, tmp_path / "other")


def tiny_qwen_experts(num_experts):
    cfg = transformers.Qwen3MoeConfig(num_experts=num_experts, moe_intermediate_size=64, intermediate_size=64,
                                      head_dim=16, **COMMON)
    return transformers.Qwen3MoeForCausalLM(cfg)


def test_deepcopy_torch_save_and_dtype_change():
    model = tiny("qwen3_moe")
    patch_model(model, lora={"r": 4, "lora_alpha": 16}, **KW)
    layer = model.model.layers[0].mlp.experts
    assert layer.spec.lora.alpha == 16.0 and layer.lora_scale() == 4.0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, KTMoE):
                for p in m._lora_params():
                    p.copy_(torch.randn(p.shape) * 0.05)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        with torch.no_grad():
            assert torch.equal(other(x).logits, want)      # same kernels, same weights: same bits
        o = other.model.layers[0].mlp.experts
        assert o.moe is not layer.moe and o.gate_a.data_ptr() != layer.gate_a.data_ptr()
    with torch.no_grad():                                    # the copy's LoRA is its own
        twin.model.layers[0].mlp.experts.down_b.mul_(3)
        assert torch.equal(model(x).logits, want)
        assert not torch.equal(twin(x).logits, want)
    # Training goes on after a copy.
    loaded.model.layers[1].mlp.experts.up_b.retain_grad()
    loaded(x, labels=x).loss.backward()
    assert loaded.model.layers[1].mlp.experts.up_b.grad.abs().sum() > 0

    model.to(torch.bfloat16)                  # the LoRA in bf16: the kernel is re-specialized
    assert layer.spec.lora.dtype == "bfloat16" and layer.gate_a.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(x).logits
    assert got.dtype == torch.bfloat16 and rel_l2(got.float(), want) <= 5e-2
    model(x, labels=x).loss.backward()
    assert layer.gate_b.grad.dtype == torch.bfloat16


def test_quantized_layers_copy_exactly():
    # The kernels' int8 and awq weights come back bit for bit through a pickle.
    for q in ("int8", {"mode": "awq", "group_size": 32}):
        model = tiny("mixtral")
        patch_model(model, quant=q, lora=False, **KW)
        layer = model.model.layers[0].mlp.experts
        assert layer.spec.lora is None
        copied = copy.deepcopy(layer)
        for n in ("gate", "up", "down"):
            assert torch.equal(copied.dequantized(n), layer.dequantized(n)), (q, n)


def test_save_pretrained_writes_the_experts_back(tmp_path):
    model = tiny("deepseek_v3")
    original = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." in n}
    patch_model(model, **KW)
    model.save_pretrained(str(tmp_path))
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path))
    sd = back.state_dict()
    assert len(original) == 4
    for n, t in original.items():
        assert torch.equal(sd[n].float(), t), n
    # and load_state_dict of the patched model's own state dict is a round trip
    model.load_state_dict(model.state_dict())


def test_max_len_and_argument_errors():
    model = tiny("qwen3_moe")
    with pytest.raises(ValueError, match="checkpoint: /nonexistent is not a directory"):
        patch_model(model, checkpoint="/nonexistent", **KW)
    with pytest.raises(ValueError, match="lora: unknown key 'rnk'"):
        patch_model(model, lora={"rnk": 4}, **KW)
    with pytest.raises(ValueError, match="lora_dropout"):
        patch_model(model, lora=peft.LoraConfig(lora_dropout=0.1), **KW)
    with pytest.raises(ktgen.SpecError, match="quant.mode"):
        patch_model(model, quant="int3", **KW)
    with pytest.raises(ktgen.SpecError, match="max_len"):
        patch_model(model, **{**KW, "max_len": 0})
    with pytest.raises(ValueError, match="no supported MoE block"):
        patch_model(torch.nn.Linear(4, 4))
    assert not any(isinstance(m, KTMoE) for m in model.modules())     # nothing was patched

    patch_model(model, **{**KW, "max_len": 16})
    with pytest.raises(ValueError, match=r"hidden_states: 24 tokens \(T = batch x sequence"):
        model(ids(batch=2, seq=12))


def test_unsupported_experts_are_refused_before_anything_is_patched():
    model = tiny("qwen3_moe")
    model.model.layers[1].mlp.experts.limit = 7.0      # a clamp one layer declares but does not apply
    with pytest.raises(UnsupportedExpertsError,
                       match=r"model.layers.1.mlp.experts: .*differs from silu\(min\(gate, 7\)\)"):
        patch_model(model, **KW)
    assert not any(isinstance(m, KTMoE) for m in model.modules())

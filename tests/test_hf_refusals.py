"""from_hf_experts refuses every experts module whose computation ktgen does not reproduce
exactly (issue 14, item 1), naming the reason, and still takes the ones it does."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from ktgen.torch import UnsupportedExpertsError, from_hf_experts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeMLP  # noqa: E402

DIMS = dict(hidden_size=64, moe_intermediate_size=64, num_experts_per_tok=2, num_experts=4)
KW = dict(max_len=64, threads=1, lora=dict(rank=4, alpha=8.0))


def _fill(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.2).bfloat16().float())
    return module


def qwen3_experts(**cfg):
    return _fill(Qwen3MoeExperts(transformers.Qwen3MoeConfig(**{**DIMS, **cfg})))


def refused(module, *fragments):
    with pytest.raises(UnsupportedExpertsError) as info:
        from_hf_experts(module, **KW)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_plain_qwen3_experts_are_accepted():
    layer = from_hf_experts(qwen3_experts(), **KW)
    assert layer.spec.expert_num == 4


def test_deepseek_v4_swiglu_limit_is_refused():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    cfg = transformers.DeepseekV4Config(hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
                                        num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2)
    experts = _fill(DeepseekV4Experts(cfg))
    assert experts.limit == 10.0
    refused(experts, "DeepseekV4Experts", "limit = 10.0", "clamp")


def test_an_overridden_apply_gate_is_refused():
    class ScaledGate(Qwen3MoeExperts):
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up * 2

    refused(_fill(ScaledGate(transformers.Qwen3MoeConfig(**DIMS))), "ScaledGate", "_apply_gate")


def test_another_activation_is_refused():
    refused(qwen3_experts(hidden_act="gelu"), "act_fn is GELUActivation")
    refused(qwen3_experts(hidden_act="relu"), "act_fn is ReLU")


def test_biases_are_refused():
    gpt = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4,
                                    num_experts_per_tok=2)
    refused(_fill(gpt.GptOssExperts(cfg)), "GptOssExperts")       # biases, a clamp, its own gate

    experts = qwen3_experts()
    experts.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 128))
    refused(experts, "gate_up_proj_bias")

    experts = qwen3_experts()
    experts.has_bias = True
    refused(experts, "has_bias")


def test_a_config_clamp_is_refused():
    experts = qwen3_experts()
    experts.config.swiglu_limit = 7.0
    refused(experts, "swiglu_limit = 7.0")


def test_the_probe_catches_what_no_attribute_names():
    # A clamp with a name of its own, applied in an overridden forward: only running the
    # module shows it, and only at activations large enough for it to bind.
    class CappedForward(Qwen3MoeExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for j in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, j])
                    gate, up = (hidden_states[t] @ self.gate_up_proj[e].T).chunk(2)
                    h = self.act_fn(gate.clamp(max=20.0)) * up
                    out[t] += top_k_weights[t, j] * (h @ self.down_proj[e].T)
            return out

    refused(_fill(CappedForward(transformers.Qwen3MoeConfig(**DIMS))),
            "CappedForward", "its forward differs", "RMS 200")


def test_old_layout_with_bias_or_other_activation_is_refused():
    cfg = transformers.Qwen3MoeConfig(**DIMS)
    mlps = nn.ModuleList(_fill(Qwen3MoeMLP(cfg, intermediate_size=64), seed=e) for e in range(4))
    from_hf_experts(mlps, num_experts_per_tok=2, **KW)          # accepted as is
    mlps[2].up_proj.bias = nn.Parameter(torch.zeros(64))
    refused(mlps, "Qwen3MoeMLP", "up_proj has a bias")
    gelu = transformers.Qwen3MoeConfig(**DIMS, hidden_act="gelu_new")
    mlps = nn.ModuleList(_fill(Qwen3MoeMLP(gelu, intermediate_size=64), seed=e) for e in range(4))
    refused(mlps, "act_fn is NewGELUActivation")

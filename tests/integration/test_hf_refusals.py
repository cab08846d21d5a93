"""from_hf_experts refuses every experts module whose computation ktgen does not reproduce
exactly, naming the reason, and still takes the ones it does."""

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


def deepseek_v4_experts():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    cfg = transformers.DeepseekV4Config(hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
                                        num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2)
    experts = _fill(DeepseekV4Experts(cfg))
    assert experts.limit == 10.0
    return experts


def test_deepseek_v4_clamped_swiglu_runs_and_matches_the_module():
    """DeepSeek-V4's experts clamp their SwiGLU at swiglu_limit: ktgen takes the limit into its
    spec and matches the module's output and input gradient where the clamp binds."""
    experts = deepseek_v4_experts()
    layer = from_hf_experts(experts, **KW)
    assert layer.spec.swiglu_limit == 10.0
    gen = torch.Generator().manual_seed(5)
    T = 24
    # gate and up pre-activations of RMS about 20: the limit 10 binds for about half of them
    x = (torch.randn(T, 64, generator=gen) * 12).bfloat16().float()
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=gen)
    go = torch.randn(T, 64, generator=gen).bfloat16().float()

    xr = x.clone().requires_grad_(True)
    want = experts(xr, ids, w)
    (want * go).sum().backward()
    xk = x.bfloat16().requires_grad_(True)
    got = layer(xk, ids, w)
    (got.float() * go).sum().backward()

    def rel(a, b):
        return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())

    assert rel(got, want) < 1e-2
    assert rel(xk.grad, xr.grad) < 2e-2
    # and the clamp is what makes them agree: the plain SwiGLU is far off
    g, u, d = experts.gate_up_proj[:, :64], experts.gate_up_proj[:, 64:], experts.down_proj
    plain = torch.zeros_like(x)
    for t in range(T):
        for j in range(2):
            e = int(ids[t, j])
            plain[t] += w[t, j] * ((torch.nn.functional.silu(x[t] @ g[e].T) * (x[t] @ u[e].T)) @ d[e].T)
    assert rel(plain, want) > 0.2


def test_a_spec_must_name_the_modules_clamp():
    import ktgen

    experts = deepseek_v4_experts()
    spec = ktgen.MoESpec(name="v4", expert_num=4, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=64, max_len=64, lora=dict(rank=4, alpha=8.0))
    with pytest.raises(ValueError, match="swiglu_limit = None, but the module's experts clamp at 10.0"):
        from_hf_experts(experts, spec)
    with pytest.raises(ValueError, match="swiglu_limit: 7.0 given"):
        from_hf_experts(experts, swiglu_limit=7.0, **KW)


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


def test_a_config_clamp_the_module_does_not_apply_is_refused():
    # the config declares DeepSeek-V4's clamp, but the experts do not apply it: running them
    # shows it, and the module is refused rather than run with a clamp it does not have
    experts = qwen3_experts()
    experts.config.swiglu_limit = 7.0
    refused(experts, "its forward differs from silu(min(gate, 7)) * clamp(up, ±7)")


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

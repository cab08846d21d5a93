"""GPU hybrid: KTMoE takes CUDA activations, runs its experts on the CPU through
pinned buffers, returns its output on the input's device, and gradients flow back there; the
LoRA parameters stay on the CPU when the model moves. Skipped without CUDA; run as written on a
machine that has it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

import ktgen  # noqa: E402
from ktgen.torch import KTMoE  # noqa: E402

from helpers import LORA_NAMES  # noqa: E402


def layer_and_inputs():
    spec = ktgen.MoESpec(name="gpu_layer", expert_num=6, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=96, max_len=64, lora={"rank": 4})
    gen = torch.Generator().manual_seed(0)
    E, H, I = 6, 64, 96
    layer = KTMoE(spec, *(torch.randn(s, generator=gen) * 0.3 for s in ((E, I, H), (E, I, H), (E, H, I))),
                  generator=gen)
    with torch.no_grad():
        for n in LORA_NAMES:
            getattr(layer, n).normal_(0, 0.2, generator=gen)
    x = torch.randn(2, 10, H, generator=gen).bfloat16()
    ids = torch.randint(0, E, (2, 10, 2), generator=gen)
    ids[0, 0, 1] = -1
    w = torch.rand(2, 10, 2, generator=gen)
    return layer, x, ids, w


def run(layer, x, ids, w, device):
    xd = x.to(device).requires_grad_(True)
    wd = w.to(device).requires_grad_(True)
    out = layer(xd, ids.to(device), wd)
    g = torch.ones_like(out) * 0.01
    out.backward(g)
    return out, xd.grad, wd.grad, [getattr(layer, n).grad.clone() for n in LORA_NAMES]


def test_cuda_activations_give_the_cpu_results_on_the_device():
    layer, x, ids, w = layer_and_inputs()
    out_c, gx_c, gw_c, lora_c = run(layer, x, ids, w, "cpu")
    layer.zero_grad()
    out_g, gx_g, gw_g, lora_g = run(layer, x, ids, w, "cuda")
    assert out_g.device.type == gx_g.device.type == gw_g.device.type == "cuda"
    assert torch.equal(out_g.cpu(), out_c) and torch.equal(gx_g.cpu(), gx_c) and torch.equal(gw_g.cpu(), gw_c)
    for a, b in zip(lora_c, lora_g):
        assert b.device.type == "cpu" and torch.equal(a, b)


def test_lora_parameters_stay_on_the_cpu_when_the_model_moves():
    layer, x, ids, w = layer_and_inputs()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), layer)   # Sequential only to hold both
    model.to("cuda")
    assert model[0].weight.device.type == "cuda"
    assert all(getattr(layer, n).device.type == "cpu" for n in LORA_NAMES)
    out = layer(x.cuda(), ids.cuda(), w.cuda())
    assert out.device.type == "cuda"
    model.to("cuda", torch.bfloat16)
    assert all(getattr(layer, n).dtype == torch.bfloat16 and getattr(layer, n).device.type == "cpu"
               for n in LORA_NAMES)


def test_inputs_on_two_devices_are_refused():
    layer, x, ids, w = layer_and_inputs()
    with pytest.raises(ValueError, match="topk_weights: on cpu, but hidden_states is on cuda"):
        layer(x.cuda(), ids.cuda(), w)

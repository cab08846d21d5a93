"""The clamped SwiGLU of DeepSeek-V4 (spec.swiglu_limit = L: h = silu(min(g, L)) clip(u, -L, L)),
forward and backward against the float64 reference, on every tier this CPU runs and on the amx
tier (emulated where the CPU lacks it), at a limit that binds for a good share of the entries."""

from __future__ import annotations

import numpy as np
import pytest

import ktgen
from ktgen import reference as ref
from helpers import (GRAD_TOL, OUT_TOL, RUN_TIERS, bf16, build, expected_backward, expected_forward,
                     make_inputs)

LIMIT = 1.5


def clamp_spec(tier, lora="float32", limit=LIMIT):
    return ktgen.MoESpec(name="clamped", expert_num=6, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=96, max_len=48, lora=None if lora is None else dict(rank=4, dtype=lora),
                         isa=tier, swiglu_limit=limit)


@pytest.mark.parametrize("lora", ["float32", None])
@pytest.mark.parametrize("tier", RUN_TIERS + ["amx"])
def test_clamped_layer_matches_the_reference(tier, lora, monkeypatch):
    if tier == "amx" and (ktgen.isa.missing_features("amx") or not ktgen.isa.amx_permission()):
        monkeypatch.setenv("KTGEN_EMULATE_AMX", "1")
    spec = clamp_spec(tier, lora)
    # weights of std 0.25 on inputs of std 1: gate and up pre-activations of std about 2, so
    # the limit 1.5 binds for about half of them on either side
    moe, lw = build(spec, seed=3, weight_std=0.25)
    rng = np.random.default_rng(7)
    x, ids, rw = make_inputs(spec, rng, 40)
    out, saved = moe.forward_train(x, ids, rw)
    grad_out = rng.standard_normal(out.shape, np.float32).astype(bf16)
    grads = moe.backward(saved, grad_out)

    want = expected_forward(moe, x, ids, rw)
    assert ref.rel_l2(out, want) <= OUT_TOL
    expect = expected_backward(moe, x, ids, rw, grad_out)
    for name, e in expect.items():
        assert ref.rel_l2(getattr(grads, name), e) <= GRAD_TOL, name

    # the clamp matters here: without it the reference is far off
    dq = [moe.dequantized(n) for n in ("gate", "up", "down")]
    scale = spec.lora.scale if spec.lora else 1.0
    unclamped = ref.forward(x, ids, rw, *dq, lw, scale)
    assert ref.rel_l2(unclamped, want) > 20 * OUT_TOL
    loose = ref.backward(x, ids, rw, *dq, grad_out, lw, scale)
    assert ref.rel_l2(loose["input"], expect["input"]) > 20 * GRAD_TOL


def test_a_limit_that_never_binds_changes_nothing():
    """With L far above every pre-activation the clamped kernel equals the plain one to the bit."""
    tier = RUN_TIERS[0]
    plain = clamp_spec(tier, limit=None)
    loose = clamp_spec(tier, limit=1e30)
    moe_a, _ = build(plain, seed=3, weight_std=0.25)
    moe_b, _ = build(loose, seed=3, weight_std=0.25)
    rng = np.random.default_rng(7)
    x, ids, rw = make_inputs(plain, rng, 40)
    out_a, saved_a = moe_a.forward_train(x, ids, rw)
    out_b, saved_b = moe_b.forward_train(x, ids, rw)
    np.testing.assert_array_equal(out_a, out_b)
    grad_out = rng.standard_normal(out_a.shape, np.float32).astype(bf16)
    ga, gb = moe_a.backward(saved_a, grad_out), moe_b.backward(saved_b, grad_out)
    for name in ("input", "routing_weights", "gate_a", "up_b", "down_a"):
        np.testing.assert_array_equal(getattr(ga, name), getattr(gb, name))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_swiglu_limit_must_be_positive_and_finite(bad):
    with pytest.raises(ktgen.SpecError, match="swiglu_limit"):
        clamp_spec("generic", limit=bad)


def test_swiglu_limit_round_trips_through_yaml():
    spec = clamp_spec("generic", limit=7.0)
    again = ktgen.MoESpec.from_yaml(spec.to_yaml())
    assert again.swiglu_limit == 7.0 and again == spec

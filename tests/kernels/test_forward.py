"""The accuracy limits (docs/design.md#accuracy) for the forward pass: MoE.forward / forward_train against the float64 oracle.

Every tier this CPU runs, LoRA off / float32 / bfloat16, tp_count 1 and 2, T from 0 to
max_len, realistic magnitudes and awkward routings:
skipped slots, duplicates within a row, experts with no tokens, everything on one expert,
expert-sorted order that differs from token order.

Shapes: the awkward layer E=8, k=3, H=96, I=160 (not a multiple of 64), LoRA rank 5,
max_len 100 (tp 1 only), and Qwen3-30B-A3B's H=2048, I=768 cut to E=4, k=2 (tp 1 and 2).
"""

from __future__ import annotations

import numpy as np
import pytest

import ktgen
from ktgen import reference as ref
from helpers import (AWK_CASES, AWK_MAX_LEN, LORA_KINDS, OUT_TOL, ROUTINGS, RUN_TIERS, awkward_spec, bf16,
                     build, check_out, expected_forward, lora_std, make_inputs, make_weights, qwen_spec, routing)


# ---- awkward shape: every T, every magnitude, LoRA off/f32/bf16, every tier ----

@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
@pytest.mark.parametrize("T,wstd,xstd", AWK_CASES, ids=[f"T{T}-w{w}-x{x}" for T, w, x in AWK_CASES])
def test_forward_accuracy_awkward(tier, lora_dtype, T, wstd, xstd):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=T, weight_std=wstd)
    assert moe.kernel.isa == tier
    rng = np.random.default_rng(100 + T)
    x, ids, rw = make_inputs(spec, rng, T, xstd)
    out = moe.forward(x, ids, rw)
    check_out(out, T, spec.hidden_size)
    expected = expected_forward(moe, x, ids, rw)
    assert ref.rel_l2(out, expected) <= OUT_TOL
    if T == 0:
        return
    # forward_train computes the same output bitwise
    out_train, saved = moe.forward_train(x, ids, rw)
    assert np.array_equal(out_train.view(np.uint16), out.view(np.uint16))
    del saved


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
@pytest.mark.parametrize("kind", ROUTINGS)
def test_forward_routings(tier, lora_dtype, kind):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=1, weight_std=1.0)
    rng = np.random.default_rng(7)
    T = AWK_MAX_LEN
    ids = routing(kind, T, spec.num_experts_per_tok, spec.expert_num, rng)
    x, ids, rw = make_inputs(spec, rng, T, 1.0, ids=ids)
    out = moe.forward(x, ids, rw)
    check_out(out, T, spec.hidden_size)
    assert ref.rel_l2(out, expected_forward(moe, x, ids, rw)) <= OUT_TOL


def test_routing_cases_are_what_they_claim():
    """The routings above really contain the situations they are named after."""
    rng = np.random.default_rng(7)
    T, k, E = AWK_MAX_LEN, 3, 8
    ids = routing("random", T, k, E, rng)
    assert (ids == -1).any() and (ids >= 0).any()
    ids = routing("duplicates", T, k, E, rng)
    assert (ids[:, 0] == ids[:, 1]).all()
    ids = routing("empty_expert", T, k, E, rng)
    assert not (ids == 0).any() and not (ids == E - 2).any()
    ids = routing("reversed_order", T, k, E, rng)
    # token order of the first slot is decreasing in expert id: sorted order differs
    assert ids[0, 0] > ids[-1, 0]
    assert (ids >= 0).all() and (ids < E).all()


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
def test_forward_all_slots_skipped_is_exactly_zero(tier, lora_dtype):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=2)
    rng = np.random.default_rng(3)
    for T in (1, 7, AWK_MAX_LEN):
        x, ids, rw = make_inputs(spec, rng, T, 10.0, ids=np.full((T, 3), -1))
        out = moe.forward(x, ids, rw)
        check_out(out, T, spec.hidden_size)
        assert not out.view(np.uint16).any(), "skipped slots must add exactly nothing (+0.0)"


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
def test_forward_empty_batch(tier, lora_dtype):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=4)
    x = np.empty((0, spec.hidden_size), bf16)
    for id_dtype in (np.int32, np.int64):
        ids = np.empty((0, 3), id_dtype)
        rw = np.empty((0, 3), np.float32)
        check_out(moe.forward(x, ids, rw), 0, spec.hidden_size)
        out, saved = moe.forward_train(x, ids, rw)
        check_out(out, 0, spec.hidden_size)


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_lora_contributes(tier, lora_dtype):
    """Random LoRA changes the output noticeably, and zero LoRA is exactly the base layer."""
    spec = awkward_spec(lora_dtype, tier)
    moe_lora, lw = build(spec, seed=5, weight_std=1.0, lora="random")
    moe_zero, _ = build(spec, seed=5, weight_std=1.0, lora="zeros")
    base_spec = awkward_spec(None, tier)
    moe_base, _ = build(base_spec, seed=5, weight_std=1.0)
    rng = np.random.default_rng(6)
    x, ids, rw = make_inputs(spec, rng, 64, 1.0)
    out_lora = moe_lora.forward(x, ids, rw)
    out_zero = moe_zero.forward(x, ids, rw)
    out_base = moe_base.forward(x, ids, rw)
    assert ref.rel_l2(out_lora, out_zero) > 0.2, "LoRA should change the output noticeably"
    assert ref.rel_l2(out_lora, expected_forward(moe_lora, x, ids, rw)) <= OUT_TOL
    assert ref.rel_l2(out_zero, out_base) <= OUT_TOL
    assert ref.rel_l2(out_zero, expected_forward(moe_base, x, ids, rw)) <= OUT_TOL
    # and the LoRA of a single projection matters on its own
    for name in ("gate_b", "up_b", "down_b"):
        only = ktgen.LoRAWeights.zeros(spec)
        only_a = name.replace("_b", "_a")
        setattr(only, name, getattr(lw, name).copy())
        setattr(only, only_a, getattr(lw, only_a).copy())
        moe_zero.set_lora(only)
        out_one = moe_zero.forward(x, ids, rw)
        assert ref.rel_l2(out_one, out_base) > 0.05, name
        assert ref.rel_l2(out_one, expected_forward(moe_zero, x, ids, rw)) <= OUT_TOL, name


# ---- Qwen3-30B-A3B dims, tp 1 and 2 ----

# (variant, weight std, activation std): each variant at one corner (test_backward checks both).
QWEN_CASES = [("tp1-f32", 0.02, 10.0), ("tp2-f32", 1.0, 0.01), ("tp2-bf16", 0.02, 10.0),
              ("tp2-nolora", 1.0, 0.01)]


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("variant,wstd,xstd", QWEN_CASES, ids=[f"{v}-w{w}-x{x}" for v, w, x in QWEN_CASES])
def test_forward_accuracy_qwen(tier, variant, wstd, xstd):
    spec = qwen_spec(variant, tier)
    assert spec.hidden_size == 2048 and spec.intermediate_size == 768
    moe, _ = build(spec, seed=11, weight_std=wstd)
    rng = np.random.default_rng(12)
    T = 9
    ids = routing("random", T, 2, 4, rng)
    ids[3] = [1, 1]         # a duplicate
    ids[4] = [-1, -1]       # a token routed nowhere
    x, ids, rw = make_inputs(spec, rng, T, xstd, ids=ids)
    out = moe.forward(x, ids, rw)
    check_out(out, T, spec.hidden_size)
    assert ref.rel_l2(out, expected_forward(moe, x, ids, rw)) <= OUT_TOL
    assert not out[4].view(np.uint16).any()


@pytest.mark.parametrize("tier", RUN_TIERS)
def test_forward_tp2_matches_tp1(tier):
    """tp_count = 2 computes the same layer as tp_count = 1 (within the accuracy limits), with LoRA."""
    spec1 = qwen_spec("tp1-f32", tier)
    rng = np.random.default_rng(13)
    gate, up, down = make_weights(spec1, rng, 0.02)
    lw = ktgen.LoRAWeights.random(spec1, rng, lora_std(spec1, 0.02))
    moe1 = ktgen.MoE(spec1, gate, up, down, lw)
    moe2 = ktgen.MoE(qwen_spec("tp2-f32", tier), gate, up, down, lw)
    x, ids, rw = make_inputs(moe1.spec, rng, 16, 1.0)
    out1, out2 = moe1.forward(x, ids, rw), moe2.forward(x, ids, rw)
    assert ref.rel_l2(out2, out1) <= OUT_TOL
    assert ref.rel_l2(out2, expected_forward(moe1, x, ids, rw)) <= OUT_TOL


@pytest.mark.parametrize("tier", RUN_TIERS)
def test_outputs_round_to_bf16_to_nearest_even_on_every_tier(tier):
    """The float32 -> bf16 rounding of outputs and input gradients (the tier's vector code, a
    scalar tail) against its definition, bit for bit: ties to even, overflow to inf, denormals,
    signed zeros and infinities, NaNs kept NaN (quieted, sign kept)."""
    moe, _ = build(awkward_spec("float32", tier))
    specials = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x00000000, 0x80000000,
                         0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                         0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00000, 0x7FBFFFFF], np.uint32)
    rng = np.random.default_rng(3)
    normal = (rng.standard_normal(986) * 10.0 ** rng.integers(-30, 30, 986)).astype(np.float32)
    a = np.concatenate([specials.view(np.float32), normal])      # 1003 values: a scalar tail too
    u = a.view(np.uint32).astype(np.uint64)
    want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    want[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    assert np.array_equal(moe._to_bf16(a).view(np.uint16), want)

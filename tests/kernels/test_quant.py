"""Quantized base weights (docs/design.md#base-weight-formats): formulas, checkpoint formats, kernels against the reference."""

from __future__ import annotations

import gc
import weakref

import ml_dtypes
import numpy as np
import pytest

import ktgen
from ktgen import quant, reference
from ktgen.reference import rel_l2

from helpers import LORA_NAMES, RUN_TIERS, make_inputs, make_weights, pack_autoawq, pack_compressed_tensors

bf16 = ml_dtypes.bfloat16
MODES = [("int8", None), ("awq", 32), ("k2", 32)]


def gaussian(shape, seed=0, std=1.0):
    return (np.random.default_rng(seed).standard_normal(shape, np.float32) * std).astype(bf16)


# ---- the quantizers themselves ----

@pytest.mark.parametrize("mode,G,bound", [("int8", None, 0.01), ("awq", 128, 0.12), ("k2", 32, 0.12)])
def test_quantization_error_of_gaussian_weights(mode, G, bound):
    w = gaussian((4, 64, 256))
    err = rel_l2(quant.dequantize(quant.quantize(w, mode, G)), w.astype(np.float64))
    print(f"{mode} G={G}: weight relL2 {err:.4f} (bound {bound})")
    assert err <= bound


def test_int8_formula_per_row():
    w = gaussian((1, 3, 64), seed=1)
    w[0, 1] = 0  # a zero row gets scale 1
    qw = quant.quantize(w, "int8")
    wf = w.astype(np.float32)[0]
    scale = np.abs(wf).max(axis=1) / np.float32(127)
    scale[1] = 1
    np.testing.assert_array_equal(qw.scales[0], scale)
    np.testing.assert_array_equal(qw.q[0], np.clip(np.rint(wf / scale[:, None]), -127, 127))
    assert np.abs(qw.q).max() <= 127


def test_awq_formula_per_group():
    w = gaussian((1, 2, 64), seed=2)
    G = 16
    qw = quant.quantize(w, "awq", G)
    u = np.empty((2, 64), np.int64)
    u[:, 0::2], u[:, 1::2] = qw.q[0] & 15, qw.q[0] >> 4
    for r in range(2):
        for g in range(64 // G):
            x = w[0, r, g * G:(g + 1) * G].astype(np.float32)
            scale = np.float16(max(x.max() - x.min(), np.float32(1e-5)) / np.float32(15))
            zero = int(np.clip(np.rint(-x.min() / np.float32(scale)), 0, 15))
            assert qw.scales[0, r, g] == scale and qw.zeros[0, r, g] == zero
            expect = np.clip(np.rint(x / np.float32(scale)) + zero, 0, 15)
            np.testing.assert_array_equal(u[r, g * G:(g + 1) * G], expect)


def test_k2_formula_and_zero_group():
    w = gaussian((1, 2, 64), seed=3)
    w[0, 0, :32] = 0  # an all-zero group gets scale 1
    qw = quant.quantize(w, "k2", 32)
    assert qw.scales[0, 0, 0] == 1
    x = w[0, 1, 32:].astype(np.float32)
    scale = (np.abs(x).max() / np.float32(7)).astype(bf16)
    assert qw.scales[0, 1, 1] == scale
    u = np.empty(64, np.int64)
    u[0::2], u[1::2] = qw.q[0, 1] & 15, qw.q[0, 1] >> 4
    np.testing.assert_array_equal(u[32:] - 8, np.clip(np.rint(x / np.float32(scale)), -8, 7))


# ---- checkpoint formats (packed by helpers.pack_autoawq and pack_compressed_tensors) ----

def test_from_autoawq_reproduces_the_checkpoint_exactly():
    rng = np.random.default_rng(4)
    K, N, G = 128, 48, 32
    intweight = rng.integers(0, 16, (K, N))
    intzeros = rng.integers(0, 16, (K // G, N))
    scales = (rng.random((K // G, N)) * 0.05 + 1e-3).astype(np.float16)
    qweight, qzeros = pack_autoawq(intweight, intzeros)
    # What an AutoAWQ layer computes with: W [K, N] = (q - zero) * scale, per group along K.
    expect = ((intweight - np.repeat(intzeros, G, 0)).astype(np.float32)
              * np.repeat(scales, G, 0).astype(np.float32))
    qw = quant.from_autoawq(qweight, qzeros, scales, G)
    assert qw.shape == (1, N, K)
    np.testing.assert_array_equal(quant.dequantize(qw)[0], expect.T)
    # stacked over experts: a leading dim, or ktgen.quant.stack of per-expert results
    stacked = quant.from_autoawq(np.stack([qweight] * 3), np.stack([qzeros] * 3), np.stack([scales] * 3), G)
    assert stacked.shape == (3, N, K)
    np.testing.assert_array_equal(quant.dequantize(stacked)[2], expect.T)
    np.testing.assert_array_equal(quant.stack([qw, qw]).q, stacked.q[:2])


def test_from_compressed_tensors_reproduces_the_checkpoint_exactly():
    rng = np.random.default_rng(5)
    N, K, G = 40, 96, 32
    q = rng.integers(-8, 8, (N, K))
    scale = (rng.random((N, K // G)) * 0.05 + 1e-3).astype(bf16)
    expect = q.astype(np.float32) * np.repeat(scale.astype(np.float32), G, 1)
    qw = quant.from_compressed_tensors(pack_compressed_tensors(q), scale, (N, K))
    assert qw.mode == "k2" and qw.group_size == G
    np.testing.assert_array_equal(quant.dequantize(qw)[0], expect)


def test_from_int8():
    rng = np.random.default_rng(6)
    q = rng.integers(-127, 128, (2, 8, 64)).astype(np.int8)
    s = rng.random((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(quant.dequantize(quant.from_int8(q, s)), q.astype(np.float32) * s[..., None])


@pytest.mark.parametrize("call,names", [
    (lambda: quant.from_autoawq(np.zeros((128, 6), np.int32), np.zeros((4, 6), np.int32),
                                np.zeros((4, 48), np.float16), 48), "group_size"),
    (lambda: quant.from_autoawq(np.zeros((128, 6), np.int32), np.zeros((3, 6), np.int32),
                                np.zeros((4, 48), np.float16), 32), "qzeros"),
    (lambda: quant.from_autoawq(np.zeros((128, 6), np.int32), np.zeros((4, 6), np.int32),
                                np.zeros((4, 48), np.float32), 32), "scales"),
    (lambda: quant.from_autoawq(np.zeros((128, 6), np.int64), np.zeros((4, 6), np.int32),
                                np.zeros((4, 48), np.float16), 32), "qweight"),
    (lambda: quant.from_compressed_tensors(np.zeros((4, 12), np.int32), np.zeros((4, 3), bf16), (4, 64)),
     "weight_packed"),
    (lambda: quant.from_compressed_tensors(np.zeros((4, 12), np.int32), np.zeros((4, 5), bf16), (4, 96)),
     "weight_scale"),
    (lambda: quant.from_int8(np.zeros((4, 8), np.int8), np.zeros(5, np.float32)), "scales"),
    (lambda: quant.quantize(gaussian((1, 4, 64)), "awq", 48), "group_size"),
])
def test_mismatched_quant_tensors_are_refused(call, names):
    with pytest.raises(ValueError, match=names):
        call()


# ---- the kernels ----

def qspec(mode, G, tp=1, lora=True, name=None):
    q = {"mode": mode} if G is None else {"mode": mode, "group_size": G}
    return ktgen.MoESpec(name=name or f"quant_{mode}", expert_num=6, num_experts_per_tok=2, hidden_size=96,
                         intermediate_size=128, max_len=40, quant=q, tp_count=tp,
                         lora={"rank": 4} if lora else None)


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("mode,G", MODES + [("awq", 16), ("k2", 8)])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "nolora"])
def test_quantized_forward_and_backward_meet_section7(monkeypatch, tier, mode, G, lora):
    monkeypatch.setenv("KTGEN_ISA", tier)
    spec = qspec(mode, G, lora=lora)
    rng = np.random.default_rng(7)
    gate, up, down = make_weights(spec, rng, std=0.5)
    lw = ktgen.LoRAWeights.random(spec, rng, std=0.3) if lora else None
    moe = ktgen.MoE(spec, gate, up, down, lw)
    assert moe.kernel.isa == tier
    ids = rng.integers(0, spec.expert_num, (33, 2))
    ids[::5, 1] = -1
    ids[:8] = 3  # one crowded expert; expert 5 may be empty
    ids[ids == 5] = 4
    x, ids, rw = make_inputs(spec, rng, 33, ids=ids)
    dq = [moe.dequantized(n) for n in ("gate", "up", "down")]
    scale = spec.lora.scale if lora else 1.0
    out, saved = moe.forward_train(x, ids, rw)
    assert rel_l2(out, reference.forward(x, ids, rw, *dq, lw, scale)) <= 3e-2
    grad_out = (rng.standard_normal(out.shape) * 0.1).astype(bf16)
    grads = moe.backward(saved, grad_out)
    expect = reference.backward(x, ids, rw, *dq, grad_out, lw, scale)
    for name, e in expect.items():
        assert rel_l2(getattr(grads, name), e) <= 4e-2, name


@pytest.mark.parametrize("mode,G", MODES)
def test_tp2_equals_tp1(mode, G):
    rng = np.random.default_rng(8)
    one = qspec(mode, G, tp=1, name=f"quant_{mode}")
    gate, up, down = make_weights(one, rng)
    lw = ktgen.LoRAWeights.random(one, rng, std=0.3)
    x, ids, rw = make_inputs(one, rng, 21)
    grad_out = (rng.standard_normal((21, one.hidden_size)) * 0.1).astype(bf16)
    results = []
    for tp in (1, 2):
        moe = ktgen.MoE(qspec(mode, G, tp=tp, name=f"quant_{mode}"), gate, up, down, lw)
        out, saved = moe.forward_train(x, ids, rw)
        results.append((out, moe.backward(saved, grad_out), moe.dequantized("down")))
    (o1, g1, d1), (o2, g2, d2) = results
    np.testing.assert_array_equal(d1, d2)  # the partitions hold exactly the weights tp 1 holds
    assert rel_l2(o2, o1) <= 1e-2
    for name in ("input", "routing_weights") + LORA_NAMES:
        assert rel_l2(getattr(g2, name), getattr(g1, name)) <= 2e-2, name


@pytest.mark.parametrize("mode,G", MODES)
def test_dequantized_is_exactly_what_the_quantizer_gives(mode, G):
    spec = qspec(mode, G)
    rng = np.random.default_rng(9)
    gate, up, down = make_weights(spec, rng)
    moe = ktgen.MoE(spec, gate, up, down)
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        np.testing.assert_array_equal(moe.dequantized(name), quant.dequantize(quant.quantize(w, mode, G)))


@pytest.mark.parametrize("mode,G", MODES)
def test_prequantized_weights_give_the_same_layer(mode, G):
    spec = qspec(mode, G)
    rng = np.random.default_rng(10)
    weights = make_weights(spec, rng)
    lw = ktgen.LoRAWeights.random(spec, rng, std=0.1)
    x, ids, rw = make_inputs(spec, rng, 9)
    a = ktgen.MoE(spec, *weights, lw).forward(x, ids, rw)
    b = ktgen.MoE(spec, *(quant.quantize(w, mode, G) for w in weights), lw).forward(x, ids, rw)
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("mode,G", MODES)
def test_memory_is_the_packed_payload_and_no_bf16_copy_is_kept(mode, G):
    spec = qspec(mode, G)
    rng = np.random.default_rng(11)
    gate, up, down = make_weights(spec, rng)
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    n = 3 * E * H * I
    if mode == "int8":
        payload = n + 4 * E * (2 * I + H)            # 1 byte a weight, float32 scale a row
    else:
        groups = n // G
        payload = n // 2 + 2 * groups + (groups // 2 if mode == "awq" else 0)  # + int4 zeros
    refs = [weakref.ref(w) for w in (gate, up, down)]
    moe = ktgen.MoE(spec, gate, up, down)
    del gate, up, down
    gc.collect()
    assert all(r() is None for r in refs), "the MoE keeps the caller's bf16 weights alive"
    held = moe.memory()["base_weights"]
    print(f"{mode}: base_weights {held} B, packed payload {payload} B, ratio {held / payload:.3f}")
    assert held <= 1.05 * payload


def test_prequantized_of_another_mode_or_group_is_refused():
    rng = np.random.default_rng(12)
    spec = qspec("awq", 32)
    gate, up, down = make_weights(spec, rng)
    with pytest.raises(ValueError, match="gate: pre-quantized k2"):
        ktgen.MoE(spec, quant.quantize(gate, "k2", 32), up, down)
    with pytest.raises(ValueError, match="up: group_size 16"):
        ktgen.MoE(spec, gate, quant.quantize(up, "awq", 16), down)
    with pytest.raises(ValueError, match="down: expected quantized weights of shape"):
        ktgen.MoE(spec, gate, up, quant.quantize(gate, "awq", 32))
    with pytest.raises(ValueError, match="gate: pre-quantized int8"):
        ktgen.MoE(qspec("bf16", None), quant.quantize(gate, "int8"), up, down)


def test_int8_forward_uses_vnni_where_the_tier_has_it():
    spec = qspec("int8", None)
    with_vnni = ktgen.render.render(spec, ktgen.Target("avx512", {"vnni"}))
    assert with_vnni.kernel_set == "vnni" and "_mm512_dpbusd_epi32" in with_vnni.source
    assert "vnni_rows(rb.mr, A + (lo + rb.r0) * lda, lda, g->w->q" in with_vnni.source
    assert "vnni_rows" not in ktgen.render.render(spec, ktgen.Target("avx512")).source
    assert "vnni_rows" not in ktgen.render.render(qspec("bf16", None), ktgen.Target("avx512", {"vnni"})).source
    # the avx512 emulation has vpdpbusd too, so the VNNI path is what RUN_TIERS' avx512 tests run
    assert ktgen.render.render(spec, ktgen.Target("avx512", emulate=True)).kernel_set == "vnni"

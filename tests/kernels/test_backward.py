"""The accuracy limits (docs/design.md#accuracy) for the backward pass: MoE.backward against the float64 oracle, term by term.

grads.input, grads.routing_weights and each of the six LoRA gradients within 2e-2 relL2 of
reference.backward on the same bf16 inputs and MoE.dequantized weights, for every tier this
CPU runs, LoRA off / float32 / bfloat16, tp_count 1 and 2, T from 0 to max_len, realistic
magnitudes and the routings of test_forward. Also the gradients' kinds:
input bf16 [T,H], routing_weights float32 [T,k], LoRA grads in lora.dtype with the LoRA
shapes, None without LoRA.
"""

from __future__ import annotations

import numpy as np
import pytest

import ktgen
from ktgen import reference as ref
from helpers import (AWK_CASES, AWK_MAX_LEN, GRAD_TOL, LORA_KINDS, LORA_NAMES, OUT_TOL, QWEN_VARIANTS,
                     ROUTINGS, RUN_TIERS, awkward_spec, bf16, build, check_out, expected_backward,
                     expected_forward, lora_std, make_inputs, make_weights, qwen_spec, routing)


def check_grad_kinds(spec, grads, T):
    """Types, dtypes and shapes of a Grads (docs/design.md#the-python-api)."""
    H, k = spec.hidden_size, spec.num_experts_per_tok
    assert isinstance(grads, ktgen.Grads)
    assert isinstance(grads.input, np.ndarray)
    assert grads.input.dtype == bf16 and grads.input.shape == (T, H)
    assert grads.routing_weights.dtype == np.float32 and grads.routing_weights.shape == (T, k)
    if spec.lora is None:
        for name in LORA_NAMES:
            assert getattr(grads, name) is None, name
        return
    want = bf16 if spec.lora.dtype == "bfloat16" else np.dtype(np.float32)
    for name, shape in ktgen.LoRAWeights.shapes(spec).items():
        g = getattr(grads, name)
        assert isinstance(g, np.ndarray), name
        assert g.dtype == want, f"{name}: dtype {g.dtype}, expected {want}"
        assert g.shape == shape, f"{name}: shape {g.shape}, expected {shape}"


def assert_grads_close(grads, expected, tol=GRAD_TOL):
    errors = {name: ref.rel_l2(getattr(grads, name), e) for name, e in expected.items()}
    bad = {n: f"{v:.3g}" for n, v in errors.items() if not v <= tol}
    assert not bad, f"relL2 above {tol}: {bad} (all: { {n: f'{v:.2g}' for n, v in errors.items()} })"


def run_backward(moe, x, ids, rw, grad_std=1.0, seed=0):
    spec = moe.spec
    out, saved = moe.forward_train(x, ids, rw)
    check_out(out, x.shape[0], spec.hidden_size)
    rng = np.random.default_rng(seed)
    grad_out = (rng.standard_normal(out.shape, np.float32) * grad_std).astype(bf16)
    grads = moe.backward(saved, grad_out)
    check_grad_kinds(spec, grads, x.shape[0])
    return out, grad_out, grads


# ---- awkward shape ----

@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
@pytest.mark.parametrize("T,wstd,xstd", AWK_CASES, ids=[f"T{T}-w{w}-x{x}" for T, w, x in AWK_CASES])
def test_backward_accuracy_awkward(tier, lora_dtype, T, wstd, xstd):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=T, weight_std=wstd)
    rng = np.random.default_rng(200 + T)
    x, ids, rw = make_inputs(spec, rng, T, xstd)
    out, grad_out, grads = run_backward(moe, x, ids, rw, seed=T)
    assert ref.rel_l2(out, expected_forward(moe, x, ids, rw)) <= OUT_TOL
    assert_grads_close(grads, expected_backward(moe, x, ids, rw, grad_out))
    # a skipped slot's routing gradient is exactly 0 (docs/design.md#the-math)
    assert not grads.routing_weights[ids == -1].any()


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
@pytest.mark.parametrize("kind", ROUTINGS)
def test_backward_routings(tier, lora_dtype, kind):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=1, weight_std=1.0)
    rng = np.random.default_rng(8)
    T = AWK_MAX_LEN
    ids = routing(kind, T, spec.num_experts_per_tok, spec.expert_num, rng)
    x, ids, rw = make_inputs(spec, rng, T, 1.0, ids=ids)
    out, grad_out, grads = run_backward(moe, x, ids, rw, seed=9)
    assert ref.rel_l2(out, expected_forward(moe, x, ids, rw)) <= OUT_TOL
    expected = expected_backward(moe, x, ids, rw, grad_out)
    assert_grads_close(grads, expected)
    assert not grads.routing_weights[ids == -1].any()
    if spec.lora is not None and kind in ("empty_expert", "one_expert", "one_expert_every_slot"):
        # experts that got no token get exactly zero LoRA gradients
        used = set(ids[ids >= 0].tolist())
        for e in set(range(spec.expert_num)) - used:
            for name in LORA_NAMES:
                assert not getattr(grads, name)[e].astype(np.float32).any(), (name, e)


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("first", [1, 9], ids=["rows1-8", "rows9-16"])
def test_backward_every_chunk_size(tier, first):
    """Expert e gets first + e entries, so chunks of 1 to 16 rows meet the kernels: every row
    count of their row blocks (one block or several, near-equal, of at most bc_mr rows)."""
    spec = awkward_spec("float32", tier)
    E, k = spec.expert_num, spec.num_experts_per_tok
    counts = [first + e for e in range(E)]
    T = -(-sum(counts) // k)
    ids, load = np.full((T, k), -1, np.int64), np.zeros(T, np.int64)
    for e, c in enumerate(counts):   # each expert on the c least-loaded tokens, once a token
        tokens = np.argsort(load, kind="stable")[:c]
        ids[tokens, load[tokens]] = e
        load[tokens] += 1
    assert np.bincount(ids[ids >= 0], minlength=E).tolist() == counts
    moe, _ = build(spec, seed=3, weight_std=1.0)
    x, ids, rw = make_inputs(spec, np.random.default_rng(5), T, 1.0, ids=ids)
    out, grad_out, grads = run_backward(moe, x, ids, rw, seed=4)
    assert ref.rel_l2(out, expected_forward(moe, x, ids, rw)) <= OUT_TOL
    assert_grads_close(grads, expected_backward(moe, x, ids, rw, grad_out))


@pytest.mark.parametrize("tier", RUN_TIERS)
def test_a_tokens_outputs_and_gradients_do_not_depend_on_its_batch(tier):
    """Per token, the forward and the input and routing gradients are the same bits in a batch of
    24 tokens (about 9 entries an expert) as in its halves (about 4): no kernel may pick its arithmetic
    by the size of a chunk (docs/design.md; gradient accumulation and data parallelism rely on
    it)."""
    spec = awkward_spec("float32", tier)
    moe, _ = build(spec, seed=6, weight_std=1.0)
    rng = np.random.default_rng(11)
    x, ids, rw = make_inputs(spec, rng, 24, 1.0)
    g = (rng.standard_normal((24, spec.hidden_size)) * 0.1).astype(bf16)

    def run(a, b):
        out, saved = moe.forward_train(x[a:b], ids[a:b], rw[a:b])
        grads = moe.backward(saved, g[a:b])
        return [out.view(np.uint16), grads.input.view(np.uint16), grads.routing_weights.view(np.uint32)]

    whole, halves = run(0, 24), [run(0, 10), run(10, 24)]
    for name, w, h0, h1 in zip(("out", "grad input", "grad routing"), whole, *halves):
        assert np.array_equal(w, np.concatenate([h0, h1])), name


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
def test_backward_all_slots_skipped_is_exactly_zero(tier, lora_dtype):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=2)
    rng = np.random.default_rng(3)
    for T in (1, 7, AWK_MAX_LEN):
        x, ids, rw = make_inputs(spec, rng, T, 10.0, ids=np.full((T, 3), -1))
        out, _, grads = run_backward(moe, x, ids, rw, seed=T)
        assert not out.view(np.uint16).any()
        assert not grads.input.view(np.uint16).any(), "grad input must be exactly +0"
        assert not grads.routing_weights.any()
        if spec.lora is not None:
            for name in LORA_NAMES:
                assert not getattr(grads, name).astype(np.float32).any(), name


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", LORA_KINDS, ids=["lora_f32", "lora_bf16", "no_lora"])
def test_backward_empty_batch(tier, lora_dtype):
    spec = awkward_spec(lora_dtype, tier)
    moe, _ = build(spec, seed=4)
    x = np.empty((0, spec.hidden_size), bf16)
    ids = np.empty((0, 3), np.int32)
    rw = np.empty((0, 3), np.float32)
    out, saved = moe.forward_train(x, ids, rw)
    check_out(out, 0, spec.hidden_size)
    grads = moe.backward(saved, np.empty((0, spec.hidden_size), bf16))
    check_grad_kinds(spec, grads, 0)
    if spec.lora is not None:  # nothing routed: the LoRA gradients are exactly zero
        for name in LORA_NAMES:
            assert not getattr(grads, name).astype(np.float32).any(), name


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_backward_fresh_lora_init(tier, lora_dtype):
    """The usual LoRA init, A random and B = 0: the B gradients are non-zero and match, the A
    gradients are exactly zero (every A-side term goes through B)."""
    spec = awkward_spec(lora_dtype, tier)
    moe, lw = build(spec, seed=6, weight_std=0.02)
    for name in ("gate_b", "up_b", "down_b"):
        getattr(lw, name)[...] = 0
    rng = np.random.default_rng(10)
    x, ids, rw = make_inputs(spec, rng, 64, 1.0)
    _, grad_out, grads = run_backward(moe, x, ids, rw, seed=11)
    expected = expected_backward(moe, x, ids, rw, grad_out)
    assert_grads_close(grads, expected)
    for name in ("gate_a", "up_a", "down_a"):
        assert not getattr(grads, name).astype(np.float32).any(), name
    for name in ("gate_b", "up_b", "down_b"):
        assert np.abs(getattr(grads, name).astype(np.float32)).max() > 0, name


# ---- Qwen3-30B-A3B dims, tp 1 and 2 ----

QWEN_CASES = [(0.02, 10.0, 1.0), (1.0, 0.01, 1e-3)]  # weight std, activation std, grad_out std


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("variant", list(QWEN_VARIANTS))
@pytest.mark.parametrize("wstd,xstd,gstd", QWEN_CASES, ids=[f"w{w}-x{x}-g{g}" for w, x, g in QWEN_CASES])
def test_backward_accuracy_qwen(tier, variant, wstd, xstd, gstd):
    spec = qwen_spec(variant, tier)
    moe, _ = build(spec, seed=11, weight_std=wstd)
    rng = np.random.default_rng(14)
    T = 9
    ids = routing("random", T, 2, 4, rng)
    ids[3] = [1, 1]
    ids[4] = [-1, -1]
    ids[5] = [3, -1]
    x, ids, rw = make_inputs(spec, rng, T, xstd, ids=ids)
    out, grad_out, grads = run_backward(moe, x, ids, rw, grad_std=gstd, seed=15)
    assert_grads_close(grads, expected_backward(moe, x, ids, rw, grad_out))
    assert not grads.input[4].view(np.uint16).any()
    assert not grads.routing_weights[ids == -1].any()


@pytest.mark.parametrize("tier", RUN_TIERS)
@pytest.mark.parametrize("variants", [("tp1-f32", "tp2-f32")], ids=["f32"])
def test_backward_tp2_matches_tp1(tier, variants):
    """gradients of tp_count = 2 equal those of tp_count = 1 within the accuracy limits, including
    the sliced LoRA matrices (B of gate/up and A of down) and the summed ones."""
    spec1, spec2 = (qwen_spec(v, tier) for v in variants)
    rng = np.random.default_rng(16)
    gate, up, down = make_weights(spec1, rng, 0.02)
    lw = ktgen.LoRAWeights.random(spec1, rng, lora_std(spec1, 0.02))
    moe1 = ktgen.MoE(spec1, gate, up, down, lw)
    moe2 = ktgen.MoE(spec2, gate, up, down, lw)
    x, ids, rw = make_inputs(spec1, rng, 16, 1.0)
    _, grad_out, g1 = run_backward(moe1, x, ids, rw, seed=17)
    out2, saved2 = moe2.forward_train(x, ids, rw)
    g2 = moe2.backward(saved2, grad_out)
    check_grad_kinds(spec2, g2, 16)
    assert_grads_close(g2, {n: getattr(g1, n) for n in ("input", "routing_weights") + LORA_NAMES})
    assert_grads_close(g2, expected_backward(moe1, x, ids, rw, grad_out))

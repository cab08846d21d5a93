"""Property-based tests (hypothesis) of forward and backward against ktgen.reference (docs/design.md#accuracy).

Compiling a kernel takes seconds, so the spec is drawn from a fixed pool of six small specs
compiled once per module (expert_num 1..6, k 1..min(3, E), hidden 32/64/96, intermediate
32..160 in steps of 32 with tp_count 1 or 2, LoRA rank 1..8 float32 / bfloat16 / none, the
tiers of this CPU in turn); hypothesis varies everything else: T 0..12, the routing (ids in
-1..E-1 with duplicates, whole rows skipped, everything on one expert), the activation std
(0.01, 1, 10) and the LoRA values (zero, calibrated, strong), written in place into the
arrays the MoE already reads (LoRA is zero-copy, docs/design.md#the-python-api). Base weights have std 0.5.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ktgen
from ktgen import reference as ref
from helpers import GRAD_TOL, LORA_NAMES, OUT_TOL, RUN_TIERS, make_weights

bf16 = np.dtype(ml_dtypes.bfloat16)
MAX_T = 12
WEIGHT_STD = 0.5
X_STDS = (0.01, 1.0, 10.0)

# (expert_num, k, hidden, intermediate, tp_count, lora)
POOL = [
    (1, 1, 32, 32, 1, dict(rank=1, dtype="float32")),
    (2, 2, 64, 96, 1, None),
    (3, 2, 96, 64, 2, dict(rank=8, alpha=4.0, use_rslora=True, dtype="bfloat16")),
    (4, 3, 32, 160, 1, dict(rank=3, dtype="bfloat16")),
    (5, 3, 64, 128, 2, dict(rank=5, alpha=3.0, dtype="float32")),
    (6, 3, 96, 128, 2, None),
]


def pool_spec(i: int) -> ktgen.MoESpec:
    E, k, H, I, tp, lora = POOL[i]
    return ktgen.MoESpec(name=f"prop_{i}", expert_num=E, num_experts_per_tok=k, hidden_size=H,
                         intermediate_size=I, tp_count=tp, lora=lora, max_len=MAX_T,
                         isa=RUN_TIERS[i % len(RUN_TIERS)])


@pytest.fixture(scope="module")
def pool():
    """One MoE per pool spec (the kernels compile here, once), with its own LoRA arrays."""
    moes = []
    for i in range(len(POOL)):
        spec = pool_spec(i)
        rng = np.random.default_rng(1000 + i)
        lora = ktgen.LoRAWeights.zeros(spec) if spec.lora else None
        moe = ktgen.MoE(spec, *make_weights(spec, rng, WEIGHT_STD), lora)
        assert moe.kernel.isa == spec.isa
        moes.append(moe)
    yield moes
    for moe in moes:
        moe.close()


@st.composite
def cases(draw):
    i = draw(st.integers(0, len(POOL) - 1))
    E, k = POOL[i][0], POOL[i][1]
    T = draw(st.integers(0, MAX_T))
    ids = draw(arrays(np.int64, (T, k), elements=st.integers(-1, E - 1)))
    pattern = draw(st.sampled_from(["free", "duplicates", "one_expert", "skip_rows"]))
    if T and pattern == "duplicates" and k > 1:        # the same expert in two slots of a row
        ids[:, 1] = ids[:, 0]
    elif T and pattern == "one_expert":                # every routed slot on one expert
        e = draw(st.integers(0, E - 1))
        ids[ids >= 0] = e
    elif T and pattern == "skip_rows":                 # some tokens go nowhere at all
        ids[draw(st.integers(0, T - 1)):] = -1
    x_std = draw(st.sampled_from(X_STDS))
    lora_std = draw(st.sampled_from(["zero", "calibrated", "strong"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(i=i, ids=ids, x_std=x_std, lora_std=lora_std, seed=seed)


def fill_lora(moe, how: str, rng) -> None:
    """Write new LoRA values in place into the arrays the MoE reads (zero-copy)."""
    spec = moe.spec
    if spec.lora is None:
        return
    if how == "zero":
        std = 0.0
    else:
        # calibrated: s*B(Ax) is about half of W x; strong: about twice as large as W x
        ratio = 0.5 if how == "calibrated" else 2.0
        std = float(np.sqrt(ratio * WEIGHT_STD / (spec.lora.scale * np.sqrt(spec.lora.rank))))
    for name in LORA_NAMES:
        a = getattr(moe.lora, name)
        a[...] = (rng.standard_normal(a.shape, np.float32) * std).astype(a.dtype)


def make_data(moe, case):
    spec = moe.spec
    rng = np.random.default_rng(case["seed"])
    fill_lora(moe, case["lora_std"], rng)
    T, H = case["ids"].shape[0], spec.hidden_size
    x = (rng.standard_normal((T, H), np.float32) * case["x_std"]).astype(bf16)
    rw = rng.random(case["ids"].shape).astype(np.float32)
    go = rng.standard_normal((T, H), np.float32).astype(bf16)
    return x, np.ascontiguousarray(case["ids"]), rw, go


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_forward_and_backward_match_reference(pool, case):
    moe = pool[case["i"]]
    spec = moe.spec
    x, ids, rw, go = make_data(moe, case)
    T, H, k = x.shape[0], spec.hidden_size, spec.num_experts_per_tok
    W = [moe.dequantized(n) for n in ("gate", "up", "down")]
    s = spec.lora.scale if spec.lora else 1.0

    out = moe.forward(x, ids, rw)
    assert out.dtype == bf16 and out.shape == (T, H)
    expected = ref.forward(x, ids, rw, *W, moe.lora, s)
    assert ref.rel_l2(out, expected) <= OUT_TOL

    out_t, saved = moe.forward_train(x, ids, rw)
    assert np.array_equal(out_t.view(np.uint16), out.view(np.uint16))
    grads = moe.backward(saved, go)
    e = ref.backward(x, ids, rw, *W, go, moe.lora, s)
    assert grads.input.dtype == bf16 and grads.input.shape == (T, H)
    assert grads.routing_weights.dtype == np.float32 and grads.routing_weights.shape == (T, k)
    assert ref.rel_l2(grads.input, e["input"]) <= GRAD_TOL
    assert ref.rel_l2(grads.routing_weights, e["routing_weights"]) <= GRAD_TOL
    # skipped slots get exactly 0 (docs/design.md#the-math)
    assert not grads.routing_weights[ids < 0].any()
    if spec.lora is None:
        assert all(getattr(grads, n) is None for n in LORA_NAMES)
        return
    for n in LORA_NAMES:
        g = getattr(grads, n)
        assert g.dtype == getattr(moe.lora, n).dtype and g.shape == getattr(moe.lora, n).shape, n
        err = ref.rel_l2(g, e[n])
        assert err <= GRAD_TOL, f"{n}: relL2 {err:.3e}"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_results_are_bitwise_reproducible(pool, case):
    """The same call twice gives the same bits (docs/design.md#the-python-api), whatever the routing."""
    moe = pool[case["i"]]
    x, ids, rw, go = make_data(moe, case)
    runs = []
    for _ in range(2):
        out, saved = moe.forward_train(x, ids, rw)
        g = moe.backward(saved, go)
        runs.append([out.view(np.uint16), g.input.view(np.uint16), g.routing_weights]
                    + [getattr(g, n) for n in LORA_NAMES if getattr(g, n) is not None])
    for a, b in zip(*runs):
        assert np.array_equal(a, b, equal_nan=False)

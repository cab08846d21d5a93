"""Tensor-parallel partitions: tp_count N equals tp_count 1 for every mode,
LoRA stays zero-copy, and partitions are pinned to NUMA nodes where there are several."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

import ktgen
from ktgen import numa, reference
from ktgen.reference import rel_l2

from helpers import LIMITS, LORA_NAMES, make_inputs, make_weights

bf16 = ml_dtypes.bfloat16


def tp_spec(mode, tp, lora=True):
    q = {"mode": mode} if mode in ("bf16", "int8") else {"mode": mode, "group_size": 32}
    # I = 192 splits into 3 slices of 64, each a whole number of 32-wide groups
    return ktgen.MoESpec(name=f"tp_{mode}", expert_num=6, num_experts_per_tok=3, hidden_size=64,
                         intermediate_size=192, max_len=32, quant=q, tp_count=tp,
                         lora={"rank": 4} if lora else None)


def run(spec, data):
    gate, up, down, lw, x, ids, rw, grad_out = data
    moe = ktgen.MoE(spec, gate, up, down, lw)
    out, saved = moe.forward_train(x, ids, rw)
    return moe, out, moe.backward(saved, grad_out)


def make_data(spec, seed=0):
    rng = np.random.default_rng(seed)
    gate, up, down = make_weights(spec, rng)
    lw = ktgen.LoRAWeights.random(spec, rng, std=0.3) if spec.lora else None
    x, ids, rw = make_inputs(spec, rng, 29)
    grad_out = (rng.standard_normal((29, spec.hidden_size)) * 0.1).astype(bf16)
    return gate, up, down, lw, x, ids, rw, grad_out


@pytest.mark.parametrize("mode", ["bf16", "int8", "awq", "k2"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "nolora"])
def test_tp2_and_tp3_equal_tp1_and_the_reference(mode, lora):
    data = make_data(tp_spec(mode, 1, lora))
    gate, up, down, lw, x, ids, rw, grad_out = data
    out_limit, grad_limit = LIMITS[mode]
    _, out1, grads1 = run(tp_spec(mode, 1, lora), data)
    for tp in (2, 3):
        moe, out, grads = run(tp_spec(mode, tp, lora), data)
        dq = [moe.dequantized(n) for n in ("gate", "up", "down")]
        scale = moe.spec.lora.scale if lora else 1.0
        assert rel_l2(out, out1) <= out_limit
        assert rel_l2(out, reference.forward(x, ids, rw, *dq, lw, scale)) <= out_limit
        expect = reference.backward(x, ids, rw, *dq, grad_out, lw, scale)
        for name, e in expect.items():
            assert rel_l2(getattr(grads, name), getattr(grads1, name)) <= grad_limit, (tp, name)
            assert rel_l2(getattr(grads, name), e) <= grad_limit, (tp, name)
        assert grads.input.dtype == bf16 and grads.routing_weights.dtype == np.float32
        if lora:
            assert all(getattr(grads, n).dtype == np.float32 for n in LORA_NAMES)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_gradient_dtype_under_tp(dtype):
    spec = tp_spec("bf16", 2).replace(lora={"rank": 4, "dtype": dtype})
    _, _, grads = run(spec, make_data(spec))
    assert all(getattr(grads, n).dtype == ktgen.runtime.lora_dtype(spec) for n in LORA_NAMES)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_lora_is_zero_copy_under_tp2(name):
    spec = tp_spec("bf16", 2)
    gate, up, down, lw, x, ids, rw, _ = make_data(spec, seed=1)
    moe = ktgen.MoE(spec, gate, up, down, lw)
    before = moe.forward(x, ids, rw)
    arr = getattr(lw, name)
    arr += np.float32(0.05)  # in place, as an optimizer step does; no call to ktgen
    after = moe.forward(x, ids, rw)
    expect = reference.forward(x, ids, rw, *(moe.dequantized(n) for n in ("gate", "up", "down")), lw,
                               spec.lora.scale)
    assert not np.array_equal(before.view(np.uint16), after.view(np.uint16))
    assert rel_l2(after, expect) <= 1e-2


def test_tp2_is_bitwise_deterministic():
    spec = tp_spec("awq", 2)
    data = make_data(spec, seed=2)
    runs = [run(spec, data) for _ in range(2)]
    (_, o1, g1), (_, o2, g2) = runs
    np.testing.assert_array_equal(o1.view(np.uint16), o2.view(np.uint16))
    for name in ("input", "routing_weights") + LORA_NAMES:
        a, b = getattr(g1, name), getattr(g2, name)
        np.testing.assert_array_equal(a.view(np.uint16) if a.dtype == bf16 else a,
                                      b.view(np.uint16) if b.dtype == bf16 else b)


def test_cpulist_parsing():
    assert numa.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert numa.format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert "NUMA node" in numa.describe()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to fake two nodes")
def test_partitions_are_pinned_to_their_node(monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    fake = {0: cpus[: len(cpus) // 2], 1: cpus[len(cpus) // 2:]}
    monkeypatch.setattr(numa, "nodes", lambda: fake)
    spec = tp_spec("int8", 3)
    data = make_data(spec, seed=3)
    moe, out, grads = run(spec, data)
    masks = [r.submit(os.sched_getaffinity, 0).result() for r in moe._runners]
    assert masks == [set(fake[0]), set(fake[1]), set(fake[0])]  # partition p on node p mod 2
    monkeypatch.setattr(numa, "nodes", lambda: {0: cpus})
    _, out_unpinned, grads_unpinned = run(spec, data)
    np.testing.assert_array_equal(out.view(np.uint16), out_unpinned.view(np.uint16))
    np.testing.assert_array_equal(grads.routing_weights, grads_unpinned.routing_weights)

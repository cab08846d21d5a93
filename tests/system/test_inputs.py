"""Argument checking (docs/design.md#the-python-api): every bad array is a ValueError that names the
argument before any pointer reaches C; expert ids and T are range-checked; the accepted
variants (int32/int64 ids, NaN/Inf activations) work. Also dequantized() and memory()."""

from __future__ import annotations

import re

import numpy as np
import pytest

import ktgen
from ktgen import reference as ref
from helpers import (AWK_MAX_LEN, LORA_NAMES, awkward_spec, base_weights, bf16, expected_forward, lora_std,
                     make_inputs, qwen_spec)
T = 7


def names(arg):
    """A regex matching `arg` as a whole identifier (so 'gate' does not match 'gate_a')."""
    return rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])"


def bad_versions(good):
    """(label, bad array, strings the message must contain) for a good C-contiguous array."""
    wrong = np.dtype(np.float64) if good.dtype == np.float32 else np.dtype(np.float32)
    yield "dtype", good.astype(wrong), [str(wrong)]
    if good.dtype == bf16:
        yield "float16", good.astype(np.float16), ["float16"]
    if good.dtype.kind == "i":
        yield "int16", good.astype(np.int16), ["int16"]
    shape = good.shape[:-1] + (good.shape[-1] + 1,)
    yield "shape", np.zeros(shape, good.dtype), [str(shape)]
    yield "ndim", np.zeros(good.shape + (1,), good.dtype), []
    wide = np.zeros(good.shape[:-1] + (2 * good.shape[-1],), good.dtype)
    yield "strided", wide[..., ::2], []
    t = np.zeros(good.shape[:-2] + (good.shape[-1], good.shape[-2]), good.dtype)
    yield "transposed", np.swapaxes(t, -1, -2), []
    yield "list", good.tolist() if good.size < 10_000 else None, []


def check_bad(call, arg, good):
    for label, bad, must in bad_versions(good):
        if bad is None:
            continue
        if label in ("strided", "transposed"):
            assert bad.shape == good.shape and not bad.flags.c_contiguous
        with pytest.raises(ValueError, match=names(arg)) as info:
            call(bad)
        message = str(info.value)
        info = None  # the traceback's frames would keep the caller's locals (saved forwards) alive
        for text in must:
            assert text in message, f"{arg}/{label}: {text!r} not in {message}"


@pytest.fixture(scope="module")
def setup():
    spec = awkward_spec("float32")
    weights = base_weights(spec, 0, 1.0)
    lora = ktgen.LoRAWeights.random(spec, np.random.default_rng(1), lora_std(spec, 1.0))
    moe = ktgen.MoE(spec, *weights, lora)
    x, ids, rw = make_inputs(spec, np.random.default_rng(2), T, 1.0)
    return moe, weights, lora, (x, ids, rw)


# ---- forward / forward_train / backward arguments ----

@pytest.mark.parametrize("method", ["forward", "forward_train"])
@pytest.mark.parametrize("arg", ["x", "expert_ids", "routing_weights"])
def test_bad_forward_argument(setup, method, arg):
    moe, _, _, (x, ids, rw) = setup
    args = dict(x=x, expert_ids=ids, routing_weights=rw)

    def call(bad):
        getattr(moe, method)(**{**args, arg: bad})

    check_bad(call, arg, args[arg])
    # nothing leaked: every slot is still free (and is given back by backward)
    saved = [moe.forward_train(x, ids, rw)[1] for _ in range(moe.spec.max_cache_depth)]
    for s in saved:
        moe.backward(s, np.zeros_like(x))


def test_bad_grad_out(setup):
    moe, _, _, (x, ids, rw) = setup
    out, saved = moe.forward_train(x, ids, rw)
    check_bad(lambda bad: moe.backward(saved, bad), "grad_out", np.zeros_like(out))
    # the T of grad_out must be the T of the saved forward
    with pytest.raises(ValueError, match=names("grad_out")):
        moe.backward(saved, np.zeros((T + 1, moe.spec.hidden_size), bf16))
    moe.backward(saved, np.zeros_like(out))


def test_routing_arrays_must_match_x(setup):
    moe, _, _, (x, ids, rw) = setup
    with pytest.raises(ValueError, match=names("expert_ids")):
        moe.forward(x, ids[:-1].copy(), rw)
    with pytest.raises(ValueError, match=names("routing_weights")):
        moe.forward(x, ids, rw[:-1].copy())
    with pytest.raises(ValueError, match=names("expert_ids")):
        moe.forward(x, np.ascontiguousarray(ids[:, :2]), rw)


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad_id", [8, 9, 1000, -2, -100])
def test_expert_id_out_of_range(setup, id_dtype, bad_id):
    moe, _, _, (x, ids, rw) = setup
    bad = ids.astype(id_dtype)
    bad[3, 1] = bad_id
    with pytest.raises(ValueError, match=names("expert_ids")) as info:
        moe.forward(x, bad, rw)
    assert str(bad_id) in str(info.value)
    with pytest.raises(ValueError, match=names("expert_ids")):
        moe.forward_train(x, bad, rw)


def test_too_many_tokens(setup):
    moe, _, _, _ = setup
    spec = moe.spec
    x, ids, rw = make_inputs(spec, np.random.default_rng(3), AWK_MAX_LEN + 1, 1.0)
    for method in (moe.forward, moe.forward_train):
        with pytest.raises(ValueError, match="max_len"):
            method(x, ids, rw)
    # exactly max_len is fine
    out = moe.forward(x[:-1].copy(), ids[:-1].copy(), rw[:-1].copy())
    assert out.shape == (AWK_MAX_LEN, spec.hidden_size)


def test_int32_and_int64_expert_ids_agree(setup):
    moe, _, _, _ = setup
    x, ids, rw = make_inputs(moe.spec, np.random.default_rng(4), 50, 1.0)
    go = np.random.default_rng(5).standard_normal(x.shape, np.float32).astype(bf16)
    results = []
    for dt in (np.int32, np.int64):
        out, saved = moe.forward_train(x, ids.astype(dt), rw)
        results.append((out, moe.backward(saved, go)))
    (o32, g32), (o64, g64) = results
    assert np.array_equal(o32.view(np.uint16), o64.view(np.uint16))
    for name in ("input", "routing_weights") + LORA_NAMES:
        a, b = getattr(g32, name), getattr(g64, name)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    assert ref.rel_l2(o32, expected_forward(moe, x, ids, rw)) <= 1e-2


def test_non_finite_inputs_propagate(setup):
    moe, _, _, _ = setup
    spec = moe.spec
    x, ids, rw = make_inputs(spec, np.random.default_rng(6), 12, 1.0)
    ids[:3] = [[0, 1, 2], [3, -1, 4], [5, 6, -1]]  # tokens 0..2 reach real experts
    x[0, 5] = np.nan
    x[1, 7] = np.inf
    x[2, 9] = -np.inf
    for method in ("forward", "forward_train"):
        res = getattr(moe, method)(x, ids, rw)
        out = res[0] if method == "forward_train" else res
        o = out.astype(np.float32)
        assert out.shape == (12, spec.hidden_size)
        assert np.isnan(o[0]).any(), "NaN in x[0] must reach out[0]"
        assert not np.isfinite(o[1]).all(), "Inf in x[1] must reach out[1]"
        assert not np.isfinite(o[2]).all(), "-Inf in x[2] must reach out[2]"
        # and stays in its token
        assert np.isfinite(o[3:]).all()
        clean = expected_forward(moe, x[3:].copy(), ids[3:].copy(), rw[3:].copy())
        assert ref.rel_l2(o[3:], clean) <= 1e-2
        del res


# ---- construction and set_lora ----

@pytest.mark.parametrize("arg", ["gate", "up", "down"])
def test_bad_base_weight(setup, arg):
    moe, weights, lora, _ = setup
    good = dict(zip(("gate", "up", "down"), weights))

    def call(bad):
        ktgen.MoE(moe.spec, **{**good, arg: bad}, lora=lora)

    check_bad(call, arg, good[arg])


def test_down_with_gate_shape_is_rejected(setup):
    moe, (gate, up, down), lora, _ = setup
    with pytest.raises(ValueError, match=names("down")):
        ktgen.MoE(moe.spec, gate, up, gate, lora)  # [E, I, H] where [E, H, I] is due
    with pytest.raises(ValueError, match=names("gate")):
        ktgen.MoE(moe.spec, down, up, down, lora)


@pytest.mark.parametrize("arg", LORA_NAMES)
def test_bad_lora_array(setup, arg):
    moe, weights, lora, (x, ids, rw) = setup
    before = moe.forward(x, ids, rw)

    def replaced(bad):
        return ktgen.LoRAWeights(**{n: (bad if n == arg else getattr(lora, n)) for n in LORA_NAMES})

    check_bad(lambda bad: ktgen.MoE(moe.spec, *weights, replaced(bad)), arg, getattr(lora, arg))
    check_bad(lambda bad: moe.set_lora(replaced(bad)), arg, getattr(lora, arg))
    # a rejected set_lora leaves the old LoRA in place
    assert moe.lora is lora
    assert np.array_equal(moe.forward(x, ids, rw).view(np.uint16), before.view(np.uint16))


def test_lora_dtype_must_match_spec():
    spec16 = awkward_spec("bfloat16")
    spec32 = awkward_spec("float32")
    weights = base_weights(spec16, 0, 1.0)
    lora32 = ktgen.LoRAWeights.random(spec32, np.random.default_rng(1))
    lora16 = ktgen.LoRAWeights.random(spec16, np.random.default_rng(1))
    assert lora16.gate_a.dtype == bf16 and lora32.gate_a.dtype == np.float32
    with pytest.raises(ValueError, match=names("gate_a")):
        ktgen.MoE(spec16, *weights, lora32)
    with pytest.raises(ValueError, match=names("gate_a")):
        ktgen.MoE(spec32, *weights, lora16)
    moe = ktgen.MoE(spec16, *weights, lora16)
    with pytest.raises(ValueError, match=names("gate_a")):
        moe.set_lora(lora32)


def test_lora_given_to_a_spec_without_lora():
    spec = awkward_spec(None)
    weights = base_weights(spec, 0, 1.0)
    lora = ktgen.LoRAWeights.random(awkward_spec("float32"), np.random.default_rng(1))
    with pytest.raises(ValueError, match="lora"):
        ktgen.MoE(spec, *weights, lora)
    moe = ktgen.MoE(spec, *weights)
    assert moe.lora is None
    with pytest.raises(ValueError, match="lora"):
        moe.set_lora(lora)


# ---- dequantized() and memory() ----

@pytest.mark.parametrize("spec_fn", [lambda: awkward_spec("float32"), lambda: qwen_spec("tp2-f32")],
                         ids=["awkward", "qwen_tp2"])
def test_dequantized_is_the_bf16_weights(spec_fn):
    spec = spec_fn()
    weights = base_weights(spec, 0, 1.0)
    moe = ktgen.MoE(spec, *weights)
    for name, w in zip(("gate", "up", "down"), weights):
        d = moe.dequantized(name)
        assert d.dtype == np.float32 and d.shape == w.shape
        assert np.array_equal(d, w.astype(np.float32)), name
    for bad in ("Gate", "lora", "gate_a", ""):
        with pytest.raises(ValueError):
            moe.dequantized(bad)


@pytest.mark.parametrize("spec_fn", [lambda: awkward_spec("float32"), lambda: awkward_spec(None),
                                     lambda: qwen_spec("tp2-f32")],
                         ids=["awkward", "awkward_nolora", "qwen_tp2"])
def test_memory_report(spec_fn):
    spec = spec_fn()
    moe = ktgen.MoE(spec, *base_weights(spec, 0, 1.0))
    mem = moe.memory()
    assert set(mem) == {"base_weights", "workspace", "cache", "total"}
    for key, value in mem.items():
        assert isinstance(value, int) and value >= 0, key
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    assert mem["base_weights"] == 3 * E * I * H * 2
    assert mem["cache"] > 0 and mem["workspace"] > 0
    assert mem["total"] == mem["base_weights"] + mem["workspace"] + mem["cache"]

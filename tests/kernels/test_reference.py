"""Tests of the float64 reference (ktgen/reference.py) against independent code."""

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from ktgen import reference as ref
from helpers import LORA_NAMES



def make_case(seed=0, T=4, k=2, E=3, H=8, I=6, r=2, dtype=np.float64, std=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, H))
    ids = rng.integers(0, E, size=(T, k))
    if T >= 2 and k >= 2:
        ids[0, 1] = -1              # skipped slot
        ids[1, 1] = ids[1, 0]       # duplicate expert in one row
    w = rng.uniform(0.1, 1.0, size=(T, k))
    gate = rng.normal(scale=std, size=(E, I, H))
    up = rng.normal(scale=std, size=(E, I, H))
    down = rng.normal(scale=std, size=(E, H, I))
    lora = SimpleNamespace(
        gate_a=rng.normal(scale=std, size=(E, r, H)),
        gate_b=rng.normal(scale=std, size=(E, I, r)),
        up_a=rng.normal(scale=std, size=(E, r, H)),
        up_b=rng.normal(scale=std, size=(E, I, r)),
        down_a=rng.normal(scale=std, size=(E, r, I)),
        down_b=rng.normal(scale=std, size=(E, H, r)),
    )
    go = rng.normal(size=(T, H))
    cast = lambda a: a.astype(dtype)
    lora = SimpleNamespace(**{n: cast(getattr(lora, n)) for n in LORA_NAMES})
    return dict(x=cast(x), expert_ids=ids, routing_weights=cast(w), gate=cast(gate),
                up=cast(up), down=cast(down), lora=lora, grad_out=cast(go))


def naive_forward(x, expert_ids, routing_weights, gate, up, down, lora=None, scale=1.0):
    """Dead-simple per-token, per-slot loop, written from docs/design.md#the-math."""
    x = np.asarray(x, dtype=np.float64)
    T, H = x.shape
    out = np.zeros((T, H))
    for t in range(T):
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            if e < 0:
                continue
            wt = float(routing_weights[t, j])
            xt = x[t]
            Wg = np.asarray(gate[e], np.float64)
            Wu = np.asarray(up[e], np.float64)
            Wd = np.asarray(down[e], np.float64)
            g = Wg.dot(xt)
            u = Wu.dot(xt)
            if lora is not None:
                L = {n: np.asarray(getattr(lora, n)[e], np.float64) for n in LORA_NAMES}
                g = g + scale * L["gate_b"].dot(L["gate_a"].dot(xt))
                u = u + scale * L["up_b"].dot(L["up_a"].dot(xt))
            h = g / (1.0 + np.exp(-g)) * u
            y = Wd.dot(h)
            if lora is not None:
                y = y + scale * L["down_b"].dot(L["down_a"].dot(h))
            out[t] += wt * y
    return out


@pytest.mark.parametrize("with_lora", [True, False])
def test_forward_matches_naive_loop(with_lora):
    c = make_case(seed=1, T=7, k=3, E=4, H=16, I=12, r=3)
    c["expert_ids"][2, :] = -1                    # a token with no expert at all
    c["expert_ids"][3, :] = c["expert_ids"][3, 0]  # the same expert three times
    lora = c["lora"] if with_lora else None
    args = (c["x"], c["expert_ids"], c["routing_weights"], c["gate"], c["up"], c["down"])
    got = ref.forward(*args, lora=lora, scale=1.7)
    want = naive_forward(*args, lora=lora, scale=1.7)
    assert got.dtype == np.float64 and got.shape == c["x"].shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.all(got[2] == 0.0)


def test_forward_expert_without_tokens_and_all_on_one():
    c = make_case(seed=2, T=5, k=2, E=4)
    c["expert_ids"][:] = 2
    args = (c["x"], c["expert_ids"], c["routing_weights"], c["gate"], c["up"], c["down"])
    np.testing.assert_allclose(ref.forward(*args, lora=c["lora"], scale=0.5),
                               naive_forward(*args, lora=c["lora"], scale=0.5),
                               rtol=1e-12, atol=1e-12)


def _loss(c, scale, **override):
    d = {**c, **override}
    lora = d["lora"]
    if any(n in override for n in LORA_NAMES):
        lora = SimpleNamespace(**{n: d[n] if n in override else getattr(lora, n)
                                  for n in LORA_NAMES})
    out = ref.forward(d["x"], d["expert_ids"], d["routing_weights"], d["gate"], d["up"],
                      d["down"], lora=lora, scale=scale)
    return float(np.sum(out * d["grad_out"]))


def _fd_grad(c, name, base, scale, eps=1e-6):
    g = np.zeros_like(base)
    it = np.nditer(base, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        p, m = base.copy(), base.copy()
        p[i] += eps
        m[i] -= eps
        g[i] = (_loss(c, scale, **{name: p}) - _loss(c, scale, **{name: m})) / (2 * eps)
    return g


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_backward_finite_differences(scale):
    c = make_case(seed=3, T=4, k=2, E=3, H=8, I=6, r=2)
    assert (c["expert_ids"] == -1).any()
    gr = ref.backward(c["x"], c["expert_ids"], c["routing_weights"], c["gate"], c["up"],
                      c["down"], c["grad_out"], lora=c["lora"], scale=scale)
    assert set(gr) == {"input", "routing_weights", *LORA_NAMES}

    checks = [("input", "x", c["x"]), ("routing_weights", "routing_weights", c["routing_weights"])]
    checks += [(n, n, getattr(c["lora"], n)) for n in LORA_NAMES]
    for key, arg, base in checks:
        fd = _fd_grad(c, arg, np.asarray(base, np.float64), scale)
        assert gr[key].dtype == np.float64 and gr[key].shape == base.shape, key
        np.testing.assert_allclose(gr[key], fd, rtol=1e-6, atol=1e-7, err_msg=key)
        assert ref.rel_l2(gr[key], fd) < 1e-7, key

    # a skipped slot has routing gradient exactly 0
    assert np.all(gr["routing_weights"][c["expert_ids"] == -1] == 0.0)


def test_backward_without_lora():
    c = make_case(seed=4)
    gr = ref.backward(c["x"], c["expert_ids"], c["routing_weights"], c["gate"], c["up"],
                      c["down"], c["grad_out"], lora=None, scale=3.0)
    assert set(gr) == {"input", "routing_weights"}
    c_nolora = {**c, "lora": None}
    fd = _fd_grad(c_nolora, "x", c["x"].copy(), 3.0)
    np.testing.assert_allclose(gr["input"], fd, rtol=1e-6, atol=1e-7)


def test_empty_batch():
    c = make_case(seed=5, T=4, k=2, E=3, H=8, I=6, r=2)
    x = np.zeros((0, 8))
    ids = np.zeros((0, 2), dtype=np.int32)
    w = np.zeros((0, 2), dtype=np.float32)
    out = ref.forward(x, ids, w, c["gate"], c["up"], c["down"], lora=c["lora"])
    assert out.shape == (0, 8) and out.dtype == np.float64
    gr = ref.backward(x, ids, w, c["gate"], c["up"], c["down"], np.zeros((0, 8)),
                      lora=c["lora"])
    assert gr["input"].shape == (0, 8)
    assert gr["routing_weights"].shape == (0, 2)
    for n in LORA_NAMES:
        assert gr[n].shape == getattr(c["lora"], n).shape
        assert gr[n].dtype == np.float64
        assert not gr[n].any()


def test_bf16_and_float32_inputs():
    bf16 = ml_dtypes.bfloat16
    c = make_case(seed=6, T=6, k=2, E=3, H=32, I=32, r=4, dtype=bf16)
    assert c["gate"].dtype == bf16
    args = (c["x"], c["expert_ids"].astype(np.int32), c["routing_weights"].astype(np.float32),
            c["gate"], c["up"], c["down"])
    out = ref.forward(*args, lora=c["lora"], scale=2.0)
    assert out.dtype == np.float64
    # same values, upcast by hand before the call
    up64 = [np.asarray(a, np.float64) for a in args]
    lora64 = SimpleNamespace(**{n: getattr(c["lora"], n).astype(np.float64) for n in LORA_NAMES})
    np.testing.assert_allclose(out, ref.forward(*up64, lora=lora64, scale=2.0), rtol=1e-12, atol=1e-12)

    gr = ref.backward(*args, c["grad_out"], lora=c["lora"], scale=2.0)
    gr64 = ref.backward(*up64, c["grad_out"].astype(np.float64), lora=lora64, scale=2.0)
    for key in gr64:
        assert gr[key].dtype == np.float64
        np.testing.assert_allclose(gr[key], gr64[key], rtol=1e-12, atol=1e-12, err_msg=key)

    c32 = make_case(seed=6, dtype=np.float32)
    out32 = ref.forward(c32["x"], c32["expert_ids"], c32["routing_weights"], c32["gate"],
                        c32["up"], c32["down"], lora=c32["lora"])
    assert out32.dtype == np.float64


def test_rel_l2():
    a = np.array([3.0, 4.0])
    assert ref.rel_l2(a, a) == 0.0
    assert ref.rel_l2(np.zeros(2), a) == pytest.approx(1.0)
    assert ref.rel_l2(a * 1.01, a) == pytest.approx(0.01)
    assert ref.rel_l2(np.array([1e-3, 0.0]), np.zeros(2)) == pytest.approx(1e-3 / 1e-12)
    assert ref.rel_l2(np.zeros((0, 4)), np.zeros((0, 4))) == 0.0
    # mixed dtypes, computed in float64, returns a Python float
    r = ref.rel_l2(a.astype(ml_dtypes.bfloat16), a.astype(np.float32).reshape(1, 2).ravel())
    assert isinstance(r, float) and r == 0.0
    b = np.array([1.0, 2.0, 3.0])
    assert ref.rel_l2(b + 1, b) == pytest.approx(np.sqrt(3) / np.sqrt(14))


class _Stack:
    """Stacked expert weights that record which experts are read, and refuse a full conversion."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.seen = a, a.shape, a.dtype, []

    def __getitem__(self, e):
        assert isinstance(e, (int, np.integer)), e
        self.seen.append(int(e))
        return self.a[e]

    def __array__(self, *args, **kwargs):
        raise AssertionError("whole stack converted")


def test_one_expert_at_a_time_and_only_used_experts():
    c = make_case(seed=7, T=5, k=2, E=5, dtype=ml_dtypes.bfloat16)
    ids = np.array([[0, -1], [3, 3], [0, 3], [-1, -1], [3, 0]])
    stacks = {n: _Stack(c[n]) for n in ("gate", "up", "down")}
    lora = SimpleNamespace(**{n: _Stack(getattr(c["lora"], n)) for n in LORA_NAMES})
    ref.forward(c["x"], ids, c["routing_weights"], **stacks, lora=lora)
    ref.backward(c["x"], ids, c["routing_weights"], **stacks, grad_out=c["grad_out"], lora=lora)
    for s in [*stacks.values(), *vars(lora).values()]:
        assert sorted(set(s.seen)) == [0, 3]
        assert len(s.seen) == 4          # each used expert read once per call

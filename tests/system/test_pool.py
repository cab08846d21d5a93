"""ktgen.pool: output memory is reused only once nothing refers to it."""
import gc

import numpy as np
import pytest

import ktgen
from helpers import make_inputs, make_weights
from ktgen.pool import MIN_BYTES, POOL, ArrayPool

SHAPE = (MIN_BYTES // 4 // 64, 64)   # exactly MIN_BYTES of float32


def test_memory_is_reused_only_after_every_view_is_gone():
    pool = ArrayPool(cap_bytes=8 * MIN_BYTES)
    a = pool.empty(SHAPE, np.float32)
    a[:] = 7.0
    view = a[3]                      # numpy points the view at the exporter, not at `a`
    addr = a.ctypes.data
    del a
    gc.collect()
    b = pool.empty(SHAPE, np.float32)
    assert b.ctypes.data != addr and pool.reused == 0
    assert np.all(view == 7.0)
    b[:] = 1.0
    assert np.all(view == 7.0)
    del view, b
    gc.collect()
    pool.empty(SHAPE, np.float32)   # now one of the two buffers comes back
    assert pool.reused == 1


def test_torch_tensors_keep_their_memory():
    torch = pytest.importorskip("torch")
    pool = ArrayPool(cap_bytes=8 * MIN_BYTES)
    t = torch.from_numpy(pool.empty(SHAPE, np.float32))
    t.fill_(3.0)
    gc.collect()
    d = pool.empty(SHAPE, np.float32)
    assert pool.reused == 0 and d.ctypes.data != t.data_ptr()
    del t, d
    gc.collect()
    pool.empty(SHAPE, np.float32)
    assert pool.reused == 1


def test_cap_small_arrays_and_off():
    pool = ArrayPool(cap_bytes=MIN_BYTES)
    for _ in range(3):
        pool.empty(SHAPE, np.float32)
    gc.collect()
    assert pool.idle_bytes == MIN_BYTES          # the oldest dropped past the cap
    small = pool.empty((16,), np.float32)
    assert small.base is None                    # under MIN_BYTES: plain numpy
    off = ArrayPool(cap_bytes=0)
    x = off.empty(SHAPE, np.float32)
    assert x.base is None and x.shape == SHAPE


def test_bad_pool_size(monkeypatch):
    monkeypatch.setenv("KTGEN_POOL_MIB", "lots")
    with pytest.raises(ValueError, match="KTGEN_POOL_MIB"):
        ArrayPool()
    monkeypatch.setenv("KTGEN_POOL_MIB", "-1")
    with pytest.raises(ValueError, match="KTGEN_POOL_MIB"):
        ArrayPool()


def test_moe_results_kept_are_never_overwritten():
    """Outputs and gradients a caller keeps stay as they were while later calls reuse the
    memory of those it dropped."""
    spec = ktgen.MoESpec(name="pooled", expert_num=4, num_experts_per_tok=2, hidden_size=256,
                         intermediate_size=128, max_len=1024, lora=dict(rank=4, dtype="float32"))
    rng = np.random.default_rng(0)
    moe = ktgen.MoE(spec, *make_weights(spec, rng), ktgen.LoRAWeights.random(spec, rng, 0.1))
    inputs = [make_inputs(spec, rng, 1024) for _ in range(3)]
    kept_out, saved = moe.forward_train(*inputs[0])
    kept_grads = moe.backward(saved, kept_out)
    out_copy, input_copy = kept_out.copy(), kept_grads.input.copy()
    reused = POOL.reused
    for x, ids, w in inputs[1:]:
        out, saved = moe.forward_train(x, ids, w)
        moe.backward(saved, out)
        del out
    assert POOL.reused > reused or POOL.cap_bytes == 0
    np.testing.assert_array_equal(kept_out, out_copy)
    np.testing.assert_array_equal(kept_grads.input, input_copy)
    again, saved = moe.forward_train(*inputs[0])
    moe.backward(saved, again)
    np.testing.assert_array_equal(again, out_copy)

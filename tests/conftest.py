"""Shared fixtures: an isolated kernel cache, the tiers this CPU runs, and test data makers."""

from __future__ import annotations

import os

# libgomp reads this when the first kernel loads. Spinning OpenMP workers between calls would
# take one of CI's two cores from the NumPy reference running in the same process; results do
# not depend on it (they are bitwise identical for any thread count and schedule).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import ml_dtypes
import numpy as np
import pytest

from ktgen import isa
from ktgen.render import BLOCKING

bf16 = ml_dtypes.bfloat16

# Tiers rendered by ktgen that this CPU runs natively, plus avx512 through its software
# emulation (KTGEN_EMULATE_AVX512=1, bit-exact with native) on a CPU without AVX-512, so that
# every tier's kernels are tested everywhere. amx and avx512bf16 (which differs from avx512 in
# its bf16 forward GEMMs only) have tests of their own that run emulated everywhere
# (test_amx.py, test_avx512bf16.py); the emulation switches of every tier the CPU lacks are on.
NATIVE_TIERS = [t for t in isa.available_tiers() if t in BLOCKING and t != "amx"]
EMULATED = [t for t in ("avx512bf16", "avx512") if t not in NATIVE_TIERS]
EMULATED_AVX512 = "avx512" in EMULATED
RUN_TIERS = NATIVE_TIERS + (["avx512"] if EMULATED_AVX512 else [])
ALL_TIERS = list(BLOCKING)


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """Every test session compiles into its own cache (KTGEN_TEST_CACHE_DIR reuses one)."""
    path = os.environ.get("KTGEN_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("ktgen-cache"))
    old = os.environ.get("KTGEN_CACHE_DIR")
    os.environ["KTGEN_CACHE_DIR"] = path
    os.environ.pop("KTGEN_ISA", None)
    os.environ.pop("KTGEN_EMULATE_AMX", None)
    for tier in EMULATED:
        os.environ[isa.EMULATION_VARS[tier]] = "1"
    yield path
    if old is None:
        os.environ.pop("KTGEN_CACHE_DIR", None)
    else:
        os.environ["KTGEN_CACHE_DIR"] = old


def make_weights(spec, rng, std=0.5):
    """bf16 gate [E,I,H], up [E,I,H], down [E,H,I] of the given std."""
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    gate = (rng.standard_normal((E, I, H), np.float32) * std).astype(bf16)
    up = (rng.standard_normal((E, I, H), np.float32) * std).astype(bf16)
    down = (rng.standard_normal((E, H, I), np.float32) * std).astype(bf16)
    return gate, up, down


def make_inputs(spec, rng, T, std=1.0, ids=None):
    """x bf16 [T,H], expert_ids int64 [T,k] (random with some -1 slots unless given),
    routing_weights float32 [T,k]."""
    k = spec.num_experts_per_tok
    x = (rng.standard_normal((T, spec.hidden_size), np.float32) * std).astype(bf16)
    if ids is None:
        ids = rng.integers(0, spec.expert_num, (T, k))
        ids[rng.random((T, k)) < 0.1] = -1
    rw = rng.random((T, k)).astype(np.float32)
    return x, np.asarray(ids, np.int64), rw

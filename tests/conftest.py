"""The session fixture: an isolated kernel cache, with the emulation of every tier this CPU lacks
on (helpers.EMULATED). What tests share otherwise lives in helpers.py."""

from __future__ import annotations

import os
import sys

# the test modules live in one directory per layer (spec, kernels, tiers, system, integration);
# what they share (helpers, golden, dist_case) lives here
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# libgomp reads this when the first kernel loads. Spinning OpenMP workers between calls would
# take one of CI's two cores from the NumPy reference running in the same process; results do
# not depend on it (they are bitwise identical for any thread count and schedule).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import pytest

from ktgen import isa
from helpers import EMULATED


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """Every test run compiles into its own cache (KTGEN_TEST_CACHE_DIR reuses one). The workers
    of a pytest-xdist run (-n) share it: ktgen's file locks let one compile a kernel while the
    other waits for it, so no kernel is compiled twice."""
    path = os.environ.get("KTGEN_TEST_CACHE_DIR")
    if not path:
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent          # the run's directory, above each worker's own
        path = str(base / "ktgen-cache")
        os.makedirs(path, exist_ok=True)
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


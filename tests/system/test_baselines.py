"""Tests of ktgen.baselines: the PyTorch baselines compute docs/design.md#the-math (against the float64 reference),
grouped_mm agrees with the eager loop, the C bandwidth probe works, and the result dicts have
their documented keys. Small shapes: the whole file runs in seconds."""

from __future__ import annotations

import math
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ktgen import MoESpec, baselines as B, isa, reference
from helpers import LORA_NAMES

try:
    import torch  # noqa: F401
    HAS_TORCH = True
except ImportError:
    HAS_TORCH = False

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")

GRAD_NAMES = ("input", "routing_weights") + LORA_NAMES
# relL2 against float64: bf16 rounds the activations (and the LoRA matrices, cast to the compute
# dtype) at every step; fp32 only accumulates float32 rounding.
TOL = {"bf16": 2.5e-2, "fp32": 1e-5}

MEASURE_KEYS = {"key", "name", "impl", "dtype", "pass", "threads", "torch_version", "ok", "error", "ms",
                "runs_ms", "runs", "repeat", "skipped", "budget_s", "note", "gflop", "gflops",
                "base_gflop", "base_gflops", "probe"}
TIMED_KEYS = {"ms", "runs_ms", "runs", "repeat", "skipped", "budget_s", "note"}
ROOF_KEYS = {"what", "dtype", "n", "threads", "torch_version", "gflop", "gflops", "probe"} | TIMED_KEYS
PROBE_KEYS = {"small_ms", "predicted_s", "too_slow"}
BW_KEYS = {"what", "gbs", "median_gbs", "bytes", "threads", "runs_gbs", "runs", "repeat", "skipped",
           "budget_s", "note", "checksum_ok", "flags"}
RUN_ALL_KEYS = {"torch_version", "threads", "tokens", "load_average", "cores", "flops", "measurements", "skipped",
                "best_forward", "best_train", "roof_fp32", "roof_bf16", "bandwidth"}
BEST_KEYS = {"key", "name", "ms", "gflops", "base_gflops"}
FLOP_KEYS = {"entries", "active_experts", "rank", "forward_base", "forward_lora", "forward", "backward_base",
             "backward_lora", "backward", "train_base", "train", "formula"}


@pytest.fixture(scope="module")
def layer():
    spec = MoESpec(name="bl", expert_num=4, num_experts_per_tok=2, hidden_size=64, intermediate_size=64,
                   lora={"rank": 8})
    x, ids, rw, go, gate, up, down, lora = B.random_layer(spec, 16, seed=3, std=0.1)
    ids = ids.astype(np.int64)
    ids[0, 1] = -1           # a skipped slot
    ids[1, 1] = ids[1, 0]    # the same expert twice in one row
    return SimpleNamespace(spec=spec, x=x, ids=ids, rw=rw, go=go, gate=gate, up=up, down=down, lora=lora,
                           args=(spec, x, ids, rw, go, gate, up, down, lora))


@pytest.fixture(scope="module")
def expected(layer):
    lw = SimpleNamespace(**layer.lora)
    s = layer.spec.lora.scale
    out = reference.forward(layer.x, layer.ids, layer.rw, layer.gate, layer.up, layer.down, lora=lw, scale=s)
    grads = reference.backward(layer.x, layer.ids, layer.rw, layer.gate, layer.up, layer.down, layer.go,
                               lora=lw, scale=s)
    return {"out": out, **grads}


@needs_torch
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_eager_matches_reference(layer, expected, dtype):
    res = B.eager_outputs(*layer.args, dtype=dtype, threads=1)
    assert "backward_error" not in res
    for name in ("out",) + GRAD_NAMES:
        assert res[name].shape == expected[name].shape, name
        err = reference.rel_l2(res[name], expected[name])
        assert err <= TOL[dtype], f"{name}: relL2 {err:.2e} > {TOL[dtype]:.0e} ({dtype})"
    assert np.all(res["routing_weights"][0, 1] == 0)   # a skipped slot has no routing gradient


@needs_torch
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_grouped_mm_matches_eager(layer, dtype):
    eager = B.eager_outputs(*layer.args, dtype=dtype, threads=1)
    grouped = B.grouped_mm_outputs(*layer.args, dtype=dtype, threads=1)
    tol = {"bf16": 1e-2, "fp32": 1e-6}[dtype]
    assert reference.rel_l2(grouped["out"], eager["out"]) <= tol
    if "backward_error" in grouped:          # torch versions whose CPU backward raises: recorded
        assert grouped["backward_error"]
    else:
        for name in GRAD_NAMES:
            assert reference.rel_l2(grouped[name], eager[name]) <= tol, name


@needs_torch
def test_no_lora(layer):
    spec = layer.spec.replace(lora=None)
    res = B.eager_outputs(spec, layer.x, layer.ids, layer.rw, layer.go, layer.gate, layer.up, layer.down, None,
                          dtype="fp32", threads=1)
    ref = reference.forward(layer.x, layer.ids, layer.rw, layer.gate, layer.up, layer.down)
    assert reference.rel_l2(res["out"], ref) <= TOL["fp32"]
    assert set(res) == {"out", "input", "routing_weights"}
    g = B.grouped_mm_outputs(spec, layer.x, layer.ids, layer.rw, layer.go, layer.gate, layer.up, layer.down,
                             None, dtype="fp32", threads=1, backward=False)
    assert reference.rel_l2(g["out"], ref) <= TOL["fp32"]


def test_flop_counts(layer):
    fl = B.flop_counts(layer.spec, layer.ids)
    assert set(fl) == FLOP_KEYS
    N, H, I, r = 31, 64, 64, 8                  # 32 slots, one skipped
    assert fl["entries"] == N and fl["rank"] == r
    assert fl["forward_base"] == 2 * N * 3 * H * I
    assert fl["forward_lora"] == 3 * (2 * N * r * H + 2 * N * I * r)
    assert fl["backward_base"] == fl["forward_base"]           # frozen base: data gradients only
    assert fl["backward_lora"] == 2 * fl["forward_lora"]       # data + weight gradients
    assert fl["train"] == fl["forward"] + fl["backward"]
    assert B.flop_counts(layer.spec.replace(lora=None), layer.ids)["forward_lora"] == 0


def test_timed_budget():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.02)

    t = B.timed(fn, repeat=50, budget_s=0.15)
    assert set(t) == TIMED_KEYS
    assert 1 <= t["runs"] < 50 and t["skipped"] == 50 - t["runs"] and "budget" in t["note"]
    assert len(calls) == t["runs"] + 1                          # plus the warm-up
    assert t["ms"] >= 15

    t = B.timed(fn, repeat=3, budget_s=0.01)                   # the warm-up alone passes the budget
    assert t["runs"] == 1 and t["skipped"] == 3 and "warm-up" in t["note"]

    t = B.timed(lambda: None, repeat=4, budget_s=10)
    assert t["runs"] == 4 and t["skipped"] == 0 and t["note"] == ""


def test_bandwidth_probe():
    bw = B.read_bandwidth(threads=2, nbytes=8 << 20, repeat=2, budget_s=5)
    assert set(bw) == BW_KEYS
    assert math.isfinite(bw["gbs"]) and bw["gbs"] > 0
    assert bw["checksum_ok"]
    assert bw["bytes"] == 8 << 20 and bw["threads"] == 2 and len(bw["runs_gbs"]) == bw["runs"] >= 1


def test_building_the_bandwidth_probe_leaves_the_cwd_and_the_environment_alone(tmp_path, monkeypatch):
    """It is compiled like the kernels: a thread builds it while this one
    watches os.getcwd() and os.environ."""
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(B, "_bw_module", None)
    cwd, env = os.getcwd(), dict(os.environ)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("module", B._bandwidth_module()))
    changes = []
    worker.start()
    while worker.is_alive():
        if os.getcwd() != cwd or dict(os.environ) != env:
            changes.append(os.getcwd())
        time.sleep(0.0005)
    worker.join()
    assert "module" in result and not changes


@needs_torch
def test_measure_keys(layer):
    m = B.measure("eager", *layer.args, dtype="bf16", train=True, repeat=2, threads=1, budget_s=5)
    assert set(m) == MEASURE_KEYS
    assert m["ok"] and m["error"] is None and m["pass"] == "forward+backward" and m["key"] == "eager_bf16_train"
    assert m["ms"] > 0 and m["gflops"] > 0 and m["base_gflops"] < m["gflops"]
    fl = B.flop_counts(layer.spec, layer.ids)
    assert m["gflop"] == pytest.approx(fl["train"] / 1e9)
    # 16 tokens: the probe ran on 2 and predicted a call well inside the budget
    assert set(m["probe"]) == PROBE_KEYS and m["probe"]["too_slow"] is None
    assert 0 < m["probe"]["predicted_s"] < 5


@needs_torch
def test_a_probe_predicting_a_call_past_the_budget_skips_the_measurement(layer, monkeypatch):
    """As bf16 on a CPU without bf16 arithmetic (a 95 s warm-up): the probe's prediction is
    reported and nothing else runs."""
    monkeypatch.setattr(B, "PROBE_BUDGETS", 0.0)     # any prediction is past the budget
    calls = []
    real = B._Layer.__init__

    def counting(self, impl, spec, W, x, *args):
        calls.append(len(x))
        real(self, impl, spec, W, x, *args)

    monkeypatch.setattr(B._Layer, "__init__", counting)
    m = B.measure("eager", *layer.args, dtype="fp32", train=True, repeat=2, threads=1, budget_s=5)
    assert set(m) == MEASURE_KEYS and calls == [1]      # the probe's layer only, on one of the 16 tokens
    assert not m["ok"] and m["error"] is None and m["runs"] == 0 and math.isnan(m["ms"])
    assert m["note"].startswith("skipped: a probe on 1 of 16 tokens took") and "past 0 x the 5 s budget" in m["note"]
    assert m["probe"]["predicted_s"] == pytest.approx(m["probe"]["small_ms"] / 1e3 * 16)

    res = B.run_all(*layer.args, repeat=1, threads=1, budget_s=5, roof_n=256, bandwidth=False)
    assert res["measurements"] == {} and set(res["skipped"]) == {k for k, *_ in B.MEASUREMENTS}
    assert res["best_forward"] is None and res["best_train"] is None
    for dtype in ("fp32", "bf16"):
        roof = res[f"roof_{dtype}"]
        assert set(roof) == ROOF_KEYS and math.isnan(roof["gflops"]) and roof["runs"] == 0
        if dtype == "fp32" or set(B.BF16_FLAGS) & isa.cpu_flags():
            assert roof["note"].startswith("skipped: a 32x32x32 probe took")
        else:
            assert roof["note"].startswith("skipped: this CPU has no bf16 arithmetic")
    table = "\n".join(B.format_table(res))
    assert table.count("skipped: a probe on 1 of 16 tokens") == len(B.MEASUREMENTS)
    assert "torch eager per-expert loop bf16 fwd+bwd" in table and "skipped: a 32x32x32 probe" in table


@needs_torch
def test_measure_records_an_error(layer, monkeypatch):
    def broken(self):
        raise RuntimeError("Invalid strides/sizes (as torch 2.13's CPU grouped_mm backward may say)")

    monkeypatch.setattr(B._Layer, "train", broken)
    m = B.measure("grouped_mm", *layer.args, dtype="fp32", train=True, repeat=2, threads=1, budget_s=5)
    assert set(m) == MEASURE_KEYS
    assert not m["ok"] and "Invalid strides" in m["error"] and math.isnan(m["ms"])
    res = {"measurements": {"grouped_mm_fp32_train": m}}
    assert B._best(res["measurements"], True) is None


@needs_torch
def test_matmul_roof_keys():
    r = B.matmul_roof(threads=1, dtype="fp32", n=64, repeat=2, budget_s=5)
    assert set(r) == ROOF_KEYS and r["gflops"] > 0 and r["n"] == 64


@needs_torch
def test_run_all_keys(layer):
    lines = []
    res = B.run_all(*layer.args, repeat=1, threads=1, budget_s=5, bandwidth_bytes=4 << 20, roof_n=64,
                    log=lines.append)
    assert set(res) == RUN_ALL_KEYS
    assert set(res["flops"]) == FLOP_KEYS
    assert set(res["measurements"]) | set(res["skipped"]) == {k for k, *_ in B.MEASUREMENTS}
    for key, m in res["measurements"].items():
        assert set(m) == MEASURE_KEYS and m["key"] == key
        if m["impl"] == "eager" or m["pass"] == "forward":
            assert m["ok"], (key, m["error"])
    for which in ("best_forward", "best_train"):
        best = res[which]
        assert set(best) == BEST_KEYS
        cands = [m["ms"] for m in res["measurements"].values()
                 if m["ok"] and (m["pass"] != "forward") == (which == "best_train")]
        assert best["ms"] == min(cands) and best["name"] == res["measurements"][best["key"]]["name"]
    assert set(res["roof_fp32"]) == ROOF_KEYS and res["roof_fp32"]["dtype"] == "fp32"
    assert set(res["roof_bf16"]) == ROOF_KEYS and res["roof_bf16"]["dtype"] == "bf16"
    assert set(res["bandwidth"]) == BW_KEYS and res["bandwidth"]["gbs"] > 0
    assert len(res["load_average"]) == 2
    assert len(lines) == len(res["measurements"]) + 2
    table = "\n".join(B.format_table(res))
    assert "best PyTorch forward" in table and "GB/s" in table and "(the roof)" in table


@needs_torch
def test_run_all_forward_only(layer):
    res = B.run_all(*layer.args, repeat=1, threads=1, budget_s=5, train=False, fp32=False, roof=False,
                    bandwidth=False)
    assert set(res["measurements"]) == {"eager_bf16_forward", "grouped_mm_bf16_forward"}
    assert res["best_train"] is None and res["roof_fp32"] is None and res["bandwidth"] is None
    assert "eager_fp32_forward" in res["skipped"]
    B.format_table(res)

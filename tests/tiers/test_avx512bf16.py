"""The avx512bf16 tier: bf16 forward GEMMs on vdpbf16ps, emulated everywhere
(KTGEN_EMULATE_AVX512BF16=1) and natively where the CPU has AVX512_BF16.

VDPBF16PS as measured on Intel (Sapphire/Emerald Rapids), per fp32 lane i:
c = rn(rn(c + a[2i+1] b[2i+1]) + a[2i] b[2i]), the odd product first, bf16 products exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import ktgen
from ktgen import isa
from ktgen.render import render

from helpers import amx_spec, assert_layer_meets_limits, build_harness, run_layer

NATIVE_BF16 = not isa.missing_features("avx512bf16")

HARNESS = r"""
#include "kernel.c"
#include <stdio.h>
/* stdin: cases "c a0 a1 b[0..31]" (c float32 bits, the rest bf16 bits);
 * stdout: the 16 lanes of vdpbf16ps(c, pair (a0, a1), b) as float32 bits. */
int main(void) {
    unsigned c0, a0, a1;
    while (scanf("%x %x %x", &c0, &a0, &a1) == 3) {
        uint16_t b[32];
        for (int k = 0; k < 32; k++) { unsigned v; if (scanf("%x", &v) != 1) return 3; b[k] = (uint16_t)v; }
        float c;
        memcpy(&c, &c0, 4);
        float lanes[16];
        v_store(lanes, v_dpbf16(v_set1(c), (uint32_t)a0 | ((uint32_t)a1 << 16), b));
        for (int l = 0; l < 16; l++) { unsigned u; memcpy(&u, &lanes[l], 4); printf("%08x ", u); }
        printf("\n");
    }
    return 0;
}
"""


def bits16(x) -> int:
    return int(np.asarray(x, ml_dtypes.bfloat16).view(np.uint16))


def model(c, a0, a1, b0, b1) -> np.float32:
    f = np.float32
    return f(f(f(c) + f(a1 * b1)) + f(a0 * b0))


def build(tmp_path, emulate: bool) -> str:
    return build_harness(tmp_path, ktgen.Target("avx512bf16", emulate=emulate), HARNESS)


def check(exe, rng):
    cases, want = [], []
    # c = 1, odd product 2^-24, even product 2^-24: odd first rounds to 1, then 1 again; an
    # even-first or fused order would differ on other cases below.
    fixed = [(1.0, 2.0 ** -24, 2.0 ** -24), (0.0, 1.0, 2.0 ** -30), (1.0, -1.0, 2.0 ** -30)]
    for c, even, odd in fixed:
        cases.append((np.float32(c), np.float32(even), np.float32(odd), np.ones(32, np.float32)))
    for _ in range(300):
        scale = 2.0 ** rng.integers(-20, 21, 2)
        a0, a1 = (rng.standard_normal(2) * scale).astype(ml_dtypes.bfloat16).astype(np.float32)
        b = rng.standard_normal(32).astype(ml_dtypes.bfloat16).astype(np.float32)
        cases.append((np.float32(rng.standard_normal() * 2.0 ** rng.integers(-10, 11)), a0, a1, b))
    lines = []
    for c, a0, a1, b in cases:
        lines.append(" ".join([f"{np.float32(c).view(np.uint32):08x}", f"{bits16(a0):04x}", f"{bits16(a1):04x}"]
                              + [f"{bits16(v):04x}" for v in b]))
        want.append([model(c, a0, a1, b[2 * l], b[2 * l + 1]) for l in range(16)])
    out = subprocess.run([exe], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    got = [[np.uint32(int(w, 16)).view(np.float32) for w in line.split()] for line in out.stdout.splitlines()]
    bad = sum(g != w for gl, wl in zip(got, want) for g, w in zip(gl, wl))
    assert len(got) == len(cases) and bad == 0, f"{bad} lanes differ from the measured model"


def test_emulated_vdpbf16ps_follows_the_measured_arithmetic(tmp_path):
    check(build(tmp_path, emulate=True), np.random.default_rng(3))


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no AVX512_BF16")
def test_native_vdpbf16ps_follows_the_same_model(tmp_path):
    check(build(tmp_path, emulate=False), np.random.default_rng(4))


def test_rendered_bf16_forward_uses_vdpbf16ps():
    spec = ktgen.MoESpec(name="dp_src", expert_num=2, num_experts_per_tok=1, hidden_size=32,
                         intermediate_size=32, max_len=4)
    native = render(spec, "avx512bf16").source
    assert "_mm512_dpbf16_ps" in native and "bf16dp_rows(mr, a, b" in native
    assert "bf16dp_rows" not in render(spec.replace(quant={"mode": "int8"}), "avx512bf16").source
    assert "bf16dp_rows" not in render(spec, "avx512").source


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("KTGEN_EMULATE_AVX512BF16", "1")
    monkeypatch.setenv("KTGEN_ISA", "avx512bf16")


@pytest.mark.parametrize("mode,tp,lora", [("bf16", 1, True), ("bf16", 2, True), ("bf16", 1, False), ("int8", 1, True)])
def test_emulated_layer_matches_the_reference(emulated, mode, tp, lora):
    """Forward and backward through the emulated tier at awkward routings (experts with 0, 1,
    15, 16 and 17 entries, skipped slots) against the float64 reference."""
    spec = amx_spec(mode, lora, tp)
    moe, inputs, out, grads = run_layer(spec, seed=11)
    assert moe.kernel.isa == "avx512bf16" and moe.kernel.emulated
    assert_layer_meets_limits(moe, mode, inputs, out, grads)


def test_auto_prefers_amx_then_avx512bf16_then_avx512():
    assert isa.TIERS[:3] == ("amx", "avx512bf16", "avx512")
    flags = frozenset({"avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx2", "f16c"})
    assert isa.choose("auto", flags)[0] == "avx512bf16"
    assert isa.choose("auto", flags - {"avx512_bf16"})[0] == "avx512"


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no AVX512_BF16")
@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_native_avx512bf16_agrees_with_the_emulation_to_the_bit(mode, tmp_path):
    """Both runs in fresh processes, so each compiles and loads its own build."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, ktgen
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from helpers import amx_spec, run_layer
        spec = amx_spec({mode!r}, True, 2)
        _, _, out, grads = run_layer(spec, seed=7)
        np.savez(sys.argv[1], out=out.view(np.uint16), dx=grads.input.view(np.uint16),
                 dw=grads.routing_weights, ga=grads.gate_a, db=grads.down_b)
    """)
    files = {}
    for emulate in ("0", "1"):
        path = str(tmp_path / f"dp_{mode}_{emulate}.npz")
        env = dict(os.environ, KTGEN_ISA="avx512bf16", KTGEN_EMULATE_AVX512BF16=emulate)
        subprocess.run([sys.executable, "-c", script, path], env=env, check=True)
        files[emulate] = np.load(path)
    for key in files["0"].files:
        np.testing.assert_array_equal(files["0"][key], files["1"][key], err_msg=key)

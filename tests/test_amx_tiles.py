"""TDPBF16PS as the amx tier computes it, tile by tile: the emulation against the arithmetic
measured on Sapphire/Emerald Rapids (docs/design.md, "AMX arithmetic"), and natively against
the same model where this CPU has AMX.

For each fp32 element of C over one tile of 16 K pairs: E = the float32 running sum (rounded
to nearest even at each step, from 0) of the 16 even-index products a[2p] b[2p], p in order;
O the same over the odd products; then C = rn(C + rn(E + O)). bf16 products are exact.

A small C harness includes the rendered kernel source and calls its tile primitives.
"""

from __future__ import annotations

import subprocess

import ml_dtypes
import numpy as np
import pytest

import ktgen
from ktgen import isa

from helpers import build_harness

NATIVE_AMX = not isa.missing_features("amx") and isa.amx_permission()

HARNESS = r"""
#include "kernel.c"
#include <stdio.h>
/* stdin: cases, each "c0 a[0..31] b[0..31]" as bf16 bit patterns (c0 as float32 bits);
 * stdout: C[0][0] of TDPBF16PS(C = c0, A row 0 = a, every B column = b), as float32 bits. */
int main(void) {
    if (!amx_permission()) return 2;
    amx_begin();
    static uint16_t A[16][32], B[16][32];
    static float C[16][16];
    unsigned c0;
    while (scanf("%x", &c0) == 1) {
        memset(A, 0, sizeof A);
        for (int k = 0; k < 32; k++) { unsigned v; if (scanf("%x", &v) != 1) return 3; A[0][k] = (uint16_t)v; }
        for (int k = 0; k < 32; k++) {
            unsigned v;
            if (scanf("%x", &v) != 1) return 3;
            for (int n = 0; n < 16; n++) B[k / 2][2 * n + (k & 1)] = (uint16_t)v;
        }
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 16; n++) memcpy(&C[m][n], &c0, 4);
        TILE_LOADD(0, C, 64);
        TILE_LOADD(4, A, 64);
        TILE_LOADD(6, B, 64);
        TILE_DPBF16PS(0, 4, 6);
        TILE_STORED(0, C, 64);
        unsigned out;
        memcpy(&out, &C[0][0], 4);
        printf("%08x\n", out);
    }
    amx_end();
    return 0;
}
"""

# The vectors, which tell the measured model from a sequential one:
# (C, {element index: product}, expected C)
VECTORS = [
    (1.0, {2 * p: 2.0 ** -24 for p in range(16)}, 1.000000954),
    (0.0, {0: 1.0, 1: 2.0 ** -30, 2: -1.0}, 2.0 ** -30),
    (0.0, {0: 2.0 ** 60, 1: 2.0 ** -60, 2: -(2.0 ** 60)}, 2.0 ** -60),
    (1.0, {4: -1.0, 31: 2.0 ** -30}, 0.0),
]


def model(c: float, products: np.ndarray) -> np.float32:
    """The measured TDPBF16PS arithmetic for one element (products exact in float32)."""
    f = np.float32
    even, odd = f(0), f(0)
    for p in range(16):
        even = f(even + products[2 * p])
        odd = f(odd + products[2 * p + 1])
    return f(f(c) + f(even + odd))


def bits16(x) -> int:
    return int(np.asarray(x, ml_dtypes.bfloat16).view(np.uint16))


def build(tmp_path, emulate: bool) -> str:
    return build_harness(tmp_path, ktgen.Target("amx", emulate=emulate), HARNESS)


def cases_from_vectors():
    """(c, a, b) in bf16 with a[k] b[k] = the vector's products (b = 1 or the product's sign)."""
    out = []
    for c, prods, want in VECTORS:
        a = np.zeros(32, np.float32)
        for k, v in prods.items():
            a[k] = v
        out.append((c, a, np.ones(32, np.float32), want))
    return out


def random_cases(rng, count):
    """Operands of mixed magnitudes, so that the order of the additions shows."""
    out = []
    for _ in range(count):
        scale = 2.0 ** rng.integers(-20, 21, 32)
        a = (rng.standard_normal(32) * scale).astype(ml_dtypes.bfloat16).astype(np.float32)
        b = rng.standard_normal(32).astype(ml_dtypes.bfloat16).astype(np.float32)
        c = np.float32(rng.standard_normal() * 2.0 ** rng.integers(-10, 11))
        out.append((c, a, b, None))
    return out


def run(exe, cases) -> list[np.float32]:
    lines = []
    for c, a, b, _ in cases:
        words = [f"{np.float32(c).view(np.uint32):08x}"]
        words += [f"{bits16(v):04x}" for v in a] + [f"{bits16(v):04x}" for v in b]
        lines.append(" ".join(words))
    res = subprocess.run([exe], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    return [np.uint32(int(w, 16)).view(np.float32) for w in res.stdout.split()]


def check(exe, rng):
    cases = cases_from_vectors()
    got = run(exe, cases)
    for (c, a, b, want), g in zip(cases, got):
        assert g == np.float32(want), f"C={c}: got {g!r}, the hardware gives {want!r}"
        assert g == model(c, a * b)
    cases = random_cases(rng, 400)
    got = run(exe, cases)
    bad = [(c, g, model(c, a * b)) for (c, a, b, _), g in zip(cases, got) if g != model(c, a * b)]
    assert not bad, f"{len(bad)} of {len(cases)} outputs differ from the model, e.g. {bad[:3]}"


def test_the_model_tells_the_vectors_apart_from_a_sequential_sum():
    for c, a, b, want in cases_from_vectors():
        assert model(c, a * b) == np.float32(want)
    # a left-to-right sum from C misses at least one of them (why the vectors were chosen)
    seq = []
    for c, a, b, want in cases_from_vectors():
        acc = np.float32(c)
        for p in a * b:
            acc = np.float32(acc + p)
        seq.append(acc == np.float32(want))
    assert not all(seq)


def test_emulated_tdpbf16ps_follows_the_measured_arithmetic(tmp_path):
    check(build(tmp_path, emulate=True), np.random.default_rng(1))


@pytest.mark.skipif(not NATIVE_AMX, reason="this CPU has no AMX (or the OS refuses tile data)")
def test_native_tdpbf16ps_follows_the_same_model(tmp_path):
    check(build(tmp_path, emulate=False), np.random.default_rng(2))

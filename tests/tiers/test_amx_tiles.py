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


# ---- tile operands: float32 -> bf16 as VCVTNEPS2BF16 rounds ----

ROUND_HARNESS = r"""
#include "kernel.c"
#include <stdio.h>
/* stdin: lines of 16 float32 bit patterns; stdout per line: the 16 bf16 of v_store_tile_bf16,
 * the 16 float32 of v_tile_bf16_round, the 32 bf16 of v_store_tile_pairs(a, -a). */
int main(void) {
    float a[16], na[16], r[16];
    uint16_t h[16], pairs[32];
    for (;;) {
        for (int l = 0; l < 16; l++) {
            unsigned u;
            if (scanf("%x", &u) != 1) return 0;
            memcpy(&a[l], &u, 4);
            na[l] = -a[l];
        }
        v_store_tile_bf16(h, v_load(a));
        v_store(r, v_tile_bf16_round(v_load(a)));
        v_store_tile_pairs(pairs, v_load(a), v_load(na));
        for (int l = 0; l < 16; l++) printf("%04x ", h[l]);
        for (int l = 0; l < 16; l++) { unsigned u; memcpy(&u, &r[l], 4); printf("%08x ", u); }
        for (int l = 0; l < 32; l++) printf("%04x ", pairs[l]);
        printf("\n");
    }
}
"""


def cvtneps2bf16(u: int) -> int:
    """VCVTNEPS2BF16 (Intel SDM): denormals to signed zero, NaN quieted, else nearest even."""
    if u & 0x7F800000 == 0:
        return (u >> 16) & 0x8000
    if u & 0x7F800000 == 0x7F800000 and u & 0x7FFFFF:
        return (u >> 16) | 0x40
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def tile_rounding_cases(rng):
    edge = [0x00000000, 0x80000000, 0x007FFFFF, 0x807FFFFF, 0x007F8000, 0x00000001, 0x00800000,
            0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x3F808000, 0x3F818000, 0x3F80FFFF,
            0x7F7FFFFF, 0x0080FFFF]
    rand = rng.integers(0, 2 ** 32, 64, dtype=np.uint64).astype(np.uint32).tolist()
    return [edge] + [rand[i:i + 16] for i in range(0, 64, 16)]


def check_tile_rounding(exe, rng):
    cases = tile_rounding_cases(rng)
    res = subprocess.run([exe], input="\n".join(" ".join(f"{u:08x}" for u in c) for c in cases) + "\n",
                         capture_output=True, text=True, check=True)
    for case, line in zip(cases, res.stdout.splitlines(), strict=True):
        words = [int(w, 16) for w in line.split()]
        want = [cvtneps2bf16(u) for u in case]
        assert words[:16] == want, [f"{u:08x}" for u in case]
        assert words[16:32] == [w << 16 for w in want]
        assert words[32::2] == want and words[33::2] == [cvtneps2bf16(u ^ 0x80000000) for u in case]


def test_emulated_tile_operands_round_as_vcvtneps2bf16(tmp_path):
    """A float32 denormal just below 2^-126 becomes zero, not the smallest normal bf16: what
    the emulation writes for a tile is what the native build writes."""
    exe = build_harness(tmp_path, ktgen.Target("amx", emulate=True), ROUND_HARNESS)
    check_tile_rounding(exe, np.random.default_rng(3))


@pytest.mark.skipif(not NATIVE_AMX, reason="this CPU has no AMX (or the OS refuses tile data)")
def test_native_tile_operands_round_as_vcvtneps2bf16(tmp_path):
    exe = build_harness(tmp_path, ktgen.Target("amx", emulate=False), ROUND_HARNESS)
    check_tile_rounding(exe, np.random.default_rng(3))


@pytest.mark.skipif(bool(isa.missing_features("avx512")), reason="this CPU has no AVX-512")
def test_avx512_without_bf16_instructions_rounds_tile_operands_the_same(tmp_path):
    """The avx512 tier's header, compiled without AVX512_BF16, spells the rounding out."""
    exe = build_harness(tmp_path, ktgen.Target("avx512"), ROUND_HARNESS)
    check_tile_rounding(exe, np.random.default_rng(3))

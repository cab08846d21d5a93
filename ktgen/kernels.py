"""What each ISA tier renders: one description per tier of its vector primitives, the blocking of
its micro-kernels and the kernel set each weight format runs on (docs/kernels.md, "The kernel
sets" and "Adding a tier").

A kernel set is a template kernels/<name>.c.j2 that fills the driver (moe.c.j2) with the ks_*
entry points: the forward's products and their operands, the backward's transposed products.
Its panels are in the layout its products stream, `pack` (1: K-major rows, 2: bf16 pairs along
K, 4: int8 quads along K), per weight format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Blocking:
    """Register blocking of a tier's vector micro-kernels (micro.h.j2). Broadcast form (the GEMMs,
    forward and backward): bc_mr activation rows x bc_nr panel columns of accumulators; dot form
    (the LoRA down-projections A x): dot_mr rows x dot_nr outputs, each a vector of partial sums.
    Both fill the register file (16 vector registers for avx2, 32 for avx512) with room for the
    operands; bc_nr and dot_nr divide the 32 columns of a panel.
    wide_mr: blocks of at most this many rows take all 32 columns of a panel in one kernel (where
    bc_nr is less), so that a few rows still have enough independent accumulators to cover the
    FMA latency.
    fill_modes: the weight formats whose forward unpacks a panel's K block inside the first row
    block's product (bcast_fill) rather than in a pass of its own (None: every format); on avx2
    the int4 dequantization does not fit the 16 registers beside 6 x 16 accumulators, and spilling
    costs more than the separate pass (docs/kernels.md, "The avx2 forward")."""

    dot_mr: int
    dot_nr: int
    bc_mr: int
    bc_nr: int
    wide_mr: int = 0
    fill_modes: tuple[str, ...] | None = ()

    def fills(self, mode: str) -> bool:
        return self.fill_modes is None or mode in self.fill_modes


@dataclass(frozen=True)
class KernelSet:
    """A kernel set: its template, the panel layout of each format it streams (1 for any other),
    whether its GEMMs add the LoRA up-projection s B (A a) themselves (as extra K steps), and
    whether it takes the tile instructions."""

    name: str
    pack: Mapping[str, int] = field(default_factory=dict)
    lora_in_gemm: bool = False

    @property
    def template(self) -> str:
        return f"kernels/{self.name}.c.j2"

    def pack_of(self, mode: str) -> int:
        return self.pack.get(mode, 1)


KERNEL_SETS = {k.name: k for k in (
    # every product on the tier's float32 FMAs, panels decoded to float32 a K block at a time
    KernelSet("vector"),
    # the forward's bf16 products on vdpbf16ps from bf16 pairs (AVX512_BF16)
    KernelSet("bf16dp", MappingProxyType({"bf16": 2})),
    # the forward's int8 products on vpdpbusd from int8 quads and u8 activations (AVX-512 VNNI)
    KernelSet("vnni", MappingProxyType({"int8": 4})),
    # every product on AMX tiles (int4 panels dequantized to bf16 pairs beside them), LoRA too
    KernelSet("amx", MappingProxyType({"bf16": 2}), lora_in_gemm=True),
    # int8 on AMX's TDPBUSD, the LoRA terms in vector code
    KernelSet("amx_int8", MappingProxyType({"int8": 4})),
)}


@dataclass(frozen=True)
class TierKernels:
    """One tier: its vector primitives (vector/<vector>.h.j2; vec16, their portable twin, when
    the tier is emulated), vector width, blocking, the kernel set of each weight format (the
    vector set where none is named; `with_vnni` where the target has VNNI), and `split`: per
    format, the columns a panel row's words pair up (avx2's bf16: j and j + 8, widened by one
    shift or one mask)."""

    tier: str
    vector: str
    vw: int
    blocking: Blocking
    default_set: str = "vector"
    sets: Mapping[str, str] = field(default_factory=dict)
    with_vnni: Mapping[str, str] = field(default_factory=dict)
    split: Mapping[str, int] = field(default_factory=dict)

    def kernel_set(self, mode: str, vnni: bool) -> KernelSet:
        name = (self.with_vnni.get(mode) if vnni else None) or self.sets.get(mode, self.default_set)
        return KERNEL_SETS[name]


_AVX512_BLOCKING = Blocking(dot_mr=6, dot_nr=4, bc_mr=12, bc_nr=32, fill_modes=None)
TIERS = {t.tier: t for t in (
    TierKernels("generic", "generic", 1, Blocking(dot_mr=4, dot_nr=4, bc_mr=4, bc_nr=8)),
    TierKernels("avx2", "avx2", 8, Blocking(dot_mr=6, dot_nr=2, bc_mr=6, bc_nr=16, wide_mr=3,
                                            fill_modes=("bf16", "int8")),
                split=MappingProxyType({"bf16": 8})),
    TierKernels("avx512", "avx512", 16, _AVX512_BLOCKING, with_vnni=MappingProxyType({"int8": "vnni"})),
    # avx512bf16: the bf16 forward's GEMMs on vdpbf16ps; the rest as avx512.
    TierKernels("avx512bf16", "avx512", 16, _AVX512_BLOCKING, sets=MappingProxyType({"bf16": "bf16dp"}),
                with_vnni=MappingProxyType({"int8": "vnni"})),
    # amx: the GEMMs on tiles; the rest is the avx512 tier's vector code.
    TierKernels("amx", "avx512", 16, _AVX512_BLOCKING, default_set="amx",
                sets=MappingProxyType({"int8": "amx_int8"})),
)}

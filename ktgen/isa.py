"""ISA tiers: what each needs from the CPU, how `auto` picks one, and its compiler flags.

A tier is one set of templates and flags; an extension (VNNI) adds instructions to a tier. The
flags never include -march=native: a cached binary must not depend on which machine compiled
it, only on the target it was rendered for (ktgen.target puts tier, extensions, emulation,
compiler and flags together).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TIERS = ("amx", "avx512bf16", "avx512", "avx2", "generic")


class ISAError(RuntimeError):
    """A tier was asked for that this CPU (or build) cannot run."""


@dataclass(frozen=True)
class Tier:
    name: str
    requires: tuple[str, ...]      # /proc/cpuinfo flags, all needed
    flags: tuple[str, ...]         # compiler flags of the rendered source
    implemented: bool = True


_TIERS = {
    "generic": Tier("generic", (), ()),
    "avx2": Tier("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    "avx512": Tier(
        "avx512",
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
        ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
    ),
    # AVX512_BF16 (Cooper Lake, Sapphire Rapids and later without tile permission, AMD Zen 4/5):
    # the bf16 forward GEMMs on vdpbf16ps, the rest as the avx512 tier.
    "avx512bf16": Tier(
        "avx512bf16",
        ("avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
        ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"),
    ),
    "amx": Tier(
        "amx",
        ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
        ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
         "-mamx-tile", "-mamx-bf16", "-mamx-int8"),
    ),
}

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64


@lru_cache(maxsize=1)
def amx_permission() -> bool:
    """Whether the Linux kernel grants this process AMX tile data (asked once, as the kernels do)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def tier(name: str) -> Tier:
    if name not in _TIERS:
        raise ISAError(f"unknown ISA tier {name!r}; known tiers: {', '.join(TIERS)}")
    return _TIERS[name]


def missing_features(name: str, flags: frozenset[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    return [f for f in tier(name).requires if f not in flags]


# The tiers that run through a software emulation of their instructions (bit for bit what the
# hardware computes), and the variable that turns it on; listed here only.
EMULATION_VARS = {"amx": "KTGEN_EMULATE_AMX", "avx512bf16": "KTGEN_EMULATE_AVX512BF16",
                  "avx512": "KTGEN_EMULATE_AVX512"}


def compile_flags(name: str, emulate: bool = False) -> tuple[str, ...]:
    """A tier's own compiler flags, without extensions (ktgen.target.Target.isa_flags adds those).
    An emulated tier is portable C: no ISA flags, and -O1, which builds it twice as fast and gives
    the same bits (no fast-math, no FP contraction: every -O level keeps IEEE results)."""
    return ("-O1",) if emulate else tier(name).flags


@dataclass(frozen=True)
class Extension:
    """Instructions a tier's templates use when the target has them (the `vnni` of avx512+vnni)."""

    name: str
    cpu_flag: str               # /proc/cpuinfo flag
    flag: str                   # compiler flag
    tiers: tuple[str, ...]      # the tiers whose templates use it


# Extensions by name. AVX512_BF16 is a tier of its own (avx512bf16), not an extension.
EXTENSIONS = {"vnni": Extension("vnni", "avx512_vnni", "-mavx512vnni", ("avx512", "avx512bf16"))}


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def choose(requested: str = "auto", flags: frozenset[str] | None = None,
           emulated: frozenset[str] = frozenset()) -> tuple[str, str]:
    """The tier to run and why. A forced tier the CPU lacks raises ISAError; a forced tier in
    `emulated` (KTGEN_EMULATE_AMX=1, KTGEN_EMULATE_AVX512=1) runs anywhere, in software."""
    flags = cpu_flags() if flags is None else flags
    if requested in emulated:
        return requested, f"requested explicitly, emulated in software ({EMULATION_VARS[requested]}=1)"
    if not is_x86_64() and requested not in ("auto", "generic"):
        raise ISAError(f"ISA tier {requested!r} needs an x86-64 CPU; this is {platform.machine()}")
    if requested != "auto":
        t = tier(requested)
        if not t.implemented:
            raise ISAError(f"ISA tier {requested!r} is not implemented in this version of ktgen")
        missing = missing_features(requested, flags)
        if requested == "amx" and not missing and not amx_permission():
            raise ISAError("ISA tier 'amx': the CPU has AMX but the OS refused tile data "
                           "(arch_prctl ARCH_REQ_XCOMP_PERM); a Linux kernel >= 5.16 is needed")
        if missing:
            raise ISAError(
                f"ISA tier {requested!r} needs CPU features {', '.join(missing)}, "
                f"which this CPU does not report; use isa 'auto' or one of: "
                f"{', '.join(available_tiers(flags))}"
                + (" (or KTGEN_EMULATE_AMX=1 to emulate the tiles)" if requested == "amx" else "")
            )
        return requested, "requested explicitly"
    for name in TIERS:
        t = _TIERS[name]
        if not t.implemented:
            continue
        missing = missing_features(name, flags)
        if name == "amx" and not missing and not amx_permission():
            continue
        if not missing:
            return name, f"best implemented tier whose features ({', '.join(t.requires) or 'none'}) the CPU has"
    return "generic", "no vector tier matches this CPU"


def available_tiers(flags: frozenset[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    return [n for n in TIERS if _TIERS[n].implemented and not missing_features(n, flags)]

"""Every environment variable ktgen reads, in one place, read when asked (tests change them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .isa import EMULATION_VARS

# Variables that setuptools adds to the compile and link lines of a cffi build: part of the
# target (and so of the cache key), and passed to the build as they were when it was chosen.
BUILD_ENV = ("CFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED")


@dataclass(frozen=True)
class Settings:
    cache_dir: Path          # KTGEN_CACHE_DIR, default ~/.cache/ktgen
    isa: str | None          # KTGEN_ISA: forces a tier over the spec's `auto`
    cc: str                  # KTGEN_CC (else CC, else cc): the C compiler command, flags included
    emulate: frozenset[str]  # tiers run through the software emulation (isa.EMULATION_VARS:
                             # KTGEN_EMULATE_AMX=1, KTGEN_EMULATE_AVX512BF16=1, KTGEN_EMULATE_AVX512=1)
    sanitize: tuple[str, ...]  # KTGEN_SANITIZE=address,undefined: build kernels with sanitizers
    build_env: tuple[tuple[str, str], ...] = ()  # BUILD_ENV variables that are set, (name, value)


def settings() -> Settings:
    env = os.environ
    cache = env.get("KTGEN_CACHE_DIR") or str(Path.home() / ".cache" / "ktgen")
    return Settings(
        cache_dir=Path(cache).expanduser(),
        isa=env.get("KTGEN_ISA") or None,
        cc=env.get("KTGEN_CC") or env.get("CC") or "cc",
        emulate=frozenset(tier for tier, var in EMULATION_VARS.items() if env.get(var, "") not in ("", "0")),
        sanitize=tuple(sorted(s.strip() for s in env.get("KTGEN_SANITIZE", "").split(",") if s.strip())),
        build_env=tuple((name, env[name]) for name in BUILD_ENV if name in env),
    )

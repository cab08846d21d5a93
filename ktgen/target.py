"""The target of a build: the machine code a kernel is compiled as, chosen once and passed down.

A Target fixes everything about the binary besides the rendered source: the ISA tier, the
instruction-set extensions used on top of it (VNNI), whether the tier's vector and tile
instructions are emulated in portable C, the C compiler command, the sanitizers, and the flags
the environment adds to a cffi build (CFLAGS, CPPFLAGS, LDFLAGS, LDSHARED, which setuptools
reads). The renderer, the compiler, the cache key and the emitted Makefile all read it; nothing
after `select()` looks at the CPU or the environment again.

Two ways to get one:
- `select(spec, isa)` / `for_this_machine(requested)`: the target that runs here. A named tier
  gets every extension of it this CPU has; `auto` is the best tier this CPU runs.
- `for_another_machine(requested)`: the target exactly as named (`avx512` is AVX-512 without
  VNNI, `avx512+vnni` with it), whatever this CPU has; `ktgen build` emits it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import isa as isa_mod
from .isa import EMULATION_VARS, EXTENSIONS, ISAError
from .settings import Settings, settings

# -Wno-aggressive-loop-optimizations: GCC warns about vector loops over the fixed-size
# rank-R accumulators that it has already proven never run; the noise hides real warnings.
# -ffp-contract=off: a * b + c in plain C is rounded twice on every tier, so scalar code gives
# the same bits whatever the target ISA (the emulated amx tier relies on it); explicit FMA
# intrinsics stay fused.
BASE_FLAGS = ("-O3", "-std=gnu11", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC",
              "-ffp-contract=off", "-Wno-aggressive-loop-optimizations")
LINK_FLAGS = ("-fopenmp",)
SANITIZERS = ("address", "undefined")


class SanitizerError(RuntimeError):
    """KTGEN_SANITIZE names a sanitizer ktgen does not support (raised as a CompilerError)."""


def sanitize_flags(sanitize: tuple[str, ...]) -> tuple[str, ...]:
    """Compile and link flags of a KTGEN_SANITIZE build. An ASan kernel loads only into a process
    started with the ASan runtime preloaded (LD_PRELOAD=$(gcc -print-file-name=libasan.so))."""
    unknown = [s for s in sanitize if s not in SANITIZERS]
    if unknown:
        raise SanitizerError(f"KTGEN_SANITIZE: unknown sanitizer(s) {', '.join(unknown)}; "
                             f"supported: {', '.join(SANITIZERS)}")
    if not sanitize:
        return ()
    # -O1, ASan's usual level: the sanitizers see the same code and it builds several times faster.
    return (f"-fsanitize={','.join(sanitize)}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
            "-g", "-O1")


@dataclass(frozen=True)
class Target:
    """What a kernel is compiled as. Construct it with `select`, `for_this_machine` or
    `for_another_machine`, or directly (Target("avx512", {"vnni"})) for tests and tools."""

    tier: str
    extensions: frozenset[str] = frozenset()   # names in isa.EXTENSIONS, e.g. {"vnni"}
    emulate: bool = False                       # vector (and tile) instructions in portable C
    cc: str = "cc"                              # the C compiler command, every word of it
    sanitize: tuple[str, ...] = ()              # KTGEN_SANITIZE
    build_env: tuple[tuple[str, str], ...] = () # (name, value) of settings.BUILD_ENV variables that are set
    reason: str = field(default="", compare=False)  # why this tier, for messages

    def __post_init__(self):
        if not isinstance(self.tier, str) or self.tier not in isa_mod.TIERS:
            raise ISAError(f"unknown ISA tier {self.tier!r}; known tiers: {', '.join(isa_mod.TIERS)}")
        exts = frozenset(self.extensions)
        for name in sorted(exts):
            if name not in EXTENSIONS:
                raise ISAError(f"unknown ISA extension {name!r}; known: {', '.join(EXTENSIONS)}")
            if self.tier not in EXTENSIONS[name].tiers:
                raise ISAError(f"ISA extension {name!r} applies to the {', '.join(EXTENSIONS[name].tiers)} "
                               f"tier(s), not {self.tier!r}")
        if self.emulate and self.tier not in EMULATION_VARS:
            raise ISAError(f"ISA tier {self.tier!r} has no software emulation; emulated tiers: "
                           f"{', '.join(EMULATION_VARS)}")
        if self.emulate:  # the emulation implements every extension of its tier
            exts |= {name for name, ext in EXTENSIONS.items() if self.tier in ext.tiers}
        object.__setattr__(self, "extensions", exts)
        object.__setattr__(self, "sanitize", tuple(self.sanitize))
        object.__setattr__(self, "build_env", tuple(sorted(tuple(kv) for kv in self.build_env)))

    @property
    def name(self) -> str:
        """The tier and its extensions as `--isa` takes them: avx512+vnni."""
        return "+".join((self.tier, *sorted(self.extensions)))

    @property
    def vnni(self) -> bool:
        return "vnni" in self.extensions

    @property
    def isa_flags(self) -> tuple[str, ...]:
        """The tier's and the extensions' compiler flags (none but -O1 when emulated)."""
        if self.emulate:
            return isa_mod.compile_flags(self.tier, emulate=True)
        return isa_mod.compile_flags(self.tier) + tuple(EXTENSIONS[e].flag for e in sorted(self.extensions))

    @property
    def cflags(self) -> tuple[str, ...]:
        return BASE_FLAGS + self.isa_flags + sanitize_flags(self.sanitize)

    @property
    def ldflags(self) -> tuple[str, ...]:
        return LINK_FLAGS + tuple(f for f in sanitize_flags(self.sanitize) if f.startswith("-fsanitize"))

    def missing_features(self, cpu: frozenset[str] | None = None) -> list[str]:
        """CPU features this target needs that `cpu` (default: this CPU) lacks; none when emulated."""
        if self.emulate:
            return []
        cpu = isa_mod.cpu_flags() if cpu is None else cpu
        missing = isa_mod.missing_features(self.tier, cpu)
        return missing + [EXTENSIONS[e].cpu_flag for e in sorted(self.extensions)
                          if EXTENSIONS[e].cpu_flag not in cpu]

    def check_runs_here(self) -> None:
        """ISAError unless this machine runs the target's code."""
        if self.emulate:
            return
        if self.tier != "generic" and not isa_mod.is_x86_64():
            raise ISAError(f"ISA tier {self.tier!r} needs an x86-64 CPU")
        missing = self.missing_features()
        if missing:
            raise ISAError(f"target {self.name!r} needs CPU features {', '.join(missing)}, which this CPU "
                           f"does not report; tiers that run here: {', '.join(isa_mod.available_tiers())}")
        if self.tier == "amx" and not isa_mod.amx_permission():
            raise ISAError("ISA tier 'amx': the CPU has AMX but the OS refused tile data "
                           "(arch_prctl ARCH_REQ_XCOMP_PERM); a Linux kernel >= 5.16 is needed")


def parse(text: str) -> tuple[str, frozenset[str]]:
    """'avx512+vnni' -> ('avx512', {'vnni'}); 'auto' -> ('auto', {})."""
    if not isinstance(text, str) or not text:
        raise ISAError(f"expected an ISA tier name such as 'auto', 'avx2' or 'avx512+vnni', got {text!r}")
    tier, *exts = text.split("+")
    for name in exts:
        if name not in EXTENSIONS:
            raise ISAError(f"unknown ISA extension {name!r} in {text!r}; known: {', '.join(EXTENSIONS)}")
    if tier == "auto" and exts:
        raise ISAError(f"{text!r}: 'auto' takes no extensions (it uses every one this CPU has)")
    return tier, frozenset(exts)


def _from_settings(cfg: Settings, **kw) -> dict:
    return dict(cc=cfg.cc, sanitize=cfg.sanitize, build_env=cfg.build_env, **kw)


def for_this_machine(requested: str = "auto", cfg: Settings | None = None,
                     cpu: frozenset[str] | None = None) -> Target:
    """The target that runs on this CPU: `requested` (a tier, 'auto', or 'tier+ext'), plus every
    extension of the tier that this CPU has; emulated when the settings emulate that tier."""
    cfg = settings() if cfg is None else cfg
    cpu = isa_mod.cpu_flags() if cpu is None else cpu
    tier_name, named = parse(requested)
    tier, reason = isa_mod.choose(tier_name, cpu, emulated=cfg.emulate)
    emulate = tier in cfg.emulate
    if emulate:
        return Target(tier, named, True, reason=reason, **_from_settings(cfg))
    missing = [EXTENSIONS[e].cpu_flag for e in sorted(named) if EXTENSIONS[e].cpu_flag not in cpu]
    if missing:
        raise ISAError(f"{requested!r} needs CPU features {', '.join(missing)}, which this CPU does not report")
    host = {n for n, e in EXTENSIONS.items() if tier in e.tiers and e.cpu_flag in cpu}
    if host - named:
        reason += f"; with {', '.join(sorted(host - named))}, which this CPU has"
    return Target(tier, named | host, False, reason=reason, **_from_settings(cfg))


def for_another_machine(requested: str, cfg: Settings | None = None) -> Target:
    """The target exactly as named, whatever this CPU has (never emulated, no sanitizers): what
    `ktgen build --isa` emits. 'auto' means this machine's best native target."""
    cfg = settings() if cfg is None else cfg
    tier, named = parse(requested)
    if tier == "auto":
        return for_this_machine("auto", dataclasses.replace(cfg, emulate=frozenset(), sanitize=()))
    t = isa_mod.tier(tier)
    if not t.implemented:
        raise ISAError(f"ISA tier {tier!r} is not implemented in this version of ktgen")
    return Target(tier, named, False, cc=cfg.cc, build_env=cfg.build_env, reason="requested explicitly")


def select(spec=None, isa: "str | Target | None" = None) -> Target:
    """The one target of a compile: `isa` (a Target is taken as it is), else KTGEN_ISA, else the
    spec's isa, resolved for this machine. Errors name where the request came from."""
    if isinstance(isa, Target):
        try:
            isa.check_runs_here()
        except ISAError as exc:
            raise ISAError(f"isa argument {isa.name!r}: {exc}") from exc
        return isa
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa: expected a tier name (str) or a ktgen.Target, got {type(isa).__name__}")
    cfg = settings()
    requested = isa or cfg.isa or (spec.isa if spec is not None else "auto")
    try:
        return for_this_machine(requested, cfg)
    except ISAError as exc:
        source = ("isa argument" if isa else "KTGEN_ISA" if cfg.isa
                  else f"spec {spec.name}'s isa" if spec is not None else "isa")
        raise ISAError(f"{source} {requested!r}: {exc}") from exc

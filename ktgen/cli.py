"""The `ktgen` command line (contract §5): info, build, check, bench, cache list | clear.

Every command is a function of parsed arguments that prints plain text and returns the
exit code. Expected failures (a bad spec, a tier this CPU lacks, a missing compiler, an
unusable cache, a failed make) print one line to stderr and return 2; `check` returns 1
when a quantity is outside its §7 limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from . import isa as isa_mod
from ._version import __version__
from .compiler import CacheError, CompilerError
from .runtime import usable_cores

# Memory rule of check and bench: the whole layer runs when its bf16 base weights fit the
# budget, else a subset of experts at the real hidden and intermediate sizes.
BUDGET_FRACTION = 0.25           # of MemTotal
BUDGET_CAP = 4 << 30             # bytes: never more than this, whatever MemTotal says
DEFAULT_SUBSET = 16              # experts when the layer does not fit

# The PyTorch baseline may be orders of magnitude slower (bf16 matmuls without native bf16
# instructions): it gets fewer timed runs when its warm-up shows they would exceed this.
TORCH_BUDGET_S = 15.0

WEIGHT_STD = 0.02                # base weights and LoRA A/B, typical of real checkpoints
ACTIVATION_STD = 1.0

# §7 limits: (out, grads.input / grads.routing_weights / LoRA grads) per quant mode.
LIMITS = {"bf16": (1e-2, 2e-2)}
QUANT_LIMITS = (3e-2, 4e-2)

LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")

bf16 = np.dtype(ml_dtypes.bfloat16)


class BuildError(RuntimeError):
    """`make` is missing or failed on emitted sources."""


# --------------------------------------------------------------------------- helpers

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_budget() -> int:
    total = _mem_total()
    return BUDGET_CAP if total is None else min(int(total * BUDGET_FRACTION), BUDGET_CAP)


def _layer_bytes(spec, experts: int | None = None) -> int:
    """bf16 bytes of the base weights (gate, up, down) of `experts` experts."""
    e = spec.expert_num if experts is None else experts
    return 3 * e * spec.hidden_size * spec.intermediate_size * 2



def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _load_spec(name_or_path: str):
    from .spec import load_spec
    return load_spec(name_or_path)


def _requested_isa(args, spec) -> str:
    from .settings import settings
    return getattr(args, "isa", None) or settings().isa or spec.isa


@contextlib.contextmanager
def _forced_isa(tier: str):
    """Make ktgen.compile (called by MoE) use `tier`, whatever KTGEN_ISA says."""
    old = os.environ.get("KTGEN_ISA")
    os.environ["KTGEN_ISA"] = tier
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KTGEN_ISA", None)
        else:
            os.environ["KTGEN_ISA"] = old


def _out(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _describe_spec(spec) -> str:
    lora = spec.lora
    lora_txt = (f"LoRA rank {lora.rank} ({lora.dtype}, scale {lora.scale:g})" if lora else "no LoRA")
    quant = spec.quant.mode + (f"/g{spec.quant.group_size}" if spec.quant.group_size else "")
    return (f"E={spec.expert_num} k={spec.num_experts_per_tok} H={spec.hidden_size} "
            f"I={spec.intermediate_size}, {quant}, {lora_txt}, tp_count {spec.tp_count}")


# --------------------------------------------------------------------------- subset plan

@dataclass
class Plan:
    spec: object          # the spec that runs (the full one, or a subset of its experts)
    full: object          # the spec as given
    subset: bool
    budget: int
    note: str             # one line, printed and stored in --json


def _plan(spec, experts: int | None) -> Plan:
    budget = _memory_budget()
    full_bytes = _layer_bytes(spec)
    E = spec.expert_num
    if experts is not None:
        n = min(experts, E)
        why = f"--experts {experts}"
    elif full_bytes <= budget:
        n = E
        why = ""
    else:
        n = min(DEFAULT_SUBSET, E)
        while n > 1 and _layer_bytes(spec, n) > budget:
            n //= 2
        why = (f"the full layer's bf16 weights ({_fmt_bytes(full_bytes)}) exceed the memory budget "
               f"({_fmt_bytes(budget)}: {BUDGET_FRACTION:.0%} of MemTotal, at most {_fmt_bytes(BUDGET_CAP)})")
    if n >= E:
        note = (f"whole layer: {E} experts, {_fmt_bytes(full_bytes)} of bf16 weights "
                f"(budget {_fmt_bytes(budget)})")
        return Plan(spec, spec, False, budget, note)
    k = min(spec.num_experts_per_tok, n)
    derived = spec.replace(expert_num=n, num_experts_per_tok=k, name=spec.name)
    note = (f"SUBSET: {n} of {E} experts (top-{k} routing) at the real H={spec.hidden_size}, "
            f"I={spec.intermediate_size}, {_fmt_bytes(_layer_bytes(spec, n))} of bf16 weights, "
            f"because {why}; --experts N changes this")
    return Plan(derived, spec, True, budget, note)


# --------------------------------------------------------------------------- random data

def _random_bf16(shape, count: int, std: float, seed: int, tag: int, threads: int) -> np.ndarray:
    """bf16 [count, *shape] of N(0, std^2), one generator per (seed, tag, index): the values
    do not depend on the thread count, and no float32 copy of the whole array is made."""
    out = np.empty((count, *shape), bf16)

    def fill(i: int) -> None:
        a = np.random.default_rng([seed, tag, i]).standard_normal(shape, np.float32)
        a *= std
        out[i] = a.astype(bf16)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(fill, range(count)))
    return out


def _random_weights(spec, seed: int, std: float = WEIGHT_STD):
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    n = usable_cores()
    return (_random_bf16((I, H), E, std, seed, 1, n),
            _random_bf16((I, H), E, std, seed, 2, n),
            _random_bf16((H, I), E, std, seed, 3, n))


def _random_inputs(spec, T: int, rng: np.random.Generator):
    """x bf16 [T,H] of std 1, expert_ids int32 [T,k] (top-k distinct experts per token),
    routing_weights float32 [T,k] (positive, summing to 1 per token), grad_out bf16 [T,H]."""
    E, H, k = spec.expert_num, spec.hidden_size, spec.num_experts_per_tok
    x = (rng.standard_normal((T, H), np.float32) * ACTIVATION_STD).astype(bf16)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    raw = rng.random((T, k)) + 0.05
    rw = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    grad_out = rng.standard_normal((T, H), np.float32).astype(bf16)
    return x, np.ascontiguousarray(ids), rw, grad_out


def _random_lora(spec, rng):
    from .runtime import LoRAWeights
    return LoRAWeights.random(spec, rng, WEIGHT_STD) if spec.lora is not None else None


# --------------------------------------------------------------------------- info

RELEVANT_FLAG = re.compile(r"^(avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*)$")


def cmd_info(args) -> int:
    from .compiler import BASE_FLAGS, build_flags, cache_entries, compiler_identity
    from .render import BLOCKING
    from .settings import settings

    cfg = settings()
    flags = isa_mod.cpu_flags()
    relevant = sorted(f for f in flags if RELEVANT_FLAG.match(f))
    _out(f"ktgen {__version__} (Python {platform.python_version()}, {platform.machine()})")
    _out(f"CPU:        {_cpu_model()}")
    _out(f"CPU flags:  {' '.join(relevant) if relevant else '(none of avx2, fma, f16c, avx512*, amx*)'}")

    auto_tier, auto_why = isa_mod.choose("auto")
    _out(f"auto tier:  {auto_tier}: {auto_why}")
    if "amx_tile" in flags:
        granted = "granted" if isa_mod.amx_permission() else "REFUSED (Linux >= 5.16 needed)"
        _out(f"AMX:        tile data {granted} by the OS (arch_prctl ARCH_REQ_XCOMP_PERM)")
    if cfg.emulate:
        _out(f"emulated:   {', '.join(sorted(cfg.emulate))} (software emulation for tests: "
             f"{', '.join(isa_mod.EMULATION_VARS[t] + '=1' for t in sorted(cfg.emulate))})")
    if cfg.isa:
        try:
            forced, _ = isa_mod.choose(cfg.isa, emulated=cfg.emulate)
            _out(f"KTGEN_ISA:  {cfg.isa}: every spec runs the {forced} tier")
        except isa_mod.ISAError as exc:
            _out(f"KTGEN_ISA:  {cfg.isa}: UNUSABLE here: {exc}")
    else:
        _out("KTGEN_ISA:  not set (specs with isa 'auto' run the auto tier)")

    available = isa_mod.available_tiers()
    _out(f"tiers:      {', '.join(available)} run here")
    for name in isa_mod.TIERS:
        if name in available:
            continue
        t = isa_mod.tier(name)
        if not t.implemented:
            _out(f"            {name}: not implemented in this version")
        else:
            missing = isa_mod.missing_features(name)
            emulation = f"; {isa_mod.EMULATION_VARS[name]}=1 runs it in software" if name in isa_mod.EMULATION_VARS else ""
            _out(f"            {name}: not here (CPU lacks {', '.join(missing) or 'OS permission'}); "
                 f"`ktgen build --isa {name} --no-make` emits it for another machine{emulation}")

    try:
        ident = compiler_identity(cfg.cc)
    except CompilerError as exc:
        ident = f"NOT USABLE: {exc}"
    _out(f"compiler:   {ident}" + ("" if os.environ.get("KTGEN_CC") else "  (KTGEN_CC not set)"))
    sanitize = getattr(cfg, "sanitize", ())
    if sanitize:
        _out(f"sanitize:   KTGEN_SANITIZE={','.join(sanitize)}: JIT kernels are built with sanitizers "
             f"(emitted Makefiles are not)")
    _out(f"flags:      base {' '.join(BASE_FLAGS)}")
    for name in isa_mod.TIERS:
        if name in BLOCKING:
            extra = " ".join(build_flags(name)[len(BASE_FLAGS):]) or "(none)"
            where = "" if name in available else "   [emit only here]"
            _out(f"            {name:<8} + {extra}{where}")

    entries = cache_entries()
    size = sum(e.get("bytes", 0) for e in entries)
    src = "KTGEN_CACHE_DIR" if os.environ.get("KTGEN_CACHE_DIR") else "default; KTGEN_CACHE_DIR not set"
    _out(f"cache dir:  {cfg.cache_dir} ({src}); {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
         f"{_fmt_bytes(size)}")
    cores = usable_cores()
    _out(f"cores:      {cores} usable (of {os.cpu_count()} online); threads per partition default "
         f"to usable / tp_count")
    from . import numa
    _out("NUMA:       " + numa.describe().replace("\n", "\n            "))
    total = _mem_total()
    _out(f"memory:     {_fmt_bytes(total) if total else 'unknown'} total; check/bench budget "
         f"{_fmt_bytes(_memory_budget())} of bf16 base weights")
    return 0


# --------------------------------------------------------------------------- build

README = """\
ktgen kernel for spec {spec_name} ({tier} tier), emitted by ktgen {version}
{emit_note}
Files
  {name}.h        the C API; every function is documented there
  {name}.c        the kernel (one translation unit, every shape a compile-time constant)
  Makefile        builds lib{name}.so and lib{name}.a:   make -C {dir}   (make clean removes them)
  spec.yaml       the spec these sources were rendered from
  README.txt      this file

Shapes (fixed by the spec)
  E={E} experts, k={k} slots per token, H={H} hidden, I={I} intermediate ({tp} TP partition(s)),
  LoRA: {lora}, at most {max_len} tokens per call, {depth} saved-forward slot(s).
  bf16 arrays are uint16_t bit patterns. gate/up: [E][I][H], down: [E][H][I].

Build
  make -C {dir}                      # needs only a C compiler with OpenMP (cc = GCC or Clang)
  make -C {dir} CC=clang CFLAGS=-g   # extra flags are added to the tier's own

Use
  #include "{name}.h"
  {p} *ctx;
  if ({p}_create(&ctx, /*partition*/ 0, /*threads*/ 8)) ...       // one context per TP partition
  {p}_load_weights(ctx, gate, up, down);                         // copied; free yours afterwards
{lora_line}  {p}_forward(ctx, T, x, expert_ids, routing_weights, out, /*slot*/ 0);  // out: float32 [T][H]
  {p}_backward(ctx, 0, grad_out, grad_input, grad_routing, {lora_grads});
  {p}_destroy(ctx);
  Every function returns 0 or an error code; {p}_error_string(code) describes it. None aborts.
  With several partitions, sum their float32 outputs (and the documented partial gradients),
  then round once to bf16 ({p}_to_bf16).

Link
  cc app.c -I{dir} -L{dir} -l{name} -fopenmp -lm          (shared: set LD_LIBRARY_PATH={dir})
  cc app.c -I{dir} {dir}/lib{name}.a -fopenmp -lm         (static)
"""


def _emit(spec, tier: str, out_dir: Path, emit_only_missing: list[str]) -> list[Path]:
    import jinja2

    from .compiler import LINK_FLAGS, build_flags
    from .render import TEMPLATES, render

    vnni = isa_mod.has_vnni(tier)
    rendered = render(spec, tier, vnni=vnni)
    name = spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    makefile = env.get_template("Makefile.j2").render(
        spec_name=spec.name, name=name, tier=tier, version=__version__,
        cflags=" ".join(build_flags(tier)), ldflags=" ".join(LINK_FLAGS),
        emit_only=bool(emit_only_missing), missing=", ".join(emit_only_missing))
    lora = spec.lora
    p = rendered.prefix
    readme = README.format(
        spec_name=spec.name, name=name, tier=tier, version=__version__, dir=out_dir, p=p,
        emit_note=(f"\nEMIT ONLY: this machine lacks {', '.join(emit_only_missing)}; run the library only "
                   f"on a CPU with the {tier} features.\n" if emit_only_missing else ""),
        E=spec.expert_num, k=spec.num_experts_per_tok, H=spec.hidden_size, I=spec.intermediate_size,
        tp=spec.tp_count, max_len=spec.max_len, depth=spec.max_cache_depth,
        lora=(f"rank {lora.rank}, {lora.dtype}, scale {lora.scale:g}" if lora else "none"),
        lora_line=(f"  {p}_set_lora(ctx, gate_a, gate_b, up_a, up_b, down_a, down_b); "
                   f"// not copied: in-place updates are seen\n" if lora else ""),
        lora_grads=("d_gate_a, d_gate_b, d_up_a, d_up_b, d_down_a, d_down_b" if lora
                    else "NULL, NULL, NULL, NULL, NULL, NULL"),
    )
    files = {
        rendered.header_name: rendered.header,
        f"{name}.c": rendered.source,
        "Makefile": makefile,
        "README.txt": readme,
        "spec.yaml": spec.to_yaml(),
    }
    written = []
    for fname, text in files.items():
        path = out_dir / fname
        path.write_text(text)
        written.append(path)
    return written


def _run_make(out_dir: Path, cc: str) -> str:
    make = shutil.which("make")
    if make is None:
        raise BuildError(f"`make` is not on PATH; the sources are in {out_dir}: install make "
                         f"(apt-get install make) or compile {out_dir}/*.c with the flags in its Makefile")
    proc = subprocess.run([make, "-C", str(out_dir), f"CC={cc}"], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise BuildError(f"make -C {out_dir} failed (exit {proc.returncode}); its last lines are above")
    return proc.stdout


def cmd_build(args) -> int:
    from .compiler import compiler_identity
    from .render import BLOCKING
    from .settings import settings

    spec = _load_spec(args.spec)
    requested = _requested_isa(args, spec)
    missing: list[str] = []
    if args.no_make and requested != "auto":
        # Emit-only: another machine will run it, so only the tier's existence matters here.
        t = isa_mod.tier(requested)
        if not t.implemented or requested not in BLOCKING:
            raise isa_mod.ISAError(f"ISA tier {requested!r} is not implemented in this version of ktgen")
        tier = requested
        missing = isa_mod.missing_features(tier)
        reason = "requested explicitly" + (f" (emit only: this CPU lacks {', '.join(missing)})" if missing else "")
    else:
        tier, reason = isa_mod.choose(requested)
    out_dir = Path(args.output) if args.output else Path("build") / spec.name
    cfg = settings()
    if not args.no_make:
        compiler_identity(cfg.cc)  # a clear CompilerError before anything is written
    written = _emit(spec, tier, out_dir, missing)
    _out(f"ktgen build: spec {spec.name} ({_describe_spec(spec)})",
         f"  tier {tier}: {reason}",
         f"  wrote {', '.join(p.name for p in written)} to {out_dir}")
    if args.no_make:
        _out(f"  not built (--no-make): run `make -C {out_dir}` on the target machine")
        return 0
    started = time.perf_counter()
    log = _run_make(out_dir, cfg.cc)
    for line in log.splitlines():
        if line.strip() and not line.startswith("make"):
            _out(f"    {line.strip()}")
    libs = [out_dir / f"lib{spec.name}.so", out_dir / f"lib{spec.name}.a"]
    for lib in libs:
        if not lib.is_file():
            raise BuildError(f"make -C {out_dir} succeeded but did not produce {lib}")
    _out(f"  built {', '.join(f'{lib} ({_fmt_bytes(lib.stat().st_size)})' for lib in libs)} "
         f"in {time.perf_counter() - started:.1f} s",
         f"  usage: {out_dir / 'README.txt'}")
    return 0


# --------------------------------------------------------------------------- check

def _limits(spec) -> tuple[float, float]:
    return LIMITS.get(spec.quant.mode, QUANT_LIMITS)


def _make_moe(spec, seed: int, rng):
    """An MoE of random bf16 weights; the caller's copies of the weights are dropped once the
    kernel has its own (it copies them at load)."""
    from .runtime import MoE
    gate, up, down = _random_weights(spec, seed)
    lora = _random_lora(spec, rng)
    started = time.perf_counter()
    moe = MoE(spec, gate, up, down, lora)
    return moe, lora, time.perf_counter() - started


def _kernel_line(moe, seconds: float, reason: str) -> str:
    k = moe.kernel
    how = f"compiled in {seconds:.1f} s" if k.compiled else "from the cache"
    return f"  kernel: {k.isa} tier ({reason}), {how}; {moe.threads} thread(s) per partition"


def _prepare(command: str, args):
    """The spec (a subset of experts where the layer does not fit), T, and the tier, announced."""
    spec = _load_spec(args.spec)
    if getattr(args, "mode", None):
        spec = spec.replace(quant={"mode": args.mode})  # that mode's default group size
    if getattr(args, "tp", None):
        spec = spec.replace(tp_count=args.tp)
    from .settings import settings
    tier, reason = isa_mod.choose(_requested_isa(args, spec), emulated=settings().emulate)
    plan = _plan(spec, args.experts)
    spec = plan.spec
    T = min(args.qlen, spec.max_len)
    _out(f"ktgen {command}: spec {spec.name} ({_describe_spec(plan.full)})", f"  {plan.note}")
    if T != args.qlen:
        _out(f"  --qlen {args.qlen} capped at the spec's max_len {spec.max_len}")
    return spec, plan, T, tier, reason


def cmd_check(args) -> int:
    from . import reference

    spec, plan, T, tier, reason = _prepare("check", args)
    _out(f"  T={T} tokens, seed {args.seed}: weights and LoRA std {WEIGHT_STD}, activations std "
         f"{ACTIVATION_STD}, random top-{spec.num_experts_per_tok} routing")
    rng = np.random.default_rng(args.seed)
    with _forced_isa(tier):
        moe, lora, load_s = _make_moe(spec, args.seed, rng)
    _out(_kernel_line(moe, load_s, reason))
    x, ids, rw, grad_out = _random_inputs(spec, T, rng)

    started = time.perf_counter()
    out, saved = moe.forward_train(x, ids, rw)
    grads = moe.backward(saved, grad_out)
    kernel_s = time.perf_counter() - started

    started = time.perf_counter()
    scale = spec.lora.scale if spec.lora else 1.0
    W = [moe.dequantized(n) for n in ("gate", "up", "down")]
    ref_out = reference.forward(x, ids, rw, *W, lora=lora, scale=scale)
    ref = reference.backward(x, ids, rw, *W, grad_out, lora=lora, scale=scale)
    del W
    ref_s = time.perf_counter() - started
    _out(f"  forward_train + backward {kernel_s * 1e3:.1f} ms; float64 reference {ref_s:.1f} s")

    out_lim, grad_lim = _limits(spec)
    rows = [("out", out, ref_out, out_lim),
            ("grads.input", grads.input, ref["input"], grad_lim),
            ("grads.routing_weights", grads.routing_weights, ref["routing_weights"], grad_lim)]
    if spec.lora is not None:
        rows += [(f"grads.{n}", getattr(grads, n), ref[n], grad_lim) for n in LORA_NAMES]
    _out("", f"  {'quantity':<24}{'relL2':>11}{'limit':>10}  ok")
    failed = []
    for name, actual, expected, limit in rows:
        err = reference.rel_l2(actual, expected)
        ok = bool(err <= limit)  # NaN fails
        if not ok:
            failed.append(name)
        _out(f"  {name:<24}{err:>11.3e}{limit:>10.1e}  {'ok' if ok else 'FAIL'}")
    _out("")
    subset = f" (on {spec.expert_num} of {plan.full.expert_num} experts)" if plan.subset else ""
    if failed:
        _out(f"FAIL: {', '.join(failed)} outside the §7 limits for quant mode {spec.quant.mode}{subset}")
        return 1
    _out(f"PASS: all {len(rows)} quantities within the §7 limits for quant mode {spec.quant.mode}{subset}")
    return 0


# --------------------------------------------------------------------------- bench

def _median_ms(fn, repeat: int, warmup: int = 1, budget_s: float | None = None) -> tuple[float, list[float]]:
    """Median wall time in ms of `repeat` calls after `warmup` calls, and every timed call.

    With `budget_s`, a slow fn gets fewer timed calls: as many as fit in budget_s judging by
    the warm-up (at least one), and none beyond the warm-up when the warm-up alone took longer
    than budget_s (its time is then the only sample)."""
    warm = []
    for _ in range(warmup):
        started = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - started)
    if budget_s is not None and warm:
        if warm[-1] > budget_s:
            return warm[-1] * 1e3, [warm[-1] * 1e3]
        repeat = max(1, min(repeat, int(budget_s / max(warm[-1], 1e-9))))
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), times


def _numpy_roof(repeat: int) -> dict:
    """The fp32 roof where PyTorch is missing: a NumPy 2048^3 matmul."""
    n = 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    ms, _ = _median_ms(lambda: a @ b, max(3, repeat))
    return {"what": f"numpy fp32 matmul {n}x{n}x{n}", "ms": ms, "gflops": 2 * n ** 3 / ms / 1e6}


def cmd_bench(args) -> int:
    spec, plan, T, tier, reason = _prepare("bench", args)
    R = args.repeat
    k, H, I = spec.num_experts_per_tok, spec.hidden_size, spec.intermediate_size
    rng = np.random.default_rng(args.seed)
    from .runtime import MoE
    gate, up, down = _random_weights(spec, args.seed)
    lora = _random_lora(spec, rng)
    started = time.perf_counter()
    with _forced_isa(tier):
        moe = MoE(spec, gate, up, down, lora)
    _out(_kernel_line(moe, time.perf_counter() - started, reason))
    x, ids, rw, grad_out = _random_inputs(spec, T, rng)

    gflop = 2 * 3 * T * k * H * I / 1e9     # base GEMMs of one forward; backward the same again
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy = " (busy machine: timings are noisy)" if load > 0.5 * usable_cores() + 0.5 else ""
    _out(f"  T={T} tokens, top-{k} routing; median of {R} run(s) after 1 warm-up; "
         f"load average {load:.1f} on {usable_cores()} cores{busy}",
         f"  GFLOP/s count the base GEMMs only, LoRA excluded: forward 2*3*T*k*H*I = {gflop:.2f} GFLOP, "
         f"backward the same again (the transposed products)")

    fwd_ms, fwd_all = _median_ms(lambda: moe.forward(x, ids, rw), R)
    parts = {"forward_train": [], "backward": []}

    def train():
        t0 = time.perf_counter()
        _, saved = moe.forward_train(x, ids, rw)
        t1 = time.perf_counter()
        moe.backward(saved, grad_out)
        t2 = time.perf_counter()
        parts["forward_train"].append((t1 - t0) * 1e3)
        parts["backward"].append((t2 - t1) * 1e3)

    train_ms, train_all = _median_ms(train, R)
    # the forward reads every weight of each expert that has a token once
    active = len(np.unique(ids[ids >= 0]))
    weight_bytes = moe.memory()["base_weights"]
    streamed_gbs = weight_bytes * active / spec.expert_num / (fwd_ms * 1e-3) / 1e9
    ft_ms = statistics.median(parts["forward_train"][1:])
    bw_ms = statistics.median(parts["backward"][1:])

    def gf(flop, ms):
        return flop / ms * 1e3 if ms > 0 else float("nan")

    res = {
        "base_weights_bytes": weight_bytes,
        "active_experts": active,
        "forward_weight_stream_gbs": streamed_gbs,
        "spec": plan.full.name, "expert_num": spec.expert_num, "full_expert_num": plan.full.expert_num,
        "subset": plan.subset, "memory_note": plan.note, "tokens": T, "k": k, "hidden_size": H,
        "intermediate_size": I, "lora_rank": spec.lora.rank if spec.lora else 0,
        "quant": spec.quant.mode, "tier": moe.kernel.isa, "threads": moe.threads, "repeat": R,
        "load_average": load, "cpu": _cpu_model(),
        "forward_gflop": gflop, "backward_gflop": gflop, "flops_note": "base GEMMs only, LoRA excluded",
        "ktgen": {
            "forward_ms": fwd_ms, "forward_gflops": gf(gflop, fwd_ms), "forward_runs_ms": fwd_all,
            "train_ms": train_ms, "train_gflops": gf(2 * gflop, train_ms), "train_runs_ms": train_all,
            "forward_train_ms": ft_ms, "backward_ms": bw_ms, "backward_gflops": gf(gflop, bw_ms),
        },
    }
    kt = res["ktgen"]

    from . import baselines

    if args.no_torch or not baselines.torch_available():
        _out("  (PyTorch baselines skipped: --no-torch)" if args.no_torch else
             "  (PyTorch is not installed: no baselines; pip install torch to compare)")
        base = {"roof_fp32": None, "bandwidth": baselines.read_bandwidth(moe.threads, repeat=max(3, R))}
    else:
        _out("  running the PyTorch baselines (eager per-expert loop and torch._grouped_mm, bf16 and fp32) ...")
        base = baselines.run_all(spec, x, ids, rw, grad_out, gate, up, down, lora, repeat=R,
                                 threads=moe.threads, budget_s=args.torch_budget)
    roof = base["roof_fp32"] or _numpy_roof(R)
    res["baselines"] = base
    res["fp32_gemm_roof"] = roof
    kt["forward_vs_roof"] = kt["forward_gflops"] / roof["gflops"]
    kt["train_vs_roof"] = kt["train_gflops"] / roof["gflops"]
    bw = (base.get("bandwidth") or {}).get("gbs")
    res["read_bandwidth_gbs"] = bw
    kt["forward_stream_vs_bandwidth"] = streamed_gbs / bw if bw else None
    for which, ms in (("best_forward", fwd_ms), ("best_train", train_ms)):
        if base.get(which):
            kt[which.replace("best", "speedup_vs_best")] = base[which]["ms"] / ms

    W = 40

    def row(label, ms, gflops, tail=""):
        _out(f"  {label:<{W}}{ms:>10.1f}{gflops:>10.1f}{tail}")

    _out("", f"  {'':<{W}}{'ms':>10}{'GFLOP/s':>10}   vs the fp32 roof, the best PyTorch path")
    speed = {k: f", {kt[k]:.2f}x the best PyTorch" for k in ("speedup_vs_best_forward", "speedup_vs_best_train")
             if kt.get(k)}
    row("ktgen forward (inference)", fwd_ms, kt["forward_gflops"],
        f"   {kt['forward_vs_roof']:.0%} of roof{speed.get('speedup_vs_best_forward', '')}")
    row("ktgen forward_train + backward", train_ms, kt["train_gflops"],
        f"   {kt['train_vs_roof']:.0%} of roof{speed.get('speedup_vs_best_train', '')}")
    row("  of which forward_train", ft_ms, gf(gflop, ft_ms))
    row("  of which backward", bw_ms, kt["backward_gflops"], f"   {kt['backward_gflops'] / roof['gflops']:.0%} of roof")
    row(f"{roof['what']} (the roof)", roof["ms"], roof["gflops"])
    stream = f" = {kt['forward_stream_vs_bandwidth']:.0%} of the read bandwidth ({bw:.1f} GB/s)" if bw else ""
    _out(f"  forward streams the weights of {active} of {spec.expert_num} experts "
         f"({_fmt_bytes(weight_bytes * active // spec.expert_num)}) at {streamed_gbs:.1f} GB/s{stream}")
    if base.get("measurements"):
        _out("")
        for line in baselines.format_table(base):
            _out(line)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        _out(f"  figures written to {path}")
    return 0


# --------------------------------------------------------------------------- cache

def cmd_cache(args) -> int:
    from .compiler import cache_entries, clear_cache
    from .settings import settings

    root = settings().cache_dir
    if args.action == "clear":
        n = clear_cache()
        _out(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {root}")
        return 0
    entries = cache_entries()
    if not entries:
        _out(f"cache {root}: empty")
        return 0
    total = sum(e.get("bytes", 0) for e in entries)
    _out(f"cache {root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {_fmt_bytes(total)}")
    _out(f"  {'spec':<20}{'tier':<9}{'size':>12}  {'created':<20} path")
    for e in entries:
        created = "INCOMPLETE" if e.get("incomplete") else e.get("created", "?")
        _out(f"  {e.get('spec', '?'):<20}{e.get('tier', '?'):<9}{_fmt_bytes(e.get('bytes', 0)):>12}  "
             f"{created:<20} {e['path']}")
    return 0


# --------------------------------------------------------------------------- main

def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive = _int_at_least(1, "a positive integer")
_nonneg = _int_at_least(0, "an integer >= 0")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ktgen", description="Kernel compiler for the MoE expert layer of LoRA fine-tuning on CPUs.",
        epilog="SPEC is a YAML path or a bundled spec name. Environment: KTGEN_CACHE_DIR, KTGEN_ISA, "
               "KTGEN_CC, KTGEN_EMULATE_AMX.")
    p.add_argument("--version", action="version", version=f"ktgen {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="CPU features, chosen ISA tier and why, compiler, cache dir")
    s.set_defaults(func=cmd_info)

    isa_help = "ISA tier (auto, avx512, avx2, generic); default: KTGEN_ISA, else the spec's isa"
    s = sub.add_parser("build", help="emit the C sources, header, Makefile and build the library")
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("-o", "--output", metavar="DIR", help="output directory (default build/<spec name>)")
    s.add_argument("--isa", help=isa_help)
    s.add_argument("--no-make", action="store_true",
                   help="emit only, do not run make (allows a tier this CPU lacks, for another machine)")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("check", help="random weights; compare with the float64 reference (§7); exit 1 on failure")
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("--qlen", type=_nonneg, default=128, help="tokens (default 128, capped at max_len)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--isa", help=isa_help)
    s.add_argument("--experts", type=_positive, metavar="N",
                   help="check N experts at the real shapes (default: all when they fit in memory, else 16)")
    s.add_argument("--mode", choices=("bf16", "int8", "awq", "k2"),
                   help="override the spec's quant.mode (with that mode's default group size)")
    s.add_argument("--tp", type=_positive, metavar="N", help="override the spec's tp_count")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("bench", help="forward / backward time and GFLOP/s, against PyTorch eager when installed")
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("--qlen", type=_nonneg, default=512, help="tokens (default 512, capped at max_len)")
    s.add_argument("--repeat", type=_positive, default=5, help="timed runs after a warm-up (default 5)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--isa", help=isa_help)
    s.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    s.add_argument("--experts", type=_positive, metavar="N",
                   help="bench N experts at the real shapes (default: all when they fit in memory, else 16)")
    s.add_argument("--mode", choices=("bf16", "int8", "awq", "k2"),
                   help="override the spec's quant.mode (with that mode's default group size)")
    s.add_argument("--tp", type=_positive, metavar="N", help="override the spec's tp_count")
    s.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    s.add_argument("--torch-budget", type=float, default=TORCH_BUDGET_S, metavar="S",
                   help=f"seconds each PyTorch baseline may take before its repeats are cut "
                        f"(default {TORCH_BUDGET_S:g})")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("cache", help="list or clear the kernel cache (KTGEN_CACHE_DIR)")
    s.add_argument("action", choices=("list", "clear"))
    s.set_defaults(func=cmd_cache)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .runtime import CacheFullError, KernelError
    from .spec import SpecError
    return (SpecError, isa_mod.ISAError, CompilerError, CacheError, BuildError, KernelError,
            CacheFullError, NotImplementedError, OSError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except _expected_errors() as exc:
        if isinstance(exc, MemoryError):
            msg = "out of memory; try a smaller --experts N or --qlen N"
        else:
            msg = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"ktgen {args.command}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("ktgen: interrupted", file=sys.stderr)
        return 130

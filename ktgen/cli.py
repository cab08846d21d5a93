"""The `ktgen` command line (docs/design.md, "Command line"): info, build, check, bench, cache.

Argument parsing and printing only: the target comes from ktgen.target, emission from
ktgen.emit, the layer a check or bench runs from ktgen.workload, the timings from ktgen.bench.
Every command is a function of parsed arguments that prints plain text and returns the exit
code. Expected failures (a bad spec, a tier this CPU lacks, a missing compiler, an unusable
cache, a failed make) print one line to stderr and return 2; `check` returns 1 when a quantity
is outside its accuracy limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import isa as isa_mod
from . import target as target_mod
from ._version import __version__
from .compiler import CacheError, CompilerError
from .emit import BuildError
from .files import write_atomic
from .formats import MODES
from .runtime import usable_cores
from .workload import ACTIVATION_STD, WEIGHT_STD, fmt_bytes


def _out(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _load_spec(name_or_path: str):
    from .spec import load_spec
    return load_spec(name_or_path)


def _describe_spec(spec) -> str:
    lora = spec.lora
    lora_txt = (f"LoRA rank {lora.rank} ({lora.dtype}, scale {lora.scale:g})" if lora else "no LoRA")
    quant = spec.quant.mode + (f"/g{spec.quant.group_size}" if spec.quant.group_size else "")
    return (f"E={spec.expert_num} k={spec.num_experts_per_tok} H={spec.hidden_size} "
            f"I={spec.intermediate_size}, {quant}, {lora_txt}, tp_count {spec.tp_count}")


def _describe_target(target) -> str:
    return target.name + (" (emulated)" if target.emulate else "")


# --------------------------------------------------------------------------- info

RELEVANT_FLAG = re.compile(r"^(avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*)$")


def cmd_info(args) -> int:
    from . import numa
    from .bench import cpu_model
    from .compiler import BASE_FLAGS, cache_entries, compiler_identity
    from .render import BLOCKING
    from .settings import settings
    from .workload import mem_total, memory_budget

    cfg = settings()
    flags = isa_mod.cpu_flags()
    relevant = sorted(f for f in flags if RELEVANT_FLAG.match(f))
    _out(f"ktgen {__version__} (Python {platform.python_version()}, {platform.machine()})")
    _out(f"CPU:        {cpu_model()}")
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
            forced = target_mod.for_this_machine(cfg.isa, cfg)
            _out(f"KTGEN_ISA:  {cfg.isa}: every spec runs the {forced.tier} tier "
                 f"(target {_describe_target(forced)})")
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
            emulation = (f"; {isa_mod.EMULATION_VARS[name]}=1 runs it in software"
                         if name in isa_mod.EMULATION_VARS else "")
            _out(f"            {name}: not here (CPU lacks {', '.join(missing) or 'OS permission'}); "
                 f"`ktgen build --isa {name} --no-make` emits it for another machine{emulation}")

    try:
        ident = compiler_identity(cfg.cc)
    except CompilerError as exc:
        ident = f"NOT USABLE: {exc}"
    _out(f"compiler:   {ident}" + ("" if os.environ.get("KTGEN_CC") else "  (KTGEN_CC not set)"))
    if cfg.build_env:
        _out(f"build env:  {' '.join(f'{k}={v!r}' for k, v in cfg.build_env)} (added to every JIT build)")
    if cfg.sanitize:
        _out(f"sanitize:   KTGEN_SANITIZE={','.join(cfg.sanitize)}: JIT kernels are built with sanitizers "
             f"(emitted Makefiles are not)")
    _out(f"flags:      base {' '.join(BASE_FLAGS)}")
    for name in isa_mod.TIERS:
        if name in BLOCKING:
            extra = " ".join(target_mod.Target(name).isa_flags) or "(none)"
            where = "" if name in available else "   [emit only here]"
            _out(f"            {name:<10} + {extra}{where}")
    for name, ext in isa_mod.EXTENSIONS.items():
        here = "this CPU has it" if ext.cpu_flag in flags else "not on this CPU"
        _out(f"            +{name:<9} + {ext.flag} on {', '.join(ext.tiers)} ({here})")

    entries = cache_entries()
    size = sum(e.get("bytes", 0) for e in entries)
    src = "KTGEN_CACHE_DIR" if os.environ.get("KTGEN_CACHE_DIR") else "default; KTGEN_CACHE_DIR not set"
    _out(f"cache dir:  {cfg.cache_dir} ({src}); {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
         f"{fmt_bytes(size)}")
    cores = usable_cores()
    from .runtime import default_threads, local_processes
    procs = local_processes()
    share = f" / {procs} processes (LOCAL_WORLD_SIZE)" if default_threads(1) < cores else ""
    _out(f"cores:      {cores} usable (of {os.cpu_count()} online); threads per partition default "
         f"to usable{share} / tp_count = {default_threads(1)} at tp_count 1")
    _out("NUMA:       " + numa.describe().replace("\n", "\n            "))
    total = mem_total()
    _out(f"memory:     {fmt_bytes(total) if total else 'unknown'} total; check/bench budget "
         f"{fmt_bytes(memory_budget())} of bf16 base weights")
    return 0


# --------------------------------------------------------------------------- build

def cmd_build(args) -> int:
    from .compiler import compiler_identity
    from .emit import emit, run_make
    from .render import BLOCKING
    from .settings import settings

    spec = _load_spec(args.spec)
    cfg = settings()
    requested = args.isa or cfg.isa or spec.isa
    # The target as named (`avx512` is AVX-512 without VNNI, whatever this CPU has); `auto`
    # is this machine's best. Built here, it must also run here.
    target = target_mod.for_another_machine(requested, cfg)
    if target.tier not in BLOCKING:
        raise isa_mod.ISAError(f"ISA tier {target.tier!r} is not implemented in this version of ktgen")
    missing = target.missing_features()
    if not args.no_make:
        target.check_runs_here()
        compiler_identity(cfg.cc)  # a clear CompilerError before anything is written
    reason = target.reason + (f" (emit only: this CPU lacks {', '.join(missing)})" if missing else "")
    out_dir = Path(args.output) if args.output else Path("build") / spec.name
    written = emit(spec, target, out_dir, missing)
    _out(f"ktgen build: spec {spec.name} ({_describe_spec(spec)})",
         f"  target {target.name}: {reason}",
         f"  wrote {', '.join(p.name for p in written)} to {out_dir}")
    if args.no_make:
        _out(f"  not built (--no-make): run `make -C {out_dir}` on the target machine")
        return 0
    started = time.perf_counter()
    log = run_make(out_dir, cfg.cc)
    for line in log.splitlines():
        if line.strip() and not line.startswith("make"):
            _out(f"    {line.strip()}")
    libs = [out_dir / f"lib{spec.name}.so", out_dir / f"lib{spec.name}.a"]
    for lib in libs:
        if not lib.is_file():
            raise BuildError(f"make -C {out_dir} succeeded but did not produce {lib}")
    _out(f"  built {', '.join(f'{lib} ({fmt_bytes(lib.stat().st_size)})' for lib in libs)} "
         f"in {time.perf_counter() - started:.1f} s",
         f"  usage: {out_dir / 'README.txt'}")
    return 0


# --------------------------------------------------------------------------- check and bench

def _kernel_line(moe, seconds: float) -> str:
    k = moe.kernel
    how = f"compiled in {seconds:.1f} s" if k.compiled else "from the cache"
    return (f"  kernel: {k.isa} tier, target {_describe_target(k.target)} ({k.isa_reason}), {how}; "
            f"{moe.threads} thread(s) per partition")


def _prepare(command: str, args):
    """The spec (a subset of experts where the layer does not fit), T and the target, announced."""
    from .workload import plan as make_plan

    spec = _load_spec(args.spec)
    if args.mode:
        spec = spec.replace(quant={"mode": args.mode})  # that mode's default group size
    if args.tp:
        spec = spec.replace(tp_count=args.tp)
    target = target_mod.select(spec, args.isa)
    plan = make_plan(spec, args.experts)
    spec = plan.spec
    T = min(args.qlen, spec.max_len)
    _out(f"ktgen {command}: spec {spec.name} ({_describe_spec(plan.full)})", f"  {plan.note}")
    if T != args.qlen:
        _out(f"  --qlen {args.qlen} capped at the spec's max_len {spec.max_len}")
    return spec, plan, T, target


def cmd_check(args) -> int:
    from . import workload

    spec, plan, T, target = _prepare("check", args)
    _out(f"  T={T} tokens, seed {args.seed}: weights and LoRA std {WEIGHT_STD}, activations std "
         f"{ACTIVATION_STD}, random top-{spec.num_experts_per_tok} routing")
    rng = np.random.default_rng(args.seed)
    moe, lora, load_s = workload.random_moe(spec, args.seed, rng, isa=target)
    _out(_kernel_line(moe, load_s))
    inputs = workload.random_inputs(spec, T, rng)
    result = workload.check(moe, lora, *inputs)
    _out(f"  forward_train + backward {result.kernel_s * 1e3:.1f} ms; "
         f"float64 reference {result.reference_s:.1f} s")
    _out("", f"  {'quantity':<24}{'relL2':>11}{'limit':>10}  ok")
    for name, err, limit, ok in result.rows:
        _out(f"  {name:<24}{err:>11.3e}{limit:>10.1e}  {'ok' if ok else 'FAIL'}")
    _out("")
    subset = f" (on {spec.expert_num} of {plan.full.expert_num} experts)" if plan.subset else ""
    if result.failed:
        _out(f"FAIL: {', '.join(result.failed)} outside the accuracy limits for quant mode "
             f"{spec.quant.mode}{subset}")
        return 1
    _out(f"PASS: all {len(result.rows)} quantities within the accuracy limits for quant mode "
         f"{spec.quant.mode}{subset}")
    return 0


def cmd_bench(args) -> int:
    from . import bench, workload

    spec, plan, T, target = _prepare("bench", args)
    rng = np.random.default_rng(args.seed)
    weights = workload.random_weights(spec, args.seed)
    lora = workload.random_lora(spec, rng)
    from .runtime import MoE
    started = time.perf_counter()
    moe = MoE(spec, *weights, lora, isa=target)
    _out(_kernel_line(moe, time.perf_counter() - started))
    inputs = workload.random_inputs(spec, T, rng)

    k = spec.num_experts_per_tok
    load, cores = bench.load_average(), usable_cores()
    busy = " (busy machine: timings are noisy)" if load > 0.5 * cores + 0.5 else ""
    gflop = 2 * 3 * T * k * spec.hidden_size * spec.intermediate_size / 1e9
    _out(f"  T={T} tokens, top-{k} routing; median of {args.repeat} run(s) after 1 warm-up; "
         f"load average {load:.1f} on {cores} cores{busy}",
         f"  GFLOP/s count the base GEMMs only, LoRA excluded: forward 2*3*T*k*H*I = {gflop:.2f} GFLOP, "
         f"backward the same again (the transposed products)")
    if args.no_torch:
        _out("  (PyTorch baselines skipped: --no-torch)")
    else:
        from . import baselines
        if not baselines.torch_available():
            _out("  (PyTorch is not installed: no baselines; pip install torch to compare)")
    res = bench.run(moe, plan, weights, lora, inputs, args.repeat, torch=not args.no_torch,
                    torch_budget_s=args.torch_budget, say=_out)
    _print_bench(res)
    if args.json:
        path = Path(args.json)
        write_atomic(path, json.dumps(res, indent=2) + "\n")
        _out(f"  figures written to {path}")
    return 0


def _print_bench(res: dict) -> None:
    from . import baselines

    kt, roof, base = res["ktgen"], res["fp32_gemm_roof"], res["baselines"]
    W = 40

    def row(label, ms, gflops, tail=""):
        _out(f"  {label:<{W}}{ms:>10.1f}{gflops:>10.1f}{tail}")

    _out("", f"  {'':<{W}}{'ms':>10}{'GFLOP/s':>10}   vs the fp32 roof, the best PyTorch path")
    speed = {k: f", {kt[k]:.2f}x the best PyTorch" for k in ("speedup_vs_best_forward", "speedup_vs_best_train")
             if kt.get(k)}
    row("ktgen forward (inference)", kt["forward_ms"], kt["forward_gflops"],
        f"   {kt['forward_vs_roof']:.0%} of roof{speed.get('speedup_vs_best_forward', '')}")
    row("ktgen forward_train + backward", kt["train_ms"], kt["train_gflops"],
        f"   {kt['train_vs_roof']:.0%} of roof{speed.get('speedup_vs_best_train', '')}")
    row("  of which forward_train", kt["forward_train_ms"], kt["forward_train_gflops"])
    row("  of which backward", kt["backward_ms"], kt["backward_gflops"], f"   {kt['backward_vs_roof']:.0%} of roof")
    row(f"{roof['what']} (the roof)", roof["ms"], roof["gflops"])
    bw = res["read_bandwidth_gbs"]
    stream = f" = {kt['forward_stream_vs_bandwidth']:.0%} of the read bandwidth ({bw:.1f} GB/s)" if bw else ""
    active, E = res["active_experts"], res["expert_num"]
    _out(f"  forward streams the weights of {active} of {E} experts "
         f"({fmt_bytes(res['base_weights_bytes'] * active // E)}) at "
         f"{res['forward_weight_stream_gbs']:.1f} GB/s{stream}")
    if base.get("measurements"):
        _out("")
        for line in baselines.format_table(base):
            _out(line)


# --------------------------------------------------------------------------- cache

def cmd_cache(args) -> int:
    from .compiler import cache_entries, clear_cache
    from .settings import settings

    root = settings().cache_dir
    if args.action == "clear":
        n, in_flight = clear_cache()
        _out(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {root}")
        if in_flight:
            _out(f"left {len(in_flight)} being built by another process: {', '.join(in_flight)}")
        return 0
    entries = cache_entries()
    if not entries:
        _out(f"cache {root}: empty")
        return 0
    total = sum(e.get("bytes", 0) for e in entries)
    _out(f"cache {root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {fmt_bytes(total)}")
    _out(f"  {'spec':<20}{'tier':<11}{'size':>12}  {'created':<20} path")
    for e in entries:
        created = "INCOMPLETE" if e.get("incomplete") else e.get("created", "?")
        _out(f"  {e.get('spec', '?'):<20}{e.get('tier', '?'):<11}{fmt_bytes(e.get('bytes', 0)):>12}  "
             f"{created:<20} {e['path']}")
    return 0


# --------------------------------------------------------------------------- pack

def cmd_pack(args) -> int:
    from . import pack as pack_mod

    index = pack_mod.pack(args.checkpoint, args.out, quant=args.quant, group_size=args.group_size,
                          isa=args.isa, tp_count=args.tp, progress=not args.quiet)
    layers = index["layers"]
    total = sum(v["base_weights"] for v in layers.values())
    first = next(iter(layers.values()))
    _out(f"packed {len(layers)} MoE layer{'s' * (len(layers) != 1)} of {index['checkpoint']} into "
         f"{args.out}: {fmt_bytes(total)}, tier {first['tier']}")
    _out(f"  layout: {first['layout']}")
    _out(f"  index:  {Path(args.out) / pack_mod.PACK_INDEX}")
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

ISA_HELP = ("ISA target: auto, a tier (amx, avx512bf16, avx512, avx2, generic), or a tier with "
            "extensions (avx512+vnni); default: KTGEN_ISA, else the spec's isa")


def _layer_arguments(s: argparse.ArgumentParser, verb: str, qlen: int) -> None:
    """The arguments check and bench share: which layer runs, on how many tokens, for which target."""
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("--qlen", type=_nonneg, default=qlen, help=f"tokens (default {qlen}, capped at max_len)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--isa", help=ISA_HELP)
    s.add_argument("--experts", type=_positive, metavar="N",
                   help=f"{verb} N experts at the real shapes (default: all when they fit in memory, else 16)")
    s.add_argument("--mode", choices=MODES,
                   help="override the spec's quant.mode (with that mode's default group size)")
    s.add_argument("--tp", type=_positive, metavar="N", help="override the spec's tp_count")


def _parser() -> argparse.ArgumentParser:
    from .bench import TORCH_BUDGET_S

    p = argparse.ArgumentParser(
        prog="ktgen", description="Kernel compiler for the MoE expert layer of LoRA fine-tuning on CPUs.",
        epilog="SPEC is a YAML path or a bundled spec name. Environment: KTGEN_CACHE_DIR, KTGEN_ISA, "
               "KTGEN_CC, KTGEN_EMULATE_AMX, KTGEN_EMULATE_AVX512BF16, KTGEN_EMULATE_AVX512, KTGEN_SANITIZE.")
    p.add_argument("--version", action="version", version=f"ktgen {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="CPU features, chosen ISA tier and why, compiler, cache dir")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("build", help="emit the C sources, header, Makefile and build the library")
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("-o", "--output", metavar="DIR", help="output directory (default build/<spec name>)")
    s.add_argument("--isa", help=ISA_HELP + ". A named tier is emitted as named (avx512: no VNNI), "
                   "whatever this CPU has")
    s.add_argument("--no-make", action="store_true",
                   help="emit only, do not run make (allows a target this CPU lacks, for another machine)")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("check", help="random weights; compare with the float64 reference; exit 1 on failure")
    _layer_arguments(s, "check", qlen=128)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("bench", help="forward / backward time and GFLOP/s, against PyTorch when installed")
    _layer_arguments(s, "bench", qlen=512)
    s.add_argument("--repeat", type=_positive, default=5, help="timed runs after a warm-up (default 5)")
    s.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    s.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    s.add_argument("--torch-budget", type=float, default=TORCH_BUDGET_S, metavar="S",
                   help=f"seconds each PyTorch baseline may take before its repeats are cut "
                        f"(default {TORCH_BUDGET_S:g})")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("pack", help="pack a checkpoint's MoE experts for this tier into files that load by mmap")
    s.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a Hugging Face checkpoint directory (safetensors)")
    s.add_argument("out", metavar="OUT_DIR", help="where the packed files and ktgen-pack.json go")
    s.add_argument("--quant", choices=MODES,
                   help="quant mode (default: the checkpoint's own: bf16 for float weights)")
    s.add_argument("--group-size", type=_positive, metavar="G", help="group size when quantizing to awq or k2")
    s.add_argument("--isa", help=ISA_HELP.replace("; default: KTGEN_ISA, else the spec's isa",
                                                  "; default: KTGEN_ISA, else this machine's best"))
    s.add_argument("--tp", type=_positive, default=1, metavar="N", help="tensor-parallel partitions (default 1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_pack)

    s = sub.add_parser("cache", help="list or clear the kernel cache (KTGEN_CACHE_DIR)")
    s.add_argument("action", choices=("list", "clear"))
    s.set_defaults(func=cmd_cache)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .runtime import CacheFullError, KernelError
    from .spec import SpecError
    from .checkpoint import CheckpointError
    from .quant import QuantError
    return (SpecError, isa_mod.ISAError, CompilerError, CacheError, BuildError, KernelError,
            CacheFullError, CheckpointError, QuantError, NotImplementedError, OSError, MemoryError)


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
            if isinstance(exc, (BuildError, CompilerError)):  # the tool's own last lines, then one line
                first, _, tail = str(exc).partition("\n")
                if tail:
                    sys.stderr.write(tail + "\n")
                    exc = type(exc)(first + "; its last lines are above")
            msg = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"ktgen {args.command}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("ktgen: interrupted", file=sys.stderr)
        return 130

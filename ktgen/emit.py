"""Ahead-of-time emission (`ktgen build`): the C sources of a spec for a target, with a Makefile
and a README, into a directory that builds with nothing but a C compiler and make.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ._version import __version__
from .files import write_atomic
from .render import _env, render
from .spec import MoESpec
from .target import Target


class BuildError(RuntimeError):
    """`make` is missing or failed on emitted sources."""


README = """\
ktgen kernel for spec {spec_name} (target {target}), emitted by ktgen {version}
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
  make -C {dir} CC=clang CFLAGS=-g   # extra flags are added to the target's own

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



def emit(spec: MoESpec, target: Target, out_dir: Path, missing: list[str] | None = None) -> list[Path]:
    """Write <name>.h, <name>.c, Makefile, README.txt and spec.yaml for `target` into out_dir.
    `missing`: the CPU features of the target that this machine lacks (emitted for another one),
    noted in the Makefile and the README."""
    missing = missing or []
    rendered = render(spec, target)
    name = spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    # The target's flags without sanitizers (an emitted library is never sanitized).
    plain = Target(target.tier, target.extensions, target.emulate, target.cc)
    makefile = _env().get_template("Makefile.j2").render(
        spec_name=spec.name, name=name, target=target.name, version=__version__,
        cflags=" ".join(plain.cflags), ldflags=" ".join(plain.ldflags),
        emit_only=bool(missing), missing=", ".join(missing))
    lora = spec.lora
    p = rendered.prefix
    readme = README.format(
        spec_name=spec.name, name=name, target=target.name, tier=target.tier, version=__version__,
        dir=out_dir, p=p,
        emit_note=(f"\nEMIT ONLY: this machine lacks {', '.join(missing)}; run the library only "
                   f"on a CPU with the {target.name} features.\n" if missing else ""),
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
        write_atomic(path, text)
        written.append(path)
    return written


def built_target(out_dir: Path) -> str:
    """The target name (tier and extensions, as Target.name spells it) that the sources in
    out_dir were emitted for, read from their Makefile; BuildError when it names none."""
    makefile = Path(out_dir) / "Makefile"
    try:
        lines = makefile.read_text().splitlines()
    except OSError as exc:
        raise BuildError(f"{makefile}: cannot read it ({exc.strerror})") from None
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name.strip() == "KTGEN_TARGET":
            return value.strip()
    raise BuildError(f"{makefile}: names no KTGEN_TARGET (not emitted by this version of ktgen)")


def run_make(out_dir: Path, cc: str) -> str:
    """make -C out_dir CC=cc; its stdout. BuildError (with make's last lines) when it fails."""
    make = shutil.which("make")
    if make is None:
        raise BuildError(f"`make` is not on PATH; the sources are in {out_dir}: install make "
                         f"(apt-get install make) or compile {out_dir}/*.c with the flags in its Makefile")
    proc = subprocess.run([make, "-C", str(out_dir), f"CC={cc}"], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BuildError(f"make -C {out_dir} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout

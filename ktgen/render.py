"""Rendering: (spec, target) -> C sources. A pure function: no I/O beyond reading templates."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from ._version import __version__
from .formats import FORMATS
from .spec import MoESpec
from .kernels import TIERS
from .target import Target

TEMPLATES = Path(__file__).parent / "templates"

ALL_MODES = tuple(FORMATS)   # every quant mode a spec takes
BLOCKING = {name: t.blocking for name, t in TIERS.items()}        # the rendered tiers' blocking


def load_params(mode: str) -> list[tuple[str, str]]:
    """(C type, name) of the base-weight arguments of load_weights for a quant mode."""
    params = FORMATS[mode].c_params()
    return [(ctype, name.format(m=m)) for m in ("gate", "up", "down") for ctype, name in params]


@dataclass(frozen=True)
class Rendered:
    prefix: str        # C symbol prefix, ktgen_<spec name>
    header_name: str
    header: str        # the documented public header
    source: str        # the kernel translation unit
    cdef: str          # declarations for cffi
    kernel_set: str = ""   # the kernel set of the source (ktgen.kernels.KERNEL_SETS)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _c_float(x: float) -> str:
    return repr(float(x))


def render(spec: MoESpec, target: Target | str) -> Rendered:
    """C sources of `spec` for a target (a tier name is the tier with no extensions, native).
    An emulated target: the same kernels over a portable implementation of the 16-lane vector
    primitives (and of the tile instructions); it has every extension of its tier."""
    tier = target.tier if isinstance(target, Target) else target
    if tier not in TIERS:
        raise ValueError(f"no templates for ISA tier {tier!r}; rendered tiers: {', '.join(TIERS)}")
    if not isinstance(target, Target):
        target = Target(tier)
    desc = TIERS[tier]
    mode = spec.quant.mode
    fmt = FORMATS[mode]
    kset = desc.kernel_set(mode, target.vnni)
    pack = kset.pack_of(mode)
    split = desc.split.get(mode, fmt.split)
    prefix = f"ktgen_{spec.name}"
    lora = spec.lora
    lora_bf16 = bool(lora and lora.dtype == "bfloat16")
    # With several partitions the A-side LoRA gradients are partial sums: keep them float32
    # so that the merge rounds once.
    gradsum_bf16 = lora_bf16 and spec.tp_count == 1
    packed_layout = (f"ktgen-packed 1 mode={mode} group_size={spec.quant.group_size or 0} pack={pack} "
                     f"E={spec.expert_num} H={spec.hidden_size} I={spec.intermediate_size} "
                     f"tp_count={spec.tp_count} panel=32" + (f" split={split}" if split else ""))
    # load_weights passes each projection's q, scales and zeros on to pack_matrix (NULL: none)
    pack_args = {m: ([m] if not fmt.arrays else [f"{m}_{a.name[0]}" for a in fmt.arrays]) for m in ("gate", "up", "down")}
    pack_args = {m: (a + ["NULL"] * 3)[:3] for m, a in pack_args.items()}
    b = desc.blocking
    ctx = dict(
        p=prefix,
        spec_name=spec.name,
        version=__version__,
        tier=tier,
        kernel_set=kset.name,
        vector="vec16" if target.emulate else desc.vector,
        vw=desc.vw,
        vnni=target.vnni,
        emulate=target.emulate,
        # the vector primitives' vdpbf16ps
        bf16_dp=kset.name == "bf16dp",
        format_template=f"formats/{fmt.template}.h.j2",
        load_doc=fmt.doc.format(G=spec.quant.group_size),
        activation="silu",
        limit=_c_float(spec.swiglu_limit) if spec.swiglu_limit is not None else None,
        pack=pack,
        split=split,
        packed_layout=packed_layout,
        pack_args=pack_args,
        lora_in_gemm=lora is not None and kset.lora_in_gemm,
        header_name=f"{spec.name}.h",
        guard=f"KTGEN_{spec.name.upper()}_H",
        E=spec.expert_num,
        k=spec.num_experts_per_tok,
        H=spec.hidden_size,
        I=spec.intermediate_per_partition,
        I_FULL=spec.intermediate_size,
        tp_count=spec.tp_count,
        R=lora.rank if lora else 0,
        has_lora=lora is not None,
        scale=_c_float(lora.scale if lora else 0.0),
        lora_bf16=lora_bf16,
        gradsum_bf16=gradsum_bf16,
        lora_ctype="uint16_t" if lora_bf16 else "float",
        gradsum_ctype="uint16_t" if gradsum_bf16 else "float",
        max_len=spec.max_len,
        depth=spec.max_cache_depth,
        mode=mode,
        group_size=spec.quant.group_size,
        load_params=[f"{t}{n}" for t, n in load_params(mode)],
        load_null_check=" || ".join(f"!{n}" for _, n in load_params(mode)),
        dot_mr=b.dot_mr, dot_nr=b.dot_nr, bc_mr=b.bc_mr, bc_nr=b.bc_nr, wide_mr=b.wide_mr,
        fill=b.fills(mode),
    )
    env = _env()
    api = env.get_template("api.h.j2").render(**ctx)
    header = env.get_template("header.h.j2").render(api=api, **ctx)
    source = env.get_template(kset.template).render(**ctx)
    return Rendered(prefix=prefix, header_name=ctx["header_name"], header=header, source=source, cdef=api,
                    kernel_set=kset.name)

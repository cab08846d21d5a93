"""Rendering: (spec, target) -> C sources. A pure function: no I/O beyond reading templates."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import get_args

import jinja2

from ._version import __version__
from .spec import MoESpec, QuantSpec
from .target import Target

TEMPLATES = Path(__file__).parent / "templates"

# Register blocking of each tier's micro-kernels (see moe.c.j2). Broadcast form (the GEMMs,
# forward and backward): bc_mr activation rows x bc_nr panel columns of accumulators; dot
# form (the LoRA down-projections A x): dot_mr rows x dot_nr outputs, each a vector of
# partial sums. Both fill the register file (16 vector registers for avx2, 32 for avx512) with room
# for the operands; bc_nr and dot_nr divide the 32 columns of a panel. fill_modes: the quant
# modes whose forward unpacks a panel's K block inside the first row block's product
# (bcast_fill) rather than in a pass of its own; on avx2 the int4 dequantization does not fit
# the 16 registers beside 6 x 16 accumulators, and spilling costs more than the separate pass
# (docs/kernels.md, "The avx2 forward"). wide_mr: blocks of at most this many rows take all 32
# columns of a panel in one kernel (where bc_nr is less), so that a few rows still have enough
# independent accumulators to cover the FMA latency.
ALL_MODES = get_args(QuantSpec.model_fields["mode"].annotation)   # every quant mode a spec takes
BLOCKING = {
    "generic": dict(dot_mr=4, dot_nr=4, bc_mr=4, bc_nr=8, wide_mr=0, fill_modes=()),
    "avx2": dict(dot_mr=6, dot_nr=2, bc_mr=6, bc_nr=16, wide_mr=3, fill_modes=("bf16", "int8")),
    "avx512": dict(dot_mr=6, dot_nr=4, bc_mr=12, bc_nr=32, wide_mr=0, fill_modes=ALL_MODES),
    # avx512bf16: bf16 forward GEMMs on vdpbf16ps, 12 rows x 32 columns; the rest as avx512.
    "avx512bf16": dict(dot_mr=6, dot_nr=4, bc_mr=12, bc_nr=32, wide_mr=0, fill_modes=ALL_MODES),
    # amx: the GEMMs run on tiles; the rest is the avx512 tier's vector code.
    "amx": dict(dot_mr=6, dot_nr=4, bc_mr=12, bc_nr=32, wide_mr=0, fill_modes=ALL_MODES),
}


# Vector width (floats) of each tier's micro-kernels.
VECTOR_WIDTH = {"generic": 1, "avx2": 8, "avx512": 16, "avx512bf16": 16, "amx": 16}


def load_params(mode: str) -> list[tuple[str, str]]:
    """(C type, name) of the base-weight arguments of load_weights for a quant mode."""
    if mode == "bf16":
        return [("const uint16_t *", m) for m in ("gate", "up", "down")]
    qtype = "const int8_t *" if mode == "int8" else "const uint8_t *"
    stype = "const float *" if mode == "int8" else "const uint16_t *"
    params = []
    for m in ("gate", "up", "down"):
        params += [(qtype, f"{m}_q"), (stype, f"{m}_s")]
        if mode == "awq":
            params.append(("const uint8_t *", f"{m}_z"))
    return params


@dataclass(frozen=True)
class Rendered:
    prefix: str        # C symbol prefix, ktgen_<spec name>
    header_name: str
    header: str        # the documented public header
    source: str        # the kernel translation unit
    cdef: str          # declarations for cffi


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_sources() -> dict[str, str]:
    """Every template's text, for the cache key."""
    return {p.name: p.read_text() for p in sorted(TEMPLATES.iterdir()) if p.is_file()}


def _c_float(x: float) -> str:
    return repr(float(x))


def render(spec: MoESpec, target: Target | str) -> Rendered:
    """C sources of `spec` for a target (a tier name is the tier with no extensions, native).
    An emulated target: the same kernels over a portable implementation of the 16-lane vector
    primitives (and of the tile instructions); it has every extension of its tier."""
    tier = target.tier if isinstance(target, Target) else target
    if tier not in BLOCKING:
        raise ValueError(f"no templates for ISA tier {tier!r}; rendered tiers: {', '.join(BLOCKING)}")
    if not isinstance(target, Target):
        target = Target(tier)
    prefix = f"ktgen_{spec.name}"
    emulate = target.emulate
    vnni = target.vnni
    mode = spec.quant.mode
    int8_vnni = mode == "int8" and vnni and tier in ("avx512", "avx512bf16")
    # Packed panel layout (weights.h.j2): k interleaved by 2 (bf16 pairs) for the tiles, by 4
    # (int8 quads) for vpdpbusd and TDPBUSD, else plain K-major.
    bf16_pairs = mode == "bf16" and tier in ("amx", "avx512bf16")
    pack = 2 if bf16_pairs else 4 if (mode == "int8" and (tier == "amx" or int8_vnni)) else 1
    # avx2 bf16 panels: each 16-column half of a row split into words of columns (j, j + 8)
    bf16_split = 8 if mode == "bf16" and tier == "avx2" else 0
    int4 = mode in ("awq", "k2")
    # the packed layout's split field: columns j and j + split share a byte (int4) or a word
    split = 16 if int4 else bf16_split
    lora = spec.lora
    lora_bf16 = bool(lora and lora.dtype == "bfloat16")
    # With several partitions the A-side LoRA gradients are partial sums: keep them float32
    # so that the merge rounds once.
    gradsum_bf16 = lora_bf16 and spec.tp_count == 1
    ctx = dict(
        p=prefix,
        spec_name=spec.name,
        version=__version__,
        tier=tier,
        vnni=vnni,
        emulate=emulate,
        # int8 weights times per-token u8 activations with vpdpbusd in the forward GEMMs
        int8_vnni=int8_vnni,
        # int8 activations in the forward (vpdpbusd or TDPBUSD)
        int8_acts=pack == 4,
        pack=pack,
        bf16_split=bf16_split,
        split=split,
        # bf16 weights times bf16 activation pairs with vdpbf16ps in the forward GEMMs
        bf16_dp=mode == "bf16" and tier == "avx512bf16",
        int4=int4,
        # int4 panels dequantized to bf16 pairs once per work item, for the tiles
        amx_dequant=tier == "amx" and int4,
        # the LoRA products on the tiles too: A x as a split-bf16 GEMM, s B (A x) as extra K steps
        lora_tail=lora is not None and tier == "amx" and mode != "int8",
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
        clamp=_c_float(spec.swiglu_limit) if spec.swiglu_limit is not None else None,
        scale=_c_float(lora.scale if lora else 0.0),
        lora_bf16=lora_bf16,
        gradsum_bf16=gradsum_bf16,
        lora_ctype="uint16_t" if lora_bf16 else "float",
        gradsum_ctype="uint16_t" if gradsum_bf16 else "float",
        max_len=spec.max_len,
        depth=spec.max_cache_depth,
        mode=spec.quant.mode,
        group_size=spec.quant.group_size,
        vw=VECTOR_WIDTH[tier],
        load_params=[f"{t}{n}" for t, n in load_params(spec.quant.mode)],
        load_null_check=" || ".join(f"!{n}" for _, n in load_params(spec.quant.mode)),
        **BLOCKING[tier],
        fill=mode in BLOCKING[tier]["fill_modes"],
    )
    env = _env()
    api = env.get_template("api.h.j2").render(**ctx)
    header = env.get_template("header.h.j2").render(api=api, **ctx)
    vector_tier = "vec16" if ctx["emulate"] else {"amx": "avx512", "avx512bf16": "avx512"}.get(tier, tier)
    tier_source = env.get_template(f"tier_{vector_tier}.h.j2").render(**ctx)
    ctx["amx_source"] = env.get_template("amx.h.j2").render(**ctx) if tier == "amx" else ""
    weights_source = env.get_template("weights.h.j2").render(**ctx)
    source = env.get_template("moe.c.j2").render(tier_source=tier_source, weights_source=weights_source, **ctx)
    return Rendered(prefix=prefix, header_name=ctx["header_name"], header=header, source=source, cdef=api)

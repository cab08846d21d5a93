"""The weight formats: one entry per quant mode, the table the spec's list of modes comes from
(docs/design.md#base-weight-formats; docs/kernels.md, "Adding a weight format").

A format says how one projection's frozen weights [E, rows, K] are held: its arrays (the payload
q, the scales, the zeros) with their dtypes and shapes, how float weights are quantized to it
(round to nearest), its exact dequantization (the float32 weights the kernels compute with, one
rounding of q x scale each), how its packed panels read back (packed weight files), the C
template of its panels (templates/formats/), and the arguments and documentation of the C API's
load_weights. NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
PANEL = 32


@dataclass(frozen=True)
class Array:
    """One array of a quantized projection: its name in QuantizedWeights (q, scales, zeros), its
    dtype, and its shape for E experts of [rows, K] with group size G."""

    name: str
    dtype: np.dtype
    shape: Callable[[int, int, int, int | None], tuple[int, ...]]


@dataclass(frozen=True)
class Format:
    name: str
    template: str                       # templates/formats/<template>.h.j2
    arrays: tuple[Array, ...]           # () for bf16: the weights themselves
    default_group_size: int | None      # None: not grouped
    doc: str                            # load_weights' argument documentation (the C header; {G}: group size)
    quantize: Callable                  # (w float32 [rows, K], G) -> {array name: one expert's array}
    dequantize: Callable                # (arrays with a leading expert dim, G) -> float32 [E, rows, K]
    unpanel: Callable                   # (packed q, s, z buffers, fmt, E, rows, K, G, pack, split) -> arrays
    split: int = 0                      # its panel rows pair columns j and j + split in one byte or word
    limits: tuple[float, float] = (3e-2, 4e-2)   # relL2 of out, of every gradient (docs/design.md#accuracy)
    panel_bytes: Callable = None        # (K, G) -> bytes of one panel's payload, scales and zeros (S_PER_PANEL's)

    @property
    def grouped(self) -> bool:
        return self.default_group_size is not None

    def c_params(self) -> list[tuple[str, str]]:
        """(C type, name) of load_weights' arguments for one projection m, `{m}` standing for it."""
        if not self.arrays:
            return [("const uint16_t *", "{m}")]
        return [(f"const {_CTYPES[a.dtype]} *", "{m}_" + a.name[0]) for a in self.arrays]


_CTYPES = {np.dtype(np.int8): "int8_t", np.dtype(np.uint8): "uint8_t", np.dtype(np.float32): "float",
           np.dtype(np.float16): "uint16_t", bfloat16: "uint16_t"}


# ---- int4 nibbles: two a byte, k even in the low nibble ----

def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """[..., K] values 0..15 -> [..., K/2] bytes, even k in the low nibble."""
    u = u.astype(np.uint8)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def unpack_nibbles(p: np.ndarray) -> np.ndarray:
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4
    return out


# ---- bf16 ----

def _bf16_quantize(w, G):
    return {}


def _bf16_dequantize(arrays, G):
    return arrays["q"].astype(np.float32)


# ---- int8: symmetric per output row ----

def _int8_quantize(w, G):
    s = np.abs(w).max(axis=1) / np.float32(127)
    s[s == 0] = 1
    return {"q": np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8), "scales": s.astype(np.float32)}


def _int8_dequantize(arrays, G):
    return arrays["q"].astype(np.float32) * arrays["scales"][..., None]


# ---- awq: asymmetric int4 per (row, group along K), float16 scales, uint8 zeros ----

def _awq_quantize(w, G):
    rows, K = w.shape
    wg = w.reshape(rows, K // G, G)
    mx, mn = wg.max(axis=2), wg.min(axis=2)
    s = (np.maximum(mx - mn, np.float32(1e-5)) / np.float32(15)).astype(np.float16)
    sf = s.astype(np.float32)
    z = np.clip(np.rint(-mn / sf), 0, 15)
    u = np.clip(np.rint(wg / sf[..., None]) + z[..., None], 0, 15)
    return {"q": pack_nibbles(u.reshape(rows, K)), "scales": s, "zeros": z.astype(np.uint8)}


def _int4_dequantize(arrays, G, zeros):
    q = arrays["q"]
    E, rows, K = q.shape[0], q.shape[1], q.shape[2] * 2
    u = unpack_nibbles(q).astype(np.int32).reshape(E, rows, K // G, G)
    z = arrays["zeros"].astype(np.int32)[..., None] if zeros else 8
    s = arrays["scales"].astype(np.float32)[..., None]
    return ((u - z).astype(np.float32) * s).reshape(E, rows, K)


# ---- k2: symmetric signed int4 per (row, group), stored q + 8, bf16 scales ----

def _k2_quantize(w, G):
    rows, K = w.shape
    wg = w.reshape(rows, K // G, G)
    s = (np.abs(wg).max(axis=2) / np.float32(7)).astype(bfloat16)
    s[s == 0] = 1
    sf = s.astype(np.float32)
    u = np.clip(np.rint(wg / sf[..., None]), -8, 7) + 8
    return {"q": pack_nibbles(u.reshape(rows, K)), "scales": s}


def _groups(E, rows, K, G):
    return (E, rows, K // G)


def unsplit(rows: np.ndarray, split: int) -> np.ndarray:
    """Panel rows (last axis: P elements as stored) in column order, for a layout whose
    consecutive groups of 2 split columns store columns j and j + split side by side: element
    2i + h of a group is column split h + i."""
    shape = rows.shape
    grouped = rows.reshape(*shape[:-1], shape[-1] // (2 * split), split, 2)
    return grouped.swapaxes(-1, -2).reshape(shape)


def _unpanel_bytes(bufs, fmt, E, rows, K, G, pack, split):
    """Panels of one-byte or two-byte elements (bf16, int8), pack k interleaved, or split."""
    q, s = bufs[0], bufs[1]
    dt = dict((a.name, a.dtype) for a in fmt.arrays).get("q", bfloat16)
    panels = E * (rows // PANEL)
    w = q[: panels * K * PANEL * dt.itemsize].view(dt).reshape(panels, K // pack, PANEL, pack)
    if split:   # avx2 bf16: words of columns (j, j + split) in each half row
        w = unsplit(w.reshape(panels, K, PANEL), split)[..., None]
    out = {"q": w.transpose(0, 2, 1, 3).reshape(E, rows, K)}
    if fmt.arrays:   # int8: a float32 scale per row
        out["scales"] = s.view(np.float32).reshape(E, rows)
    return out


def _unpanel_nibbles(bufs, fmt, E, rows, K, G, pack, split):
    """int4 panels: [K][16] bytes (columns b and b + split), group scales (and zeros) [K/G][32]."""
    q, s, z = bufs[0], bufs[1], bufs[2]
    panels = E * (rows // PANEL)
    raw = q[: panels * K * PANEL // 2].reshape(panels, K, PANEL // 2)
    if split:   # byte b of a panel row: columns b (low nibble), b + split
        nib = unsplit(np.stack([raw & 15, raw >> 4], axis=-1).reshape(panels, K, PANEL), split)
    else:       # files written before the split: columns 2b, 2b + 1
        nib = unpack_nibbles(raw)
    out = {"q": pack_nibbles(nib.transpose(0, 2, 1)).reshape(E, rows, K // 2)}
    names = {a.name: a.dtype for a in fmt.arrays}
    out["scales"] = s.view(names["scales"]).reshape(panels, K // G, PANEL).transpose(0, 2, 1).reshape(E, rows, K // G)
    if "zeros" in names:
        out["zeros"] = z.reshape(panels, K // G, PANEL).transpose(0, 2, 1).reshape(E, rows, K // G)
    return out


FORMATS = {f.name: f for f in (
    Format("bf16", "bf16", (), None,
           "gate, up, down: bf16 bit patterns [E][rows][K].",
           _bf16_quantize, _bf16_dequantize, _unpanel_bytes, limits=(1e-2, 2e-2),
           panel_bytes=lambda K, G: (K * PANEL * 2, 0, 0)),
    Format("int8", "int8",
           (Array("q", np.dtype(np.int8), lambda E, rows, K, G: (E, rows, K)),
            Array("scales", np.dtype(np.float32), lambda E, rows, K, G: (E, rows))),
           None, "*_q: int8 [E][rows][K]; *_s: float32 [E][rows] (w = q * s).",
           _int8_quantize, _int8_dequantize, _unpanel_bytes,
           panel_bytes=lambda K, G: (K * PANEL, PANEL * 4, 0)),
    # 128: the group size AutoAWQ checkpoints use first; 32: Kimi-K2's int4 release
    Format("awq", "int4",
           (Array("q", np.dtype(np.uint8), lambda E, rows, K, G: (E, rows, K // 2)),
            Array("scales", np.dtype(np.float16), _groups),
            Array("zeros", np.dtype(np.uint8), _groups)),
           128, "*_q: uint8 [E][rows][K/2], two int4 a byte, k even in the low nibble;\n"
                "*_s: float16 bits [E][rows][K/{G}]; *_z: uint8 zeros [E][rows][K/{G}] (w = (q - z) * s).",
           _awq_quantize, lambda a, G: _int4_dequantize(a, G, True), _unpanel_nibbles, split=16,
           panel_bytes=lambda K, G: (K * PANEL // 2, K // G * PANEL * 2, K // G * PANEL)),
    Format("k2", "int4",
           (Array("q", np.dtype(np.uint8), lambda E, rows, K, G: (E, rows, K // 2)),
            Array("scales", bfloat16, _groups)),
           32, "*_q: uint8 [E][rows][K/2], two int4 a byte, k even in the low nibble, stored as q + 8;\n"
               "*_s: bf16 bits [E][rows][K/{G}] (w = (q - 8) * s).",
           _k2_quantize, lambda a, G: _int4_dequantize(a, G, False), _unpanel_nibbles, split=16,
           panel_bytes=lambda K, G: (K * PANEL // 2, K // G * PANEL * 2, 0)),
)}
MODES = tuple(FORMATS)                               # every quant mode a spec takes
DEFAULT_GROUP_SIZE = {n: f.default_group_size for n, f in FORMATS.items() if f.grouped}

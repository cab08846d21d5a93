"""Quantized base weights (docs/design.md#base-weight-formats): quantize, dequantize, and load checkpoint formats.

A `QuantizedWeights` holds one projection (gate, up or down) stacked over experts, in the
layout the kernels read, with K the projection's input dim (gate/up: K = hidden_size,
down: K = intermediate_size):

| mode | q | scales | zeros |
| --- | --- | --- | --- |
| int8 | int8 [E, rows, K] | float32 [E, rows] | none |
| awq | uint8 [E, rows, K/2]: k even in the low nibble | float16 [E, rows, K/G] | uint8 [E, rows, K/G] |
| k2 | uint8 [E, rows, K/2]: q + 8, k even in the low nibble | bfloat16 [E, rows, K/G] | none (8) |

The weight the kernels compute with is, in float32: int8 q × scale; awq (q - zero) × scale;
k2 (u - 8) × scale, each product rounded once. `dequantize` computes exactly that, so
`MoE.dequantized` and the kernels agree to the bit.

Checkpoint loaders take one matrix (2-D arrays) or a stack over experts (the same arrays
with a leading expert dim), and return a `QuantizedWeights` with a leading expert dim;
`stack` concatenates per-expert results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import FORMATS, bfloat16, pack_nibbles as _pack_nibbles, unpack_nibbles as _unpack_nibbles  # noqa: F401

MODES = tuple(m for m, f in FORMATS.items() if f.arrays)   # the quantized modes

# AutoAWQ's GEMM packing: nibble i of each int32 holds column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class QuantError(ValueError):
    """Quantized tensors that do not fit together, or do not fit the spec."""


@dataclass(frozen=True)
class QuantizedWeights:
    mode: str
    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    shape: tuple[int, int, int]     # (E, rows, K) of the dequantized weights
    group_size: int | None

    def __post_init__(self):
        E, rows, K = self.shape
        if self.mode not in MODES:
            raise QuantError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        fmt = FORMATS[self.mode]
        G = self.group_size
        if fmt.grouped:
            if G is None or G < 1 or K % G:
                raise QuantError(f"group_size: {G} does not divide K = {K} of a {self.shape} matrix")
            if K % 2:
                raise QuantError(f"shape: K = {K} must be even to pack two int4 values a byte")
        names = {a.name for a in fmt.arrays}
        if "zeros" not in names and self.zeros is not None:
            raise QuantError(f"zeros: mode {self.mode} has no zeros")
        for a in fmt.arrays:
            got, shape = getattr(self, a.name), a.shape(E, rows, K, G)
            if not isinstance(got, np.ndarray) or got.dtype != a.dtype or got.shape != shape:
                desc = f"{got.dtype} {got.shape}" if isinstance(got, np.ndarray) else type(got).__name__
                raise QuantError(f"{a.name}: expected {a.dtype} {shape} for a {self.mode} "
                                 f"{self.shape} matrix (group_size {G}), got {desc}")
            if not got.flags.c_contiguous:
                raise QuantError(f"{a.name}: expected a C-contiguous array")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.scales, self.zeros) if a is not None)

    def arrays(self) -> dict[str, np.ndarray]:
        return {a.name: getattr(self, a.name) for a in FORMATS[self.mode].arrays}

    def expert_slice(self, lo: int, hi: int) -> "QuantizedWeights":
        return QuantizedWeights(self.mode, self.q[lo:hi], self.scales[lo:hi],
                                None if self.zeros is None else self.zeros[lo:hi],
                                (hi - lo,) + self.shape[1:], self.group_size)


def _as3d(w) -> np.ndarray:
    w = np.asarray(w)
    return w[None] if w.ndim == 2 else w


def quantize(w, mode: str, group_size: int | None = None) -> QuantizedWeights:
    """Round-to-nearest quantization of weights [E, rows, K] (or one matrix [rows, K]) per
    docs/design.md#base-weight-formats.
    Works one expert at a time in float32, so a large stack needs no float copy of itself."""
    w = _as3d(w)
    E, rows, K = w.shape
    if mode not in MODES:
        raise QuantError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    fmt = FORMATS[mode]
    G = group_size if fmt.grouped else None
    if fmt.grouped and (G is None or G < 1 or K % G):
        raise QuantError(f"group_size: {group_size} does not divide K = {K}")
    out = {a.name: np.empty(a.shape(E, rows, K, G), a.dtype) for a in fmt.arrays}
    for e in range(E):
        for name, a in fmt.quantize(np.asarray(w[e], np.float32), G).items():
            out[name][e] = a
    return QuantizedWeights(mode, out["q"], out["scales"], out.get("zeros"), (E, rows, K), G)


def dequantize(qw: QuantizedWeights) -> np.ndarray:
    """float32 [E, rows, K]: exactly the weights the kernels compute with."""
    return FORMATS[qw.mode].dequantize(qw.arrays(), qw.group_size)


def stack(parts: list[QuantizedWeights]) -> QuantizedWeights:
    """Concatenate per-expert (or per-group-of-experts) QuantizedWeights along the expert dim."""
    if not parts:
        raise QuantError("parts: nothing to stack")
    first = parts[0]
    for i, p in enumerate(parts):
        if (p.mode, p.shape[1:], p.group_size) != (first.mode, first.shape[1:], first.group_size):
            raise QuantError(f"parts[{i}]: {p.mode} {p.shape} G={p.group_size} does not match "
                             f"parts[0]: {first.mode} {first.shape} G={first.group_size}")
    cat = lambda name: None if getattr(first, name) is None else np.concatenate([getattr(p, name) for p in parts])
    E = sum(p.shape[0] for p in parts)
    return QuantizedWeights(first.mode, cat("q"), cat("scales"), cat("zeros"), (E,) + first.shape[1:], first.group_size)


def _check(name: str, a, dtype, ndim_shape: tuple) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.dtype(dtype) or a.shape != ndim_shape:
        raise QuantError(f"{name}: expected {np.dtype(dtype)} {ndim_shape}, got {a.dtype} {a.shape}")
    return a


def _unpack_awq_words(words: np.ndarray) -> np.ndarray:
    """int32 [..., N/8] AutoAWQ-packed -> uint8 [..., N] in column order."""
    w = words.astype(np.uint32)
    out = np.empty(w.shape[:-1] + (w.shape[-1], 8), np.uint8)
    for i, col in enumerate(AWQ_ORDER):
        out[..., col] = (w >> (4 * i)) & 15
    return out.reshape(w.shape[:-1] + (w.shape[-1] * 8,))


def from_autoawq(qweight, qzeros, scales, group_size: int) -> QuantizedWeights:
    """An AutoAWQ GEMM checkpoint matrix (or a stack over experts with a leading dim):
    qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales float16 [K/G, N]; the layer
    computes x @ W with W [K, N] = (q - zero) * scale. Returned as rows = N, K = in features."""
    qweight, qzeros, scales = _as3d(qweight), _as3d(qzeros), _as3d(scales)
    if qweight.dtype != np.int32 or qweight.ndim != 3:
        raise QuantError(f"qweight: expected int32 [K, N/8] (or [E, K, N/8]), got {qweight.dtype} {qweight.shape}")
    E, K, N8 = qweight.shape
    N = N8 * 8
    if group_size is None or group_size < 1 or K % group_size:
        raise QuantError(f"group_size: {group_size} does not divide K = {K} (qweight {qweight.shape})")
    groups = K // group_size
    _check("qzeros", qzeros, np.int32, (E, groups, N8))
    _check("scales", scales, np.float16, (E, groups, N))
    u = _unpack_awq_words(qweight).transpose(0, 2, 1)            # [E, N, K]
    z = _unpack_awq_words(qzeros).transpose(0, 2, 1)             # [E, N, groups]
    return QuantizedWeights("awq", _pack_nibbles(u), np.ascontiguousarray(scales.transpose(0, 2, 1)),
                            np.ascontiguousarray(z), (E, N, K), group_size)


def from_compressed_tensors(weight_packed, weight_scale, weight_shape) -> QuantizedWeights:
    """Kimi-K2's pack-quantized int4 (compressed-tensors, symmetric, group along K): weight_packed
    int32 [N, K/8] with element k = 8c + i at bits 4i .. 4i+3 of word c, stored as q + 8;
    weight_scale bfloat16 [N, K/G]; weight_shape (N, K). A leading expert dim is accepted."""
    packed, scale = _as3d(weight_packed), _as3d(weight_scale)
    shape = tuple(int(v) for v in np.asarray(weight_shape).reshape(-1)[-2:])
    if len(shape) != 2:
        raise QuantError(f"weight_shape: expected (N, K), got {np.asarray(weight_shape).tolist()}")
    if packed.dtype != np.int32 or packed.ndim != 3:
        raise QuantError(f"weight_packed: expected int32 [N, K/8] (or [E, N, K/8]), got {packed.dtype} {packed.shape}")
    E = packed.shape[0]
    N, K = shape
    if K % 8 or packed.shape[1:] != (N, K // 8):
        raise QuantError(f"weight_packed: expected shape [{N}, {K // 8}] for weight_shape {shape}, got {packed.shape[1:]}")
    if scale.dtype != bfloat16 or scale.ndim != 3 or scale.shape[:2] != (E, N) or not scale.shape[2] \
            or K % scale.shape[2]:
        raise QuantError(f"weight_scale: expected bfloat16 [{N}, K/G] with G dividing {K}, got {scale.dtype} {scale.shape}")
    G = K // scale.shape[2]
    w = packed.astype(np.uint32)
    u = np.empty((E, N, K // 8, 8), np.uint8)
    for i in range(8):
        u[..., i] = (w >> (4 * i)) & 15
    return QuantizedWeights("k2", _pack_nibbles(u.reshape(E, N, K)), np.ascontiguousarray(scale), None, (E, N, K), G)


def from_int8(qweight, scales) -> QuantizedWeights:
    """Symmetric per-row int8: qweight int8 [N, K] (or [E, N, K]), scales float32 [N] (or [E, N]);
    W = q * scale."""
    q = _as3d(qweight)
    s = np.asarray(scales)
    s = s[None] if s.ndim == 1 else s
    if q.dtype != np.int8 or q.ndim != 3:
        raise QuantError(f"qweight: expected int8 [N, K] (or [E, N, K]), got {q.dtype} {q.shape}")
    _check("scales", s, np.float32, q.shape[:2])
    return QuantizedWeights("int8", np.ascontiguousarray(q), np.ascontiguousarray(s), None, q.shape, None)

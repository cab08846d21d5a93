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

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
MODES = ("int8", "awq", "k2")

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
        G = self.group_size
        if self.mode == "int8":
            expect = {"q": (np.int8, (E, rows, K)), "scales": (np.float32, (E, rows))}
        else:
            if G is None or G < 1 or K % G:
                raise QuantError(f"group_size: {G} does not divide K = {K} of a {self.shape} matrix")
            if K % 2:
                raise QuantError(f"shape: K = {K} must be even to pack two int4 values a byte")
            sdtype = np.float16 if self.mode == "awq" else bfloat16
            expect = {"q": (np.uint8, (E, rows, K // 2)), "scales": (sdtype, (E, rows, K // G))}
            if self.mode == "awq":
                expect["zeros"] = (np.uint8, (E, rows, K // G))
        if self.mode != "awq" and self.zeros is not None:
            raise QuantError(f"zeros: mode {self.mode} has no zeros")
        for name, (dtype, shape) in expect.items():
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype) or a.shape != shape:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise QuantError(f"{name}: expected {np.dtype(dtype)} {shape} for a {self.mode} "
                                 f"{self.shape} matrix (group_size {G}), got {got}")
            if not a.flags.c_contiguous:
                raise QuantError(f"{name}: expected a C-contiguous array")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.scales, self.zeros) if a is not None)

    def expert_slice(self, lo: int, hi: int) -> "QuantizedWeights":
        return QuantizedWeights(self.mode, self.q[lo:hi], self.scales[lo:hi],
                                None if self.zeros is None else self.zeros[lo:hi],
                                (hi - lo,) + self.shape[1:], self.group_size)


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """[..., K] values 0..15 -> [..., K/2] bytes, even k in the low nibble."""
    u = u.astype(np.uint8)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def _unpack_nibbles(p: np.ndarray) -> np.ndarray:
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4
    return out


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
    if mode != "int8" and (group_size is None or group_size < 1 or K % group_size):
        raise QuantError(f"group_size: {group_size} does not divide K = {K}")
    G = group_size
    if mode == "int8":
        q = np.empty((E, rows, K), np.int8)
        scales = np.empty((E, rows), np.float32)
    else:
        q = np.empty((E, rows, K // 2), np.uint8)
        scales = np.empty((E, rows, K // G), np.float16 if mode == "awq" else bfloat16)
    zeros = np.empty((E, rows, K // G), np.uint8) if mode == "awq" else None
    for e in range(E):
        we = np.asarray(w[e], np.float32)
        if mode == "int8":
            s = np.abs(we).max(axis=1) / np.float32(127)
            s[s == 0] = 1
            q[e] = np.clip(np.rint(we / s[:, None]), -127, 127)
            scales[e] = s
            continue
        wg = we.reshape(rows, K // G, G)
        if mode == "awq":
            mx, mn = wg.max(axis=2), wg.min(axis=2)
            s = (np.maximum(mx - mn, np.float32(1e-5)) / np.float32(15)).astype(np.float16)
            sf = s.astype(np.float32)
            z = np.clip(np.rint(-mn / sf), 0, 15)
            u = np.clip(np.rint(wg / sf[..., None]) + z[..., None], 0, 15)
            zeros[e] = z
        else:
            s = (np.abs(wg).max(axis=2) / np.float32(7)).astype(bfloat16)
            s[s == 0] = 1
            sf = s.astype(np.float32)
            u = np.clip(np.rint(wg / sf[..., None]), -8, 7) + 8
        scales[e] = s
        q[e] = _pack_nibbles(u.reshape(rows, K))
    return QuantizedWeights(mode, q, scales, zeros, (E, rows, K), G)


def dequantize(qw: QuantizedWeights) -> np.ndarray:
    """float32 [E, rows, K]: exactly the weights the kernels compute with."""
    E, rows, K = qw.shape
    if qw.mode == "int8":
        return qw.q.astype(np.float32) * qw.scales[..., None]
    G = qw.group_size
    u = _unpack_nibbles(qw.q).astype(np.int32).reshape(E, rows, K // G, G)
    z = qw.zeros.astype(np.int32)[..., None] if qw.mode == "awq" else 8
    s = qw.scales.astype(np.float32)[..., None]
    return ((u - z).astype(np.float32) * s).reshape(E, rows, K)


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

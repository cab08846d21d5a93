"""A Hugging Face checkpoint directory's MoE experts, read one layer at a time (docs/design.md,
"Experts from disk").

The experts of each layer are found by their tensor names, in the layouts checkpoints on the Hub
use: one tensor per expert and projection (``<prefix>.experts.<e>.gate_proj.weight``, Mixtral's
``w1``/``w3``/``w2``), as bf16/fp16/fp32 ``weight``, AutoAWQ GEMM ``qweight``/``qzeros``/``scales``
or compressed-tensors pack-quantized ``weight_packed``/``weight_scale``/``weight_shape``
(Kimi-K2); or transformers' fused ``<prefix>.experts.gate_up_proj`` / ``down_proj``.

Each tensor is read with one positioned read straight into the array that keeps it (no mapping
of the file, whose touched pages would count in the process's RSS, and no whole-file copy), so
that loading a layer holds that layer once. The safetensors format is a little-endian u64
header length, a JSON header and the data; the header is all this module parses.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files, quant

DTYPES = {"BF16": quant.bfloat16, "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8)}
# Bits per element of every dtype of the safetensors format (those ktgen reads are DTYPES).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
              "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
              "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64}
PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_PER_EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d{1,9})\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)"
                         r"\.(?P<field>weight|qweight|qzeros|scales|weight_packed|weight_scale|weight_shape)$")
_FUSED = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
INDEX_NAME = "model.safetensors.index.json"
HEADER_LIMIT = 100 << 20
# config.json keys of the routed expert count (Qwen-MoE, DeepSeek/Kimi, Mixtral/gpt-oss, others).
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")


class CheckpointError(ValueError):
    """A checkpoint directory whose experts ktgen cannot read: named with the file or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header: dtype name, shape and offsets in the data."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Header:
    """A safetensors file's header, checked as the safetensors library checks it: every entry
    has a dtype of the format, a shape and offsets whose byte counts agree, the entries tile
    the data from 0 with no overlap or gap, and the data ends where the file does."""
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int   # the data's offset in the file
    text: bytes       # the header's JSON as stored


def _read_exact(f, n: int, path: Path) -> bytes:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise CheckpointError(f"{path}: not a safetensors file (it ends inside its header)")
        data += chunk
    return data


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_info(path: Path, name: str, t) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(t, dict):
        raise CheckpointError(f"{where}: expected a JSON object (dtype, shape, data_offsets), got {t!r:.80}")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if dtype is None:
        raise CheckpointError(f"{where} has no dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where}: dtype {dtype!r:.40} is not a safetensors dtype "
                              f"({', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r:.80} is not a list of sizes >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_nonneg_int(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {offsets!r:.80} is not [begin, end] with "
                              f"0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    b, e = offsets
    if bits % 8 or bits // 8 != e - b:
        raise CheckpointError(f"{where}: {dtype} {tuple(shape)} is {bits / 8:g} bytes, but its "
                              f"data_offsets {b} .. {e} hold {e - b}")
    return TensorInfo(dtype, tuple(shape), b, e)


def read_header(path) -> Header:
    """The checked header of a safetensors file (CheckpointError naming the file and the entry
    otherwise)."""
    path = Path(path)
    with files.open_regular(path, CheckpointError, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", _read_exact(f, 8, path))
        if n > HEADER_LIMIT or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (a header of {n} bytes in a file "
                                  f"of {size})")
        text = _read_exact(f, n, path)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: cannot read its safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object of strings")
    tensors = {name: _tensor_info(path, name, t) for name, t in header.items()}
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    for (na, a), (nb, b) in zip(ordered, ordered[1:]):
        if b.begin < a.end:
            raise CheckpointError(f"{path}: tensor {nb!r} (data {b.begin} .. {b.end}) overlaps tensor "
                                  f"{na!r} (data {a.begin} .. {a.end})")
    end = 0
    for name, t in ordered:
        if t.begin != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at data offset {t.begin}, where {end} "
                                  f"was expected (the data has a gap)")
        end = t.end
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded ({size} bytes, the header describes "
                              f"{8 + n + end})")
    return Header(path, tensors, meta, 8 + n, text)


@dataclass
class _Entry:
    file: Path
    dtype_name: str
    dtype: np.dtype | None   # None: a dtype ktgen does not read (F8, BOOL, ...)
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class LayerKeys:
    """The tensor names of one layer's experts."""
    prefix: str
    fused: dict[str, str] = field(default_factory=dict)          # gate_up_proj / down_proj -> name
    experts: dict[tuple[int, str], dict[str, str]] = field(default_factory=dict)  # (e, proj) -> field -> name

    @property
    def expert_num(self) -> int:
        return 1 + max(e for e, _ in self.experts) if self.experts else 0


class Checkpoint:
    """The safetensors files of a checkpoint directory (the shards model.safetensors.index.json
    lists when there is one, else every *.safetensors file), its config.json, and the MoE
    layers found in them."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint: {self.directory} is not a directory")
        digest = self._digest = hashlib.sha256()
        cfg = self.directory / "config.json"
        self.config: dict = {}
        if cfg.exists():
            text = files.read_bytes(cfg, CheckpointError, "config.json")
            digest.update(b"config.json\0" + text)
            try:
                self.config = json.loads(text)
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                raise CheckpointError(f"checkpoint: {cfg} is not valid JSON ({err})") from None
            if not isinstance(self.config, dict):
                raise CheckpointError(f"checkpoint: {cfg} is not a JSON object")
        shards = self._shards(digest)
        self.tensors: dict[str, _Entry] = {}
        for path, wanted in shards.items():
            header = read_header(path)
            digest.update(f"{path.name}\0".encode() + header.text)
            names = header.tensors if wanted is None else wanted
            for name in names:
                t = header.tensors.get(name)
                if t is None:
                    raise CheckpointError(f"checkpoint: {INDEX_NAME} puts tensor {name} in {path}, which "
                                          f"has no such tensor")
                if name in self.tensors:
                    raise CheckpointError(f"checkpoint: tensor {name} is in both {self.tensors[name].file} and "
                                          f"{path}, and no {INDEX_NAME} says which to read")
                self.tensors[name] = _Entry(path, t.dtype, DTYPES.get(t.dtype), t.shape,
                                            header.data_start + t.begin, t.end - t.begin)
        self.layers: dict[str, LayerKeys] = {}
        self._others: list[str] = []   # the tensors of no experts layer
        for name in self.tensors:
            m = _PER_EXPERT.match(name)
            if m:
                keys = self.layers.setdefault(m["prefix"], LayerKeys(m["prefix"]))
                keys.experts.setdefault((int(m["e"]), PROJ[m["proj"]]), {})[m["field"]] = name
                continue
            m = _FUSED.match(name)
            if m:
                self.layers.setdefault(m["prefix"], LayerKeys(m["prefix"])).fused[m["proj"]] = name
            else:
                self._others.append(name)

    @functools.cached_property
    def identity(self) -> str:
        """A digest of what tells this checkpoint from another (`ktgen pack` records it): its
        config.json and index, every shard's header, and the first bytes of every tensor that is
        not an expert's (two trainings of one architecture have the same headers). Edits to the
        experts' data alone do not change it."""
        digest = self._digest.copy()
        by_file: dict[Path, list[str]] = {}
        for name in sorted(self._others):
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for path, names in by_file.items():
            with files.open_regular(path, CheckpointError, "safetensors file") as f:
                for name in names:
                    t = self.tensors[name]
                    digest.update(name.encode() + b"\0" + os.pread(f.fileno(), min(t.nbytes, 64), t.offset))
        return digest.hexdigest()

    def _shards(self, digest) -> dict[Path, list[str] | None]:
        """Shard path -> the tensors to take from it (None: all of them)."""
        index = self.directory / INDEX_NAME
        if not index.exists():
            found = sorted(self.directory.glob("*.safetensors"))
            if not found:
                raise CheckpointError(f"checkpoint: no *.safetensors file in {self.directory}")
            return {path: None for path in found}
        text = files.read_bytes(index, CheckpointError, "checkpoint index")
        digest.update(f"{INDEX_NAME}\0".encode() + text)
        try:
            weight_map = json.loads(text).get("weight_map")
        except (UnicodeDecodeError, ValueError, RecursionError, AttributeError) as err:
            raise CheckpointError(f"checkpoint: {index} is not a JSON object with a weight_map ({err})") from None
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"checkpoint: {index}: weight_map is not a JSON object of tensor name -> "
                                  f"shard file name")
        shards: dict[Path, list[str]] = {}
        by_name: dict[str, Path] = {}
        for name, shard in weight_map.items():
            if shard not in by_name:
                # shards may be symlinks out of the directory (the Hugging Face cache's blobs)
                by_name[shard] = files.file_in(self.directory, shard, CheckpointError,
                                               f"checkpoint: {INDEX_NAME} shard", symlinks_out=True)
            shards.setdefault(by_name[shard], []).append(name)
        return shards

    def expert_count(self) -> tuple[str, int] | None:
        """(config.json key, value) of the routed expert count, None when the config has none."""
        item = config_item(self.config, EXPERT_COUNT_KEYS)
        return item if item is not None and isinstance(item[1], int) else None

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name`, read into `out` when given (of its dtype and shape)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"checkpoint: no tensor {name!r} in {self.directory}")
        if t.dtype is None:
            raise CheckpointError(f"checkpoint: {name} in {t.file} is {t.dtype_name}, a dtype ktgen does not "
                                  f"read ({', '.join(DTYPES)})")
        if out is None:
            out = np.empty(t.shape, t.dtype)
        elif out.dtype != t.dtype or out.shape != t.shape or not out.flags.c_contiguous:
            raise CheckpointError(f"checkpoint: {name} is {t.dtype} {t.shape}, expected {out.dtype} {out.shape}")
        with files.open_regular(t.file, CheckpointError, "safetensors file") as f:
            view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
            while done < t.nbytes:
                n = os.preadv(f.fileno(), [view[done:]], t.offset + done)
                if n <= 0:
                    raise CheckpointError(f"checkpoint: {t.file} ends inside tensor {name}")
                done += n
        return out

    def layer_format(self, keys: LayerKeys) -> str:
        """'bf16' (float weights: bf16, fp16 or fp32), 'awq' or 'k2'."""
        if keys.fused:
            return "bf16"
        fields = set().union(*(set(f) for f in keys.experts.values()))
        if "qweight" in fields:
            return "awq"
        if "weight_packed" in fields:
            return "k2"
        return "bf16"

    def load_layer(self, keys: LayerKeys, mode: str, *, group_size: int | None = None,
                   is_transposed: bool = False, is_concatenated: bool = True) -> tuple:
        """gate, up [E, I, H] and down [E, H, I] of one layer in docs/design.md#base-weight-formats
        for quant `mode`: float weights rounded to bf16 (then quantized expert by expert for an
        int8/awq/k2 mode); AWQ and compressed-tensors weights as they are (mode must be theirs)."""
        self._check_layer(keys)
        fmt = self.layer_format(keys)
        if fmt != "bf16" and mode != fmt:
            raise CheckpointError(f"quant: the checkpoint's experts at {keys.prefix} are {fmt} int4; "
                                  f"ktgen runs them as quant mode {fmt!r}, not {mode!r} (re-quantizing "
                                  f"quantized weights would lose accuracy)")
        if keys.fused:
            return self._load_fused(keys, mode, group_size, is_transposed, is_concatenated)
        E = keys.expert_num
        out = []
        for proj in ("gate", "up", "down"):
            present = sorted(e for e, p in keys.experts if p == proj)
            if len(present) != E:
                missing = next((i for i, e in enumerate(present) if i != e), len(present))
                raise CheckpointError(f"checkpoint: {keys.prefix}.experts.{missing} has no {proj} "
                                      f"projection ({E} experts found)")
            names = [keys.experts[(e, proj)] for e in range(E)]
            if fmt == "awq":
                out.append(self._stack_quantized(names, ("qweight", "qzeros", "scales"), lambda q, z, s:
                           quant.from_autoawq(q, z, s, q.shape[0] // s.shape[0] if q.ndim == s.ndim == 2
                                              and s.shape[0] else 0)))
            elif fmt == "k2":
                out.append(self._stack_quantized(names, ("weight_packed", "weight_scale", "weight_shape"),
                                                 quant.from_compressed_tensors))
            else:
                out.append(self._stack_float([n["weight"] for n in names], mode, group_size))
        return tuple(out)

    def _check_layer(self, keys: LayerKeys) -> None:
        """Refuse a layer whose expert count is not the config's, or whose experts are fp8."""
        for name in itertools.chain(keys.fused.values(), *(f.values() for f in keys.experts.values())):
            t = self.tensors[name]
            if t.dtype_name.startswith("F8"):
                raise CheckpointError(f"checkpoint: {name} is {t.dtype_name}: fp8 experts are not "
                                      f"supported yet")
        counted = self.expert_count()
        if counted is None:
            return
        if keys.fused:
            gu = self.tensors.get(keys.fused.get("gate_up_proj", ""))
            E = gu.shape[0] if gu is not None and gu.shape else None
        else:
            E = keys.expert_num
        key, want = counted
        if E is not None and E != want:
            missing = f" (experts {E} .. {want - 1} are missing)" if E < want else ""
            raise CheckpointError(f"checkpoint: {keys.prefix} has {E} experts, but "
                                  f"{self.directory / 'config.json'} says {key} = {want}{missing}")

    def _stack_quantized(self, names, fields, convert):
        parts = []
        for n in names:
            missing = [f for f in fields if f not in n]
            if missing:
                raise CheckpointError(f"checkpoint: {next(iter(n.values())).rsplit('.', 1)[0]} has no {missing[0]}")
            try:
                parts.append(convert(*(self.read(n[f]) for f in fields)))
            except quant.QuantError as err:
                raise CheckpointError(f"checkpoint: {n[fields[0]].rsplit('.', 1)[0]}: {err}") from None
        return quant.stack(parts)

    def _stack_float(self, names: list[str], mode: str, group_size: int | None):
        shapes = {self.tensors[n].shape for n in names}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise CheckpointError(f"checkpoint: expected 2-D expert weights of one shape, got {sorted(shapes)} "
                                  f"({names[0]} ...)")
        rows, K = next(iter(shapes))
        if mode == "bf16":
            out = np.empty((len(names), rows, K), quant.bfloat16)
            for e, n in enumerate(names):
                out[e] = self._bf16(n)
            return out
        return quant.stack([quant.quantize(self._bf16(n)[None], mode, group_size) for n in names])

    def _bf16(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        a = self.read(name)
        if t.dtype == quant.bfloat16:
            return a
        if t.dtype.kind != "f":
            raise CheckpointError(f"checkpoint: {name} is {t.dtype}, not a float weight")
        return a.astype(np.float32).astype(quant.bfloat16)   # rounded to nearest even, as torch does

    def _load_fused(self, keys, mode, group_size, is_transposed, is_concatenated):
        if set(keys.fused) != {"gate_up_proj", "down_proj"}:
            raise CheckpointError(f"checkpoint: {keys.prefix}.experts has {', '.join(keys.fused)} only")
        gu = self._bf16(keys.fused["gate_up_proj"])
        dn = self._bf16(keys.fused["down_proj"])
        if gu.ndim != 3 or dn.ndim != 3:
            raise CheckpointError(f"checkpoint: {keys.prefix}.experts.gate_up_proj and down_proj must be 3-D")
        ws = [np.ascontiguousarray(w) for w in split_fused(gu, dn, is_transposed, is_concatenated)]
        del gu, dn
        if mode == "bf16":
            return tuple(ws)
        return tuple(quant.quantize(w, mode, group_size) for w in ws)


def split_fused(gu, dn, is_transposed: bool, is_concatenated: bool) -> tuple:
    """gate [E,I,H], up [E,I,H], down [E,H,I] (views; NumPy arrays or torch tensors) of transformers'
    fused gate_up_proj / down_proj."""
    if is_transposed:  # [E, H, 2I] and [E, I, H]
        gu, dn = gu.swapaxes(1, 2), dn.swapaxes(1, 2)
    I2 = gu.shape[1]
    if is_concatenated:
        return gu[:, : I2 // 2], gu[:, I2 // 2:], dn
    return gu[:, 0::2], gu[:, 1::2], dn  # interleaved rows gate0, up0, gate1, up1, ...


def trim_heap() -> None:
    """Give the heap's free memory back to the OS (glibc's malloc_trim; nothing elsewhere).
    A layer's source arrays are freed once it is packed, but glibc keeps freed chunks of the
    sizes it has seen in its heap rather than unmapping them, so without this the RSS of a
    whole-model load keeps a layer or two of them."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def match_prefix(module_path: str, prefixes, where) -> str:
    """The experts layer prefix among `prefixes` for a model's `module_path` (e.g.
    "model.layers.3.mlp.experts"): the same path, or the only one with the same numbers (checkpoints
    name Mixtral's block block_sparse_moe where transformers >= 5 says mlp)."""
    prefix = module_path[:-len(".experts")] if module_path.endswith(".experts") else module_path
    prefixes = list(prefixes)
    if prefix in prefixes:
        return prefix
    digits = re.findall(r"\d+", prefix)
    cands = [k for k in prefixes if re.findall(r"\d+", k) == digits]
    if len(cands) == 1:
        return cands[0]
    found = f"several candidates: {', '.join(cands)}" if cands else \
        f"it has {', '.join(sorted(prefixes)[:4]) or 'none'}{' ...' if len(prefixes) > 4 else ''}"
    raise CheckpointError(f"checkpoint: no experts for {module_path} in {where} ({found})")


TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


def config_item(config: dict, keys) -> tuple[str, int | float] | None:
    """(key, value) of the first of `keys` config.json (or its text_config) sets to a number."""
    for c in (config, config.get("text_config") or {}):
        if not isinstance(c, dict):
            continue
        for k in keys:
            if isinstance(c.get(k), (int, float)) and not isinstance(c.get(k), bool):
                return k, c[k]
    return None


def config_value(config: dict, keys) -> object:
    item = config_item(config, keys)
    return None if item is None else item[1]


def _layer_number(prefix: str) -> tuple:
    """Sort key: the prefix's numbers in order (compared as numbers, however long), then itself."""
    return tuple((len(d.lstrip("0")), d.lstrip("0")) for d in re.findall(r"\d+", prefix)), prefix

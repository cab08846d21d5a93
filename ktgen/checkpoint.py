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
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import quant
from .formats import FORMATS

DTYPES = {"BF16": quant.bfloat16, "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8)}
PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_PER_EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)"
                         r"\.(?P<field>weight|qweight|qzeros|scales|weight_packed|weight_scale|weight_shape)$")
_FUSED = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint directory whose experts ktgen cannot read: named with the file or tensor."""


def read_header(path) -> tuple[dict, int]:
    """(header without __metadata__, data start) of a safetensors file, and its metadata under
    the key "__metadata__" of the returned dict when it has one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read its safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


@dataclass
class _Entry:
    file: Path
    dtype: np.dtype
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
    """The safetensors files of a checkpoint directory (one file, or shards listed by
    model.safetensors.index.json), its config.json, and the MoE layers found in them."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint: {self.directory} is not a directory")
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint: no *.safetensors file in {self.directory}")
        cfg = self.directory / "config.json"
        self.config: dict = json.loads(cfg.read_text()) if cfg.exists() else {}
        self.tensors: dict[str, _Entry] = {}
        for path in files:
            header, start = read_header(path)
            header.pop("__metadata__", None)
            for name, t in header.items():
                if t.get("dtype") not in DTYPES:
                    continue   # a dtype no expert layout uses (F8, BOOL, ...): not read here
                b, e = t["data_offsets"]
                self.tensors[name] = _Entry(path, DTYPES[t["dtype"]], tuple(t["shape"]), start + b, e - b)
        self.layers: dict[str, LayerKeys] = {}
        for name in self.tensors:
            m = _PER_EXPERT.match(name)
            if m:
                keys = self.layers.setdefault(m["prefix"], LayerKeys(m["prefix"]))
                keys.experts.setdefault((int(m["e"]), PROJ[m["proj"]]), {})[m["field"]] = name
                continue
            m = _FUSED.match(name)
            if m:
                self.layers.setdefault(m["prefix"], LayerKeys(m["prefix"])).fused[m["proj"]] = name

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name`, read into `out` when given (of its dtype and shape)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"checkpoint: no tensor {name!r} in {self.directory}")
        if out is None:
            out = np.empty(t.shape, t.dtype)
        elif out.dtype != t.dtype or out.shape != t.shape or not out.flags.c_contiguous:
            raise CheckpointError(f"checkpoint: {name} is {t.dtype} {t.shape}, expected {out.dtype} {out.shape}")
        if out.nbytes != t.nbytes:
            raise CheckpointError(f"checkpoint: {name} holds {t.nbytes} bytes for {t.dtype} {t.shape}")
        with open(t.file, "rb", buffering=0) as f:
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
            missing = [e for e in range(E) if (e, proj) not in keys.experts]
            if missing:
                raise CheckpointError(f"checkpoint: {keys.prefix}.experts.{missing[0]} has no {proj} "
                                      f"projection ({E} experts found)")
            names = [keys.experts[(e, proj)] for e in range(E)]
            if fmt == "awq":
                out.append(self._stack_quantized(names, ("qweight", "qzeros", "scales"), lambda q, z, s:
                           quant.from_autoawq(q, z, s, q.shape[0] // s.shape[0])))
            elif fmt == "k2":
                out.append(self._stack_quantized(names, ("weight_packed", "weight_scale", "weight_shape"),
                                                 quant.from_compressed_tensors))
            else:
                out.append(self._stack_float([n["weight"] for n in names], mode, group_size))
        return tuple(out)

    def _stack_quantized(self, names, fields, convert):
        parts = []
        for n in names:
            missing = [f for f in fields if f not in n]
            if missing:
                raise CheckpointError(f"checkpoint: {next(iter(n.values())).rsplit('.', 1)[0]} has no {missing[0]}")
            parts.append(convert(*(self.read(n[f]) for f in fields)))
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
PACK_INDEX = "ktgen-pack.json"


def config_value(config: dict, keys) -> object:
    for c in (config, config.get("text_config") or {}):
        for k in keys:
            if isinstance(c.get(k), (int, float)) and not isinstance(c.get(k), bool):
                return c[k]
    return None


def _layer_number(prefix: str) -> tuple:
    return tuple(int(d) for d in re.findall(r"\d+", prefix)), prefix


def pack(checkpoint_dir, out_dir, *, quant: str | None = None, group_size: int | None = None,
         isa: str | None = None, tp_count: int = 1, progress: bool = True) -> dict:
    """`ktgen pack`: every MoE experts layer of a checkpoint directory, one at a time, packed by
    the kernels of `isa` (default: this machine's auto tier) into OUT_DIR/<prefix>.safetensors,
    with OUT_DIR/ktgen-pack.json indexing them. quant: the checkpoint's own format by default
    (bf16 for float weights), or int8/awq/k2 to quantize float ones. Returns the index."""
    from .runtime import MoE
    from .spec import MoESpec
    ck = Checkpoint(checkpoint_dir)
    if not ck.layers:
        raise CheckpointError(f"checkpoint: no MoE experts in {ck.directory} (tensors named "
                              f"<prefix>.experts.<e>.gate_proj.weight and the like)")
    k = config_value(ck.config, TOP_K_KEYS)
    if not isinstance(k, int):
        raise CheckpointError(f"checkpoint: {ck.directory}/config.json names no top-k "
                              f"({', '.join(TOP_K_KEYS)})")
    limit = config_value(ck.config, ("swiglu_limit",))
    model_type = str(ck.config.get("model_type") or "hf")
    name = "hf_" + re.sub(r"[^a-z0-9_]", "_", model_type.lower())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": "ktgen-pack", "version": "1", "checkpoint": str(ck.directory.resolve()), "layers": {}}
    prefixes = sorted(ck.layers, key=_layer_number)
    try:
        from tqdm.auto import tqdm
        it = tqdm(prefixes, desc="ktgen pack", unit="layer", disable=not progress)
    except ImportError:  # tqdm comes with ktgen[torch]; without it, no bar
        it = prefixes
    for prefix in it:
        keys = ck.layers[prefix]
        mode = quant or ck.layer_format(keys)
        weights = ck.load_layer(keys, mode, group_size=group_size)
        E, I, H = weights[0].shape
        q = {"mode": mode}
        if FORMATS[mode].grouped:
            q["group_size"] = getattr(weights[0], "group_size", None) or group_size
        spec = MoESpec(name=name, expert_num=E, num_experts_per_tok=k, hidden_size=H,
                       intermediate_size=I, quant=q, tp_count=tp_count,
                       swiglu_limit=float(limit) if limit else None)
        moe = MoE(spec, *weights, isa=isa)
        del weights
        file = f"{prefix}.safetensors"
        moe.save_packed(out / file)
        index["layers"][prefix] = {"file": file, "layout": moe.packed_layout, "tier": moe.kernel.isa,
                                   "base_weights": moe.memory()["base_weights"]}
        moe.close()
        del moe
        trim_heap()
    (out / PACK_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index

"""Packed weight files (docs/design.md#packed-weight-files): a layer's base weights on disk in the
layout its kernels stream, so that a start maps them instead of packing.

A file is a safetensors file. Its tensors are raw bytes (dtype U8), the buffers a kernel's
``packed_buffers`` gives, named ``p{partition}.{gate|up|down}.{q|s|z|rowsum}``; its metadata names
the format and version, the kernel's ``packed_layout`` string, the spec (JSON) and the tier that
wrote it. The writer places the data at a 64-byte boundary of the file and every buffer but the
zeros at a 64-byte boundary of the data, so that a read-only mapping is aligned as the kernels'
own storage is. It streams each buffer from the kernel to the file (the safetensors library's
writer would copy the whole layer into Python bytes first, and cannot align), and the file reads
back with ``safetensors.safe_open`` like any other (tests/test_packed.py checks that).

A kernel whose ``packed_layout`` equals the file's attaches views of the mapping (no copy: the
processes of one host share the page cache). Any other (another tier's interleave, another
tp_count) gets the weights back in the formats of docs/design.md#base-weight-formats, exactly,
through ``unpack``, and packs them itself.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from . import checkpoint, quant
from .formats import FORMATS, unsplit  # noqa: F401 - unsplit is read by the tests
from ._version import __version__
from .spec import MoESpec

FORMAT, VERSION = "ktgen-packed", "1"
MATRICES = ("gate", "up", "down")
FIELDS = ("q", "s", "z", "rowsum")
ALIGN = 64


class PackedFileError(ValueError):
    """A file that is not a ktgen packed weight file of this version, or does not fit the spec."""


def buffer_name(partition: int, index: int) -> str:
    """The tensor name of buffer `index` (matrix index // 4, field index % 4) of a partition."""
    return f"p{partition}.{MATRICES[index // 4]}.{FIELDS[index % 4]}"


def write(path, buffers: list[tuple[str, object, int]], metadata: dict[str, str]) -> None:
    """Write (name, cffi pointer, bytes) buffers as one aligned safetensors file, atomically."""
    path = Path(path)
    # Aligned sizes first; the zeros (uint8, any length) last, where their offsets do not matter.
    order = sorted(buffers, key=lambda b: (b[2] % ALIGN != 0, b[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, _, n in order:
        header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)   # the data starts at a multiple of ALIGN
    from cffi import FFI
    ffi = FFI()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for _, ptr, n in order:
                f.write(ffi.buffer(ffi.cast("char *", ptr), n))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class PackedFile:
    """A packed weight file, mapped read-only. `metadata`, `spec`, `layout`, `tier`; `views(p)`:
    the 12 buffers of partition p as uint8 arrays of the mapping (None where the layout has
    none), in packed_buffers order."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            header, self._data_start = checkpoint.read_header(self.path)
        except (OSError, checkpoint.CheckpointError) as err:
            raise PackedFileError(f"{self.path}: cannot read a safetensors header ({err})") from None
        meta = header.pop("__metadata__", None) or {}
        if meta.get("format") != FORMAT:
            raise PackedFileError(f"{self.path}: not a ktgen packed weight file (metadata format "
                                  f"{meta.get('format')!r}; write one with `ktgen pack` or MoE.save_packed)")
        if meta.get("version") != VERSION:
            raise PackedFileError(f"{self.path}: packed format version {meta.get('version')!r}; this "
                                  f"ktgen reads version {VERSION} (pack the checkpoint again)")
        self.metadata = meta
        self.spec = MoESpec.model_validate_json(meta["spec"])
        self.layout = meta["layout"]
        self.tier = meta.get("tier", "?")
        self._header = header
        size = os.path.getsize(self.path)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self._data_start + end != size:
            raise PackedFileError(f"{self.path}: truncated or padded ({size} bytes, the header "
                                  f"describes {self._data_start + end})")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None
        self.params = layout_params(self.layout)

    def views(self, partition: int, experts: range | None = None) -> list[np.ndarray | None]:
        """experts: only those experts' part of each buffer (a contiguous run: the buffers hold
        the experts in order), from its start to the end of the buffer (the padding the kernels
        may read past their last panel is the next expert's data, or the buffer's own)."""
        per = json.loads(self.metadata["expert_bytes"])[partition] if experts is not None else None
        out = []
        for i in range(12):
            t = self._header.get(buffer_name(partition, i))
            if t is None:
                out.append(None)
                continue
            b, e = t["data_offsets"]
            if experts is not None:
                b += experts.start * per[i]
            out.append(self._map[self._data_start + b: self._data_start + e])
        return out

    def unpack(self) -> tuple:
        """The weights in docs/design.md#base-weight-formats (exactly what the kernels computed
        with): gate, up [E, I, H] and down [E, H, I], bf16 arrays or QuantizedWeights."""
        p = self.params
        return unpack([self.views(t) for t in range(p["tp_count"])], p)

    def check_spec(self, spec: MoESpec | None, experts: range | None = None) -> MoESpec:
        """`spec`, or the file's own; a given one must describe the same weights (with
        `experts`: those experts of the file's layer)."""
        mine = self.spec
        if experts is not None:
            if not (0 <= experts.start < experts.stop <= mine.expert_num) or experts.step != 1:
                raise PackedFileError(f"experts: {experts} is not a run of the {mine.expert_num} experts "
                                      f"of {self.path}")
            mine = mine.replace(expert_num=len(experts),
                                num_experts_per_tok=min(mine.num_experts_per_tok, len(experts)))
        if spec is None:
            return mine
        if not isinstance(spec, MoESpec):
            raise TypeError(f"spec: expected a ktgen.MoESpec, got {type(spec).__name__}")
        theirs = spec
        pairs = {"expert_num": (mine.expert_num, theirs.expert_num),
                 "hidden_size": (mine.hidden_size, theirs.hidden_size),
                 "intermediate_size": (mine.intermediate_size, theirs.intermediate_size),
                 "quant.mode": (mine.quant.mode, theirs.quant.mode),
                 "quant.group_size": (mine.quant.group_size, theirs.quant.group_size)}
        bad = [f"{k} {b!r} (the file's: {a!r})" for k, (a, b) in pairs.items() if a != b]
        if bad:
            raise PackedFileError(f"spec: does not describe the weights of {self.path}: {'; '.join(bad)}")
        return spec

    def close(self) -> None:
        self._map = None


def unpack(parts: list[list], params: dict) -> tuple:
    """The §6 weights of packed buffers (one list of 12 uint8 arrays per partition)."""
    E, H, I_full, tp = params["E"], params["H"], params["I"], params["tp_count"]
    mode, G, pack, split = params["mode"], params["group_size"], params["pack"], params.get("split", 0)
    fmt = FORMATS[mode]
    I = I_full // tp
    out = []
    for m, name in enumerate(MATRICES):
        rows, K = (I, H) if m < 2 else (H, I)
        per_part = [fmt.unpanel(bufs[4 * m: 4 * m + 3], fmt, E, rows, K, G, pack, split) for bufs in parts]
        axis = 1 if m < 2 else 2   # partitions split gate/up rows, down's K
        shape = (E, I_full, H) if m < 2 else (E, H, I_full)
        arrays = {}
        for key in per_part[0]:
            if key == "scales" and not fmt.grouped and m == 2:
                arrays[key] = np.ascontiguousarray(per_part[0][key])   # per row: every partition holds all of down's
            else:
                ax = 1 if key == "scales" and not fmt.grouped else axis
                arrays[key] = np.ascontiguousarray(np.concatenate([p[key] for p in per_part], axis=ax))
        if not fmt.arrays:
            out.append(arrays["q"])
        else:
            out.append(quant.QuantizedWeights(mode, arrays["q"], arrays["scales"], arrays.get("zeros"), shape,
                                              G if fmt.grouped else None))
    return tuple(out)


def metadata(spec: MoESpec, layout: str, tier: str, expert_bytes: list[list[int]]) -> dict[str, str]:
    """The file's metadata; expert_bytes: per partition, each buffer's bytes per expert."""
    return {"format": FORMAT, "version": VERSION, "layout": layout, "spec": spec.model_dump_json(),
            "tier": tier, "expert_bytes": json.dumps(expert_bytes), "ktgen": __version__}


def layout_params(layout: str) -> dict:
    """A packed_layout string's fields: mode (str), group_size, pack, E, H, I, tp_count, panel,
    and split where a panel row's columns are stored split (unsplit; int4 files without it hold
    columns 2b, 2b + 1 in byte b)."""
    fields = dict(item.split("=", 1) for item in layout.split()[2:])
    return {k: v if k == "mode" else int(v) for k, v in fields.items()}


def layout_for(layout: str, experts: int) -> str:
    """The layout string of a layer of `experts` experts with the same packing."""
    return " ".join(f"E={experts}" if item.startswith("E=") else item for item in layout.split())

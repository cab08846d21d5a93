"""Packed weight files (docs/design.md#packed-weight-files): a layer's base weights on disk in the
layout its kernels stream, so that a start maps them instead of packing.

A file is a safetensors file. Its tensors are raw bytes (dtype U8), the buffers a kernel's
``packed_buffers`` gives, named ``p{partition}.{gate|up|down}.{q|s|z|rowsum}``; its metadata names
the format and version, the kernel's ``packed_layout`` string, the spec (JSON) and the tier that
wrote it. The writer places the data at a 64-byte boundary of the file and every buffer but the
zeros at a 64-byte boundary of the data, so that a read-only mapping is aligned as the kernels'
own storage is. It streams each buffer from the kernel to the file (the safetensors library's
writer would copy the whole layer into Python bytes first, and cannot align), and the file reads
back with ``safetensors.safe_open`` like any other (tests/system/test_packed.py checks that).

A kernel whose ``packed_layout`` equals the file's attaches views of the mapping (no copy: the
processes of one host share the page cache). Any other (another tier's interleave, another
tp_count) gets the weights back in the formats of docs/design.md#base-weight-formats, exactly,
through ``unpack``, and packs them itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from . import checkpoint, files, quant
from .formats import FORMATS, unsplit  # noqa: F401 - unsplit is read by the tests
from .kernels import KERNEL_SETS, TIERS
from ._version import __version__
from .spec import MoESpec, SpecError

FORMAT, VERSION = "ktgen-packed", "1"
MATRICES = ("gate", "up", "down")
FIELDS = ("q", "s", "z", "rowsum")
ALIGN = 64
DIGEST = "header_sha256"   # the metadata key of the header's digest
# The packed_layout string: "ktgen-packed 1" then these fields (and split, where a layout has one).
LAYOUT_FIELDS = ("mode", "group_size", "pack", "E", "H", "I", "tp_count", "panel")
PANEL = 32
# Per quant mode, the interleaves (pack) and split fields (0: none) of the kernels' layouts
# (files written before the int4 split: split 0).
PACKS = {m: tuple(sorted({1} | {k.pack_of(m) for k in KERNEL_SETS.values()})) for m in FORMATS}
SPLITS = {m: tuple(sorted({0, f.split} | {t.split.get(m, 0) for t in TIERS.values()})) for m, f in FORMATS.items()}


class PackedFileError(ValueError):
    """A file that is not a ktgen packed weight file of this version, or does not fit the spec."""


def buffer_name(partition: int, index: int) -> str:
    """The tensor name of buffer `index` (matrix index // 4, field index % 4) of a partition."""
    return f"p{partition}.{MATRICES[index // 4]}.{FIELDS[index % 4]}"


def header_digest(metadata: dict[str, str], tensors: dict[str, tuple]) -> str:
    """SHA-256 of a header's metadata (but the digest itself) and its tensors' (dtype, shape,
    begin, end), in a canonical JSON form: a file whose header was changed after it was
    written no longer matches it."""
    body = {"metadata": {k: v for k, v in metadata.items() if k != DIGEST},
            "tensors": {name: list(t) for name, t in tensors.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write(path, buffers: list[tuple[str, object, int]], metadata: dict[str, str]) -> None:
    """Write (name, cffi pointer, bytes) buffers as one aligned safetensors file, atomically."""
    # Aligned sizes first; the zeros (uint8, any length) last, where their offsets do not matter.
    order = sorted(buffers, key=lambda b: (b[2] % ALIGN != 0, b[0]))
    tensors: dict[str, tuple] = {}
    offset = 0
    for name, _, n in order:
        tensors[name] = ("U8", [n], offset, offset + n)
        offset += n
    meta = dict(metadata)
    meta[DIGEST] = header_digest(meta, tensors)
    header: dict[str, object] = {"__metadata__": meta}
    header.update({name: {"dtype": d, "shape": shape, "data_offsets": [b, e]}
                   for name, (d, shape, b, e) in tensors.items()})
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)   # the data starts at a multiple of ALIGN
    from cffi import FFI
    ffi = FFI()
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, ptr, n in order:
            f.write(ffi.buffer(ffi.cast("char *", ptr), n))


class PackedFile:
    """A packed weight file, checked and mapped read-only. `metadata`, `spec`, `layout`,
    `params` (layout_params), `tier`; `views(p)`: the 12 buffers of partition p as uint8 arrays
    of the mapping (None where the layout has none), in packed_buffers order.

    Everything the header states is checked before anything is mapped: the safetensors
    structure (checkpoint.read_header: dtypes, shapes and offsets agree, the tensors tile the
    data with no overlap, the file ends where the data does), the metadata (format, version,
    the header's digest, a layout string of this format, a spec, expert_bytes), the layout
    against the spec (E, H, I, tp_count, quant mode and group size), and every tensor against
    the layout: exactly the buffers its kernels have, U8, 1-D, each of the byte count its
    kernels read (store_sizes), 64-byte aligned in the file but the zeros. Anything else is a
    PackedFileError naming the field or tensor."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            header = checkpoint.read_header(self.path)
        except checkpoint.CheckpointError as err:
            raise PackedFileError(str(err)) from None
        meta = header.metadata
        if meta.get("format") != FORMAT:
            raise PackedFileError(f"{self.path}: not a ktgen packed weight file (metadata format "
                                  f"{meta.get('format')!r:.40}; write one with `ktgen pack` or MoE.save_packed)")
        if meta.get("version") != VERSION:
            raise PackedFileError(f"{self.path}: packed format version {meta.get('version')!r:.40}; this "
                                  f"ktgen reads version {VERSION} (pack the checkpoint again)")
        tensors = {n: (t.dtype, list(t.shape), t.begin, t.end) for n, t in header.tensors.items()}
        if DIGEST in meta and meta[DIGEST] != header_digest(meta, tensors):
            raise PackedFileError(f"{self.path}: metadata {DIGEST}: the header was changed after the file "
                                  f"was written (its digest does not match)")
        for key in ("layout", "spec", "expert_bytes"):
            if key not in meta:
                raise PackedFileError(f"{self.path}: metadata has no {key!r}")
        self.metadata = meta
        self.layout = meta["layout"]
        self.params = layout_params(self.layout, f"{self.path}: metadata layout")
        self.spec = self._spec(meta["spec"])
        self.tier = meta.get("tier", "?")
        self._check_tensors(header)
        self._data_start = header.data_start
        self._tensors = header.tensors
        with files.open_regular(self.path, PackedFileError, "packed weight file") as f:
            self._map = np.memmap(f, dtype=np.uint8, mode="r")

    def _spec(self, text: str) -> MoESpec:
        """The metadata's spec, which must describe the layout's weights."""
        try:
            spec = MoESpec.model_validate_json(text)
        except SpecError as err:   # invalid JSON, a missing field, a broken rule
            raise PackedFileError(f"{self.path}: metadata spec: not a valid ktgen spec "
                                  f"({'; '.join(str(err).splitlines())[:300]})") from None
        p = self.params
        pairs = {"expert_num": (spec.expert_num, p["E"]), "hidden_size": (spec.hidden_size, p["H"]),
                 "intermediate_size": (spec.intermediate_size, p["I"]), "tp_count": (spec.tp_count, p["tp_count"]),
                 "quant.mode": (spec.quant.mode, p["mode"]),
                 "quant.group_size": (spec.quant.group_size or 0, p["group_size"])}
        bad = [f"{k} {a!r} (the layout's: {b!r})" for k, (a, b) in pairs.items() if a != b]
        if bad:
            raise PackedFileError(f"{self.path}: metadata spec does not describe the layout's weights: "
                                  f"{'; '.join(bad)}")
        return spec

    def _check_tensors(self, header) -> None:
        where = self.path
        sizes = store_sizes(self.params)
        tp = self.params["tp_count"]
        try:
            expert_bytes = json.loads(self.metadata["expert_bytes"])
        except ValueError:
            expert_bytes = None
        want = [[per for _, per in sizes] for _ in range(tp)]
        if expert_bytes != want:
            raise PackedFileError(f"{where}: metadata expert_bytes {self.metadata['expert_bytes']!r:.120} is "
                                  f"not the layout's bytes per expert of each buffer, {json.dumps(want[0])} "
                                  f"per partition")
        expected = {buffer_name(t, i): n for t in range(tp) for i, (n, _) in enumerate(sizes) if n}
        unknown = sorted(set(header.tensors) - set(expected))
        if unknown:
            raise PackedFileError(f"{where}: tensor {unknown[0]!r:.80} is not a buffer of layout {self.layout!r}")
        missing = sorted(set(expected) - set(header.tensors), key=list(expected).index)
        if missing:
            raise PackedFileError(f"{where}: tensor {missing[0]} is missing (layout {self.layout!r} has it)")
        for name, n in expected.items():
            t = header.tensors[name]
            if t.dtype != "U8" or len(t.shape) != 1:
                raise PackedFileError(f"{where}: tensor {name} is {t.dtype} {list(t.shape)}, expected U8 [{n}]")
            if t.end - t.begin != n:
                raise PackedFileError(f"{where}: tensor {name} holds {t.end - t.begin} bytes; the kernels of "
                                      f"layout {self.layout!r} read {n}")
            if (header.data_start + t.begin) % ALIGN and not name.endswith(".z"):
                raise PackedFileError(f"{where}: tensor {name} starts at byte {header.data_start + t.begin} "
                                      f"of the file, not at a multiple of {ALIGN}")

    def views(self, partition: int, experts: range | None = None) -> list[np.ndarray | None]:
        """Each buffer exactly as the kernels of the layout read it; with `experts` (a run
        check_spec accepted), the buffers of a layer of those experts: from their first byte,
        their bytes and the padding the kernels read past their last panel (the next expert's
        data, or the buffer's own)."""
        E = self.params["E"]
        out = []
        for i, (n, per) in enumerate(store_sizes(self.params)):
            if not n:
                out.append(None)
                continue
            b = self._data_start + self._tensors[buffer_name(partition, i)].begin
            if experts is not None:
                b += experts.start * per
                n -= (E - len(experts)) * per
            out.append(self._map[b: b + n])
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
            if (not isinstance(experts, range) or experts.step != 1
                    or not (0 <= experts.start < experts.stop <= mine.expert_num)):
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


def store_sizes(params: dict) -> list[tuple[int, int]]:
    """(bytes, bytes per expert) of each of a partition's 12 buffers in a layout (layout_params),
    as the kernels' store_bytes gives them: per projection the payload (with the padding an
    int8-quads kernel reads past the last panel when K is not a multiple of 64), the scales,
    the zeros and the row sums; (0, 0) where the layout has none."""
    E, H, tp, P = params["E"], params["H"], params["tp_count"], params["panel"]
    G, pack = params["group_size"], params["pack"]
    fmt = FORMATS[params["mode"]]
    I = params["I"] // tp
    out = []
    for m in range(3):
        rows, K = (I, H) if m < 2 else (H, I)
        panels = E * (rows // P)
        pad = (8 * 4 * P if K % 64 else 0) if pack == 4 else 0
        q, s, z = (panels * n for n in fmt.panel_bytes(K, G))
        r = panels * P * 4 if pack == 4 else 0
        out += [(q + pad, q // E), (s, s // E), (z, z // E), (r, r // E)]
    return out


def unpack(parts: list[list], params: dict) -> tuple:
    """The base-format weights (docs/design.md#base-weight-formats) of packed buffers (one list of 12 uint8 arrays per partition, each at
    least store_sizes long)."""
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


def layout_params(layout: str, where: str = "layout") -> dict:
    """A packed_layout string's fields: mode (str), group_size, pack, E, H, I, tp_count, panel,
    and split where a panel row's columns are stored split (unsplit; int4 files without it hold
    columns 2b, 2b + 1 in byte b). A string that is not a layout of this format, or whose
    fields no kernel has, is a PackedFileError naming `where`."""
    if not isinstance(layout, str):
        raise PackedFileError(f"{where}: expected a layout string, got {type(layout).__name__}")
    words = layout.split()
    if words[:2] != [FORMAT, VERSION]:
        raise PackedFileError(f"{where}: {layout!r:.120} is not a {FORMAT} {VERSION} layout string")
    fields: dict[str, str] = {}
    for item in words[2:]:
        key, eq, value = item.partition("=")
        if not eq or key in fields or key not in LAYOUT_FIELDS + ("split",):
            raise PackedFileError(f"{where}: {item!r:.60} is not a field of a layout (or comes twice): "
                                  f"{', '.join(LAYOUT_FIELDS)}, split")
        fields[key] = value
    missing = [k for k in LAYOUT_FIELDS if k not in fields]
    if missing:
        raise PackedFileError(f"{where}: the layout has no {missing[0]} field")
    mode = fields.pop("mode")
    if mode not in PACKS:
        raise PackedFileError(f"{where}: mode {mode!r:.40} is not a quant mode ({', '.join(PACKS)})")
    p: dict = {"mode": mode}
    for key, value in fields.items():
        if not re.fullmatch(r"[0-9]{1,12}", value):
            raise PackedFileError(f"{where}: {key}={value:.40} is not a whole number")
        p[key] = int(value)
    E, H, I, tp, G = p["E"], p["H"], p["I"], p["tp_count"], p["group_size"]
    fmt = FORMATS[mode]
    problems = [
        (p["panel"] != PANEL, f"panel={p['panel']}: the kernels' panels are {PANEL} rows"),
        (E < 1 or tp < 1, "E and tp_count must be at least 1"),
        (H < 1 or H % PANEL, f"H={H} is not a positive multiple of {PANEL}"),
        (I < 1 or I % (PANEL * max(tp, 1)), f"I={I} is not a positive multiple of {PANEL} x tp_count"),
        (p["pack"] not in PACKS[mode], f"pack={p['pack']}: a {mode} layout packs by {PACKS[mode]}"),
        (p.get("split", 0) not in SPLITS[mode] or (p.get("split") and mode == "bf16" and p["pack"] != 1),
         f"split={p.get('split')}: not a split of a {mode} layout with pack={p['pack']}"),
        (not fmt.grouped and G != 0, f"group_size={G}: a {mode} layout is not grouped"),
        (fmt.grouped and (G < 1 or H % G or (I // max(tp, 1)) % G),
         f"group_size={G} does not divide H={H} and I / tp_count"),
    ]
    bad = next((msg for failed, msg in problems if failed), None)
    if bad:
        raise PackedFileError(f"{where}: {bad}")
    return p


def layout_for(layout: str, experts: int) -> str:
    """The layout string of a layer of `experts` experts with the same packing."""
    return " ".join(f"E={experts}" if item.startswith("E=") else item for item in layout.split())

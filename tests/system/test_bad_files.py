"""Every bad file ktgen reads and what it gets, one test per row of docs/bad_files.md.

Packed weight files, pack directories (`ktgen pack` output), Hugging Face checkpoints and PEFT
adapters come from elsewhere: each case below is one such file gone wrong, by accident or on
purpose, and what the caller gets (a ktgen error naming the file and the field, or for a benign
change the right result). A packed file's header carries a digest of itself; the cases that
change a header also recompute it, as a hostile writer would, so that each reaches the check it
is about (one case leaves it stale). CASES works as in test_bad_inputs.py (helpers.case_list),
and test_docs_table_matches_cases keeps docs/bad_files.md equal to it. Regenerate the table with

    python tests/system/test_bad_files.py > docs/bad_files.md
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # `python tests/system/test_bad_files.py` prints the docs table
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import numpy as np
import pytest

import ktgen
from ktgen import checkpoint, pack, packed
from helpers import bf16, case_list, check_cases_doc, make_inputs, make_weights, pack_autoawq, rel_spec, run_case, table

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad_files.md"
CASES, case = case_list()


# ---- safetensors files as a header (with __metadata__) and the data's bytes ----

def read_st(path) -> tuple[dict, bytes]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path, header: dict, data: bytes, align: int = packed.ALIGN, extra: int = 0) -> Path:
    """The header padded with spaces so that the data starts at a multiple of `align`, then
    `extra` spaces more."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align + extra)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return Path(path)


def lay_out(tensors: dict, metadata: dict | None = None) -> tuple[dict, bytes]:
    """(header, data) of tensors name -> (dtype, shape, bytes), one after another in that order."""
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def split_tensors(header: dict, data: bytes) -> dict:
    return {n: (t["dtype"], t["shape"], data[t["data_offsets"][0]:t["data_offsets"][1]])
            for n, t in header.items() if n != "__metadata__"}


def restamp(header: dict) -> None:
    """Recompute a packed file header's digest, as a writer of hostile files would."""
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and packed.DIGEST in meta:
        tensors = {n: (t.get("dtype"), t.get("shape"), *(list(t.get("data_offsets") or []) + [None, None])[:2])
                   for n, t in header.items() if n != "__metadata__" and isinstance(t, dict)}
        meta[packed.DIGEST] = packed.header_digest(meta, tensors)


# ---- what the cases share ----

@dataclass
class Files:
    packed: Path          # a rel_small layer's packed file (E=4, H=64, I=64)
    inputs: tuple         # x, ids, rw for its forward
    want: np.ndarray      # the bits of that forward, from the unchanged file (LoRA zero)
    ckpt: Path            # a tiny checkpoint: 2 layers of 4 experts, config.json, bf16
    ckpt_tensors: dict    # its tensors, name -> array
    other_ckpt: Path      # the same architecture, other weights
    pack: Path            # `ktgen pack` of ckpt
    other_pack: Path      # `ktgen pack` of other_ckpt
    adapter: Path         # save_adapter of a two-layer model (None without torch)


@dataclass
class Ctx:
    files: Files
    monkeypatch: pytest.MonkeyPatch
    tmp_path: Path


def forward_bits(path, **kw) -> np.ndarray:
    moe = ktgen.MoE.from_packed(path, **kw)
    out = moe.forward(*_FILES.inputs).view(np.uint16).copy()
    moe.close()
    return out


# ---- packed weight files ----

def packed_case(id, what, raises, fragment, mutate, stamp=True, extra=0, **load):
    """A case of the packed file with `mutate(header, data)` applied (returning a new (header,
    data) or changing the header in place; `extra` spaces more after the header), loaded by
    MoE.from_packed(**load) and run."""
    def run(ctx):
        header, data = read_st(ctx.files.packed)
        changed = mutate(header, data)
        if changed is not None:
            header, data = changed
        if stamp:
            restamp(header)
        path = write_st(ctx.tmp_path / "layer.safetensors", header, data, extra=extra)
        got = forward_bits(path, **{k: v() if callable(v) else v for k, v in load.items()})
        assert np.array_equal(got, ctx.files.want)   # a benign change: the same result
    case(id, what, raises, fragment)(run)


def spec_field(**fields):
    def mutate(header, data):
        spec = json.loads(header["__metadata__"]["spec"])
        spec.update(fields)
        header["__metadata__"]["spec"] = json.dumps(spec)
    return mutate


def set_meta(key, value):
    def mutate(header, data):
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value
    return mutate


def layout_sub(old, new):
    def mutate(header, data):
        layout = header["__metadata__"]["layout"]
        assert old in layout, layout
        header["__metadata__"]["layout"] = layout.replace(old, new)
    return mutate


def offsets(name, value, shape=None):
    def mutate(header, data):
        header[name]["data_offsets"] = value
        if shape is not None:
            header[name]["shape"] = shape
    return mutate


def tensors(fn):
    """A mutation of the tensors (name -> (dtype, shape, bytes)), laid out again as the writer
    does: 64-byte multiples first, by name."""
    def mutate(header, data):
        ts = split_tensors(header, data)
        fn(ts)
        order = dict(sorted(ts.items(), key=lambda kv: (len(kv[1][2]) % packed.ALIGN != 0, kv[0])))
        return lay_out(order, header["__metadata__"])
    return mutate


E4096 = "expert_num 4096 (the layout's: 4)"
packed_case("packed-spec-expert_num", "metadata spec says E = 4096 over buffers of 4 experts",
            packed.PackedFileError, E4096, spec_field(expert_num=4096))
packed_case("packed-spec-expert_num-tp2", "the same, loaded at tp_count 2 (the repacking path)",
            packed.PackedFileError, E4096, spec_field(expert_num=4096), spec=lambda: rel_spec(2))
packed_case("packed-spec-expert_num-8", "metadata spec says E = 8 over buffers of 4", packed.PackedFileError,
            "expert_num 8 (the layout's: 4)", spec_field(expert_num=8))
packed_case("packed-spec-hidden_size", "metadata spec says H = 4096 over a smaller file", packed.PackedFileError,
            "hidden_size 4096 (the layout's: 64)", spec_field(hidden_size=4096))
packed_case("packed-layout-expert_num", "layout string says E=1 (the spec 4)", packed.PackedFileError,
            "expert_num 4 (the layout's: 1)", layout_sub("E=4", "E=1"))
packed_case("packed-layout-and-spec-expert_num", "layout and spec both say E=8 over buffers of 4",
            packed.PackedFileError, "tensor p0.gate.q holds 32768 bytes; the kernels of layout …E=8… read 65536",
            lambda h, d: (layout_sub("E=4", "E=8")(h, d), spec_field(expert_num=8)(h, d)) and None)
packed_case("packed-offsets-last-64", "a tensor's offsets and shape point at the file's last 64 bytes",
            packed.PackedFileError, "starts at data offset 98240, where 65536 was expected (the data has a gap)",
            offsets("p0.up.q", [98240, 98304], [64]))
packed_case("packed-offsets-reversed", "a tensor's data_offsets reversed", packed.PackedFileError,
            "tensor 'p0.up.q': data_offsets [98304, 65536] is not [begin, end] with 0 <= begin <= end",
            offsets("p0.up.q", [98304, 65536]))
packed_case("packed-offsets-negative", "a negative data offset", packed.PackedFileError,
            "data_offsets [-100, 98304] is not [begin, end]", offsets("p0.up.q", [-100, 98304]))
packed_case("packed-offsets-overlap", "down's offsets are gate's (down would read gate's bytes)",
            packed.PackedFileError, "tensor 'p0.gate.q' (data 32768 .. 65536) overlaps tensor 'p0.down.q'",
            offsets("p0.down.q", [32768, 65536]))
packed_case("packed-offsets-past-end", "the last tensor's offsets run past the end of the file",
            packed.PackedFileError, "truncated or padded (", offsets("p0.up.q", [65536, 98368], [32832]))
packed_case("packed-shape-offsets-disagree", "a tensor's shape does not match its offsets", packed.PackedFileError,
            "tensor 'p0.up.q': U8 (100,) is 100 bytes, but its data_offsets 65536 .. 98304 hold 32768",
            offsets("p0.up.q", [65536, 98304], [100]))
for _id, _v in (("huge", 10 ** 9), ("negative", -100000), ("one", 1)):
    packed_case(f"packed-expert_bytes-{_id}", f"metadata expert_bytes {_v} (read by an expert run)",
                packed.PackedFileError, "is not the layout's bytes per expert of each buffer, [8192, 0, 0, 0",
                set_meta("expert_bytes", json.dumps([[_v, 0, 0, 0] * 3])),
                spec=lambda: rel_spec(1).replace(expert_num=2), experts=range(1, 3))
packed_case("packed-expert_bytes-not-json", "metadata expert_bytes not JSON", packed.PackedFileError,
            "metadata expert_bytes 'nope' is not the layout's", set_meta("expert_bytes", "nope"))
for _key in ("spec", "layout", "expert_bytes"):
    packed_case(f"packed-meta-no-{_key}", f"metadata without `{_key}`", packed.PackedFileError,
                f"metadata has no '{_key}'", set_meta(_key, None))
packed_case("packed-meta-spec-missing-field", "metadata spec without expert_num", packed.PackedFileError,
            "metadata spec: not a valid ktgen spec (field 'expert_num': Field required)",
            lambda h, d: h["__metadata__"].update(spec=json.dumps(
                {k: v for k, v in json.loads(h["__metadata__"]["spec"]).items() if k != "expert_num"})))
packed_case("packed-meta-spec-not-json", "metadata spec not JSON", packed.PackedFileError,
            "metadata spec: not a valid ktgen spec (field '': Invalid JSON", set_meta("spec", "{not json"))
packed_case("packed-meta-spec-not-object", "metadata spec a JSON list", packed.PackedFileError,
            "metadata spec: not a valid ktgen spec (field '': Input should be an object)", set_meta("spec", "[1, 2]"))
packed_case("packed-meta-spec-wrong-type", "metadata spec with expert_num \"4\"", packed.PackedFileError,
            "metadata spec: not a valid ktgen spec (field 'expert_num'", spec_field(expert_num="4"))
packed_case("packed-meta-spec-rule", "metadata spec breaking a spec rule (H = 48)", packed.PackedFileError,
            "metadata spec: not a valid ktgen spec (field 'hidden_size'", spec_field(hidden_size=48))
packed_case("packed-meta-not-strings", "a metadata value that is not a string (layout: 5)",
            packed.PackedFileError, "__metadata__ is not a JSON object of strings", set_meta("layout", 5))
packed_case("packed-layout-not-layout", "a layout string of another format", packed.PackedFileError,
            "metadata layout: 'garbage' is not a ktgen-packed 1 layout string", set_meta("layout", "garbage"))
packed_case("packed-layout-unknown-field", "a layout string with a field no layout has", packed.PackedFileError,
            "metadata layout: 'rows=3' is not a field of a layout", layout_sub("panel=32", "panel=32 rows=3"))
packed_case("packed-layout-pack", "a layout string with an interleave no kernel has (pack=3)",
            packed.PackedFileError, "metadata layout: pack=3: a bf16 layout packs by (1, 2)",
            lambda h, d: h["__metadata__"].update(layout=" ".join(
                "pack=3" if w.startswith("pack=") else w for w in h["__metadata__"]["layout"].split())))
packed_case("packed-layout-not-number", "a layout field that is not a number (E=four)", packed.PackedFileError,
            "metadata layout: E=four is not a whole number", layout_sub("E=4", "E=four"))
packed_case("packed-tensor-missing", "a buffer of the layout missing (the data laid out without it)",
            packed.PackedFileError, "tensor p0.up.q is missing", tensors(lambda ts: ts.pop("p0.up.q")))
packed_case("packed-tensor-unknown", "a tensor that is no buffer of the layout", packed.PackedFileError,
            "tensor 'p0.gate.x' is not a buffer of layout",
            tensors(lambda ts: ts.update({"p0.gate.x": ("U8", [64], bytes(64))})))
packed_case("packed-tensor-dtype", "a buffer stored as F32", packed.PackedFileError,
            "tensor p0.up.q is F32 [8192], expected U8 [32768]",
            tensors(lambda ts: ts.update({"p0.up.q": ("F32", [8192], ts["p0.up.q"][2])})))
packed_case("packed-tensor-short", "a buffer 64 bytes short (shape and offsets agreeing)", packed.PackedFileError,
            "tensor p0.up.q holds 32704 bytes; the kernels of layout",
            tensors(lambda ts: ts.update({"p0.up.q": ("U8", [32704], ts["p0.up.q"][2][:32704])})))
packed_case("packed-unaligned", "the data not at a 64-byte boundary (8 spaces more after the header)",
            packed.PackedFileError, "starts at byte …, not at a multiple of 64", lambda h, d: None, extra=8)
packed_case("packed-header-changed", "a header changed after writing, its digest left as it was",
            packed.PackedFileError, "metadata header_sha256: the header was changed after the file was written",
            spec_field(max_len=32), stamp=False)
packed_case("packed-benign-tier", "metadata tier changed (and the digest with it)", None,
            "the file loads; the forward is the unchanged file's, bit for bit",
            set_meta("tier", "somewhere else"))


@case("packed-fifo", "a FIFO where the packed file should be", packed.PackedFileError,
      "layer.safetensors: this safetensors file is not a regular file (a FIFO)")
def _(ctx):
    os.mkfifo(ctx.tmp_path / "layer.safetensors")
    ktgen.MoE.from_packed(ctx.tmp_path / "layer.safetensors")


@case("packed-header-length-huge", "a header length of 2**40 bytes", packed.PackedFileError,
      "not a safetensors file (a header of 1099511627776 bytes in a file of")
def _(ctx):
    data = ctx.files.packed.read_bytes()
    (ctx.tmp_path / "l.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    ktgen.MoE.from_packed(ctx.tmp_path / "l.safetensors")


@case("packed-header-not-json", "a header that is not JSON", packed.PackedFileError,
      "cannot read its safetensors header")
def _(ctx):
    data = bytearray(ctx.files.packed.read_bytes())
    data[8] = ord("[") ^ 0x80
    (ctx.tmp_path / "l.safetensors").write_bytes(bytes(data))
    ktgen.MoE.from_packed(ctx.tmp_path / "l.safetensors")


# ---- pack directories (`ktgen pack` output) ----

def pack_copy(ctx, source=None) -> tuple[Path, dict]:
    d = ctx.tmp_path / "pack"
    shutil.copytree(source or ctx.files.pack, d)
    return d, json.loads((d / pack.PACK_INDEX).read_text())


def write_index(d: Path, index) -> None:
    (d / pack.PACK_INDEX).write_text(index if isinstance(index, str) else json.dumps(index))


def load_pack(d: Path) -> None:
    """What patch_model(checkpoint=d) reads of a pack directory before any layer is built."""
    index = pack.PackIndex.read(d)
    index.source()
    for prefix in index.layers:
        index.layer_file(prefix).close()


L0, L1 = "model.layers.0.mlp", "model.layers.1.mlp"


def index_case(id, what, fragment, mutate):
    """A case of the pack directory with mutate(directory, index) applied to a copy."""
    def run(ctx):
        d, index = pack_copy(ctx)
        changed = mutate(ctx, d, index)
        write_index(d, index if changed is None else changed)
        load_pack(d)
    case(id, what, checkpoint.CheckpointError, fragment)(run)


def set_file(name):
    def mutate(ctx, d, index):
        index["layers"][L0]["file"] = name(ctx) if callable(name) else name
    return mutate


OUTSIDE = "is not a file name inside …pack (absolute paths and '..' are refused)"
index_case("pack-file-absolute", "a layer's `file` an absolute path (another pack's file)", OUTSIDE,
           set_file(lambda ctx: str(ctx.files.other_pack / f"{L0}.safetensors")))
index_case("pack-file-dotdot", "a layer's `file` `../other/<file>`", OUTSIDE, set_file(f"../other/{L0}.safetensors"))
index_case("pack-file-etc-passwd", "a layer's `file` `../../../etc/passwd`", OUTSIDE, set_file("../../../etc/passwd"))


def _symlink_out(ctx, d, index):
    os.unlink(d / f"{L0}.safetensors")
    os.symlink(ctx.files.other_pack / f"{L0}.safetensors", d / f"{L0}.safetensors")


index_case("pack-file-symlink-out", "a layer's file a symlink to another pack's file",
           f"'{L0}.safetensors' leads out of …pack (a symlink to", _symlink_out)


def _fifo(ctx, d, index):
    os.mkfifo(d / "fifo")
    index["layers"][L0]["file"] = "fifo"


index_case("pack-file-fifo", "a layer's file a FIFO (open() would hang)", "pack/fifo is not a regular file (a FIFO)",
           _fifo)
index_case("pack-file-missing", "a layer's file missing", "pack/gone.safetensors is missing",
           set_file("gone.safetensors"))
index_case("pack-file-not-string", "a layer's `file` a number", f"layers.{L0}: expected an object with a file name",
           set_file(5))
index_case("pack-index-no-file", "a layer entry without `file`", f"layers.{L0}: expected an object with a file name",
           lambda ctx, d, index: index["layers"][L0].pop("file") and None)
index_case("pack-index-not-json", "ktgen-pack.json not JSON", "ktgen-pack.json: this pack index is not valid JSON",
           lambda ctx, d, index: "{not json")
index_case("pack-index-list", "ktgen-pack.json a JSON list", "ktgen-pack.json: expected a JSON object, got list",
           lambda ctx, d, index: [1, 2])
index_case("pack-index-layers-list", "ktgen-pack.json's layers a list",
           "layers: expected a JSON object of layer prefix -> entry", lambda ctx, d, index: index.update(layers=[]))
index_case("pack-index-version-1", "an index of version 1 (no checkpoint identity)",
           "version '1': this ktgen reads version 2", lambda ctx, d, index: index.update(version="1"))


def _other_checkpoint(ctx, d, index):
    index["checkpoint"] = str(ctx.files.other_ckpt)


index_case("pack-other-checkpoint", "the index's `checkpoint` pointing at another checkpoint (same "
           "architecture, other weights)", "was packed from checkpoint … at …other_ckpt, but …other_ckpt now "
           "holds checkpoint", _other_checkpoint)


def _swapped(ctx, d, index):
    a, b = index["layers"][L0]["file"], index["layers"][L1]["file"]
    index["layers"][L0]["file"], index["layers"][L1]["file"] = b, a


index_case("pack-layers-swapped", "two layers' files swapped in the index",
           f"holds layer '{L1}' of checkpoint '…', but …ktgen-pack.json names it for layer '{L0}'", _swapped)


def _foreign_file(ctx, d, index):
    shutil.copy(ctx.files.other_pack / f"{L0}.safetensors", d / f"{L0}.safetensors")


index_case("pack-file-of-another-pack", "a layer's file replaced by the same layer of another checkpoint's pack",
           f"holds layer '{L0}' of checkpoint '…', but …names it for layer '{L0}' of checkpoint", _foreign_file)


@case("pack-index-fifo", "ktgen-pack.json a FIFO", checkpoint.CheckpointError,
      "ktgen-pack.json: this pack index is not a regular file (a FIFO)")
def _(ctx):
    d = ctx.tmp_path / "pack"
    d.mkdir()
    os.mkfifo(d / pack.PACK_INDEX)
    load_pack(d)


# ---- checkpoints ----

CK_CONFIG = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "hidden_size": 64}
DTYPE_NAMES = {bf16: "BF16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
               np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}


def ckpt_tensors(seed: int) -> dict:
    """Two MoE layers of 4 experts (H = I = 64, bf16) and the tensors of the rest of a model."""
    rng = np.random.default_rng(seed)
    out = {"model.norm.weight": (1 + 0.1 * rng.standard_normal(64, np.float32)).astype(bf16)}
    for layer in (0, 1):
        out[f"model.layers.{layer}.mlp.gate.weight"] = rng.standard_normal((4, 64), np.float32).astype(bf16)
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = (
                    0.1 * rng.standard_normal((64, 64), np.float32)).astype(bf16)
    return out


def st_entries(arrays: dict) -> dict:
    return {n: (DTYPE_NAMES[a.dtype], a.shape, np.ascontiguousarray(a).tobytes()) for n, a in arrays.items()}


def write_ckpt(d: Path, arrays: dict, config=CK_CONFIG, name="model.safetensors") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    write_st(d / name, *lay_out(st_entries(arrays)), align=8)
    return d


def load_ckpt(d: Path) -> checkpoint.Checkpoint:
    """What `ktgen pack` and patch_model(checkpoint=) read: every layer's experts."""
    ck = checkpoint.Checkpoint(d)
    for keys in ck.layers.values():
        ck.load_layer(keys, ck.layer_format(keys))
    return ck


def ckpt_case(id, what, raises, fragment, make):
    """A case of a checkpoint directory made by make(ctx, directory, arrays) (arrays: a copy of
    the tiny checkpoint's tensors, which make may change before writing), then loaded."""
    def run(ctx):
        d = ctx.tmp_path / "ckpt"
        d.mkdir()
        make(ctx, d, dict(ctx.files.ckpt_tensors))
        load_ckpt(d)
    case(id, what, raises, fragment)(run)


def sharded(ctx, d, arrays, extra=None, drop=None):
    """Two shards and model.safetensors.index.json naming them; extra: one more shard beside them
    (not in the index); drop: a shard to delete."""
    names = sorted(arrays)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    (d / "config.json").write_text(json.dumps(CK_CONFIG))
    for shard, keys in shards.items():
        write_st(d / shard, *lay_out(st_entries({k: arrays[k] for k in keys})), align=8)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / checkpoint.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if extra:
        write_st(d / "model-stale.safetensors", *lay_out(st_entries(extra)), align=8)
    if drop:
        os.unlink(d / drop)
    return weight_map


@case("ckpt-stale-shard", "a stale extra shard beside model.safetensors.index.json, holding other expert "
      "weights", None, "the index's shards are read, the stale one is not")
def _(ctx):
    d = ctx.tmp_path / "ckpt"
    d.mkdir()
    arrays = ctx.files.ckpt_tensors
    stale = {k: (v.astype(np.float32) * 2).astype(bf16) for k, v in arrays.items() if ".experts." in k}
    sharded(ctx, d, arrays, extra=stale)
    ck = load_ckpt(d)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert np.array_equal(ck.read(name).view(np.uint16), arrays[name].view(np.uint16))
    gate = ck.load_layer(ck.layers[L1], "bf16")[0]
    assert np.array_equal(gate[2].view(np.uint16), arrays["model.layers.1.mlp.experts.2.gate_proj.weight"].view(np.uint16))


ckpt_case("ckpt-missing-shard", "a shard named in the index missing", checkpoint.CheckpointError,
          "ckpt/model-00002-of-00002.safetensors is missing",
          lambda ctx, d, a: sharded(ctx, d, a, drop="model-00002-of-00002.safetensors") and None)


def _index_extra_tensor(ctx, d, arrays):
    weight_map = sharded(ctx, d, arrays)
    weight_map["model.layers.9.mlp.gate.weight"] = "model-00001-of-00002.safetensors"
    (d / checkpoint.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))


ckpt_case("ckpt-index-names-absent-tensor", "the index names a tensor its shard does not hold",
          checkpoint.CheckpointError, "puts tensor model.layers.9.mlp.gate.weight in …model-00001-of-00002."
          "safetensors, which has no such tensor", _index_extra_tensor)
ckpt_case("ckpt-index-not-json", "model.safetensors.index.json not JSON", checkpoint.CheckpointError,
          "model.safetensors.index.json is not a JSON object with a weight_map",
          lambda ctx, d, a: (sharded(ctx, d, a), (d / checkpoint.INDEX_NAME).write_text("{nope")) and None)
ckpt_case("ckpt-index-no-weight_map", "the index without a weight_map", checkpoint.CheckpointError,
          "weight_map is not a JSON object of tensor name -> shard file name",
          lambda ctx, d, a: (sharded(ctx, d, a), (d / checkpoint.INDEX_NAME).write_text("{}")) and None)


def _index_escape(ctx, d, arrays):
    weight_map = sharded(ctx, d, arrays)
    shutil.move(d / "model-00002-of-00002.safetensors", ctx.tmp_path / "elsewhere.safetensors")
    weight_map = {k: "../elsewhere.safetensors" if v.startswith("model-00002") else v for k, v in weight_map.items()}
    (d / checkpoint.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))


ckpt_case("ckpt-index-shard-outside", "the index naming a shard `../elsewhere.safetensors`",
          checkpoint.CheckpointError, "'../elsewhere.safetensors' is not a file name inside", _index_escape)


def _two_files(ctx, d, arrays):
    write_ckpt(d, arrays)
    write_ckpt(d, {"model.norm.weight": arrays["model.norm.weight"]}, name="model-extra.safetensors")


ckpt_case("ckpt-tensor-in-two-files", "a tensor in two files and no index to say which",
          checkpoint.CheckpointError, "tensor model.norm.weight is in both", _two_files)


def raw_ckpt(change):
    """The tiny checkpoint written as one file whose header `change(header)` alters."""
    def make(ctx, d, arrays):
        header, data = lay_out(st_entries(arrays))
        change(header)
        (d / "config.json").write_text(json.dumps(CK_CONFIG))
        write_st(d / "model.safetensors", header, data, align=8)
    return make


E1 = "model.layers.0.mlp.experts.1.gate_proj.weight"
E0 = "model.layers.0.mlp.experts.0.gate_proj.weight"
ckpt_case("ckpt-overlapping-tensors", "two tensors' data offsets overlapping (safetensors refuses it)",
          checkpoint.CheckpointError, f"overlaps tensor",
          raw_ckpt(lambda h: h[E1].update(data_offsets=h[E0]["data_offsets"])))
ckpt_case("ckpt-offsets-past-end", "a tensor's offsets past the end of the file", checkpoint.CheckpointError,
          "(the data has a gap)",
          raw_ckpt(lambda h: h[E1].update(data_offsets=[o + 10 ** 6 for o in h[E1]["data_offsets"]])))
ckpt_case("ckpt-shape-offsets-disagree", "a shape whose byte count is not its offsets'", checkpoint.CheckpointError,
          f"tensor '{E1}': BF16 (64, 32) is 4096 bytes, but its data_offsets", raw_ckpt(lambda h: h[E1].update(shape=[64, 32])))
ckpt_case("ckpt-no-dtype", "a tensor entry without a dtype", checkpoint.CheckpointError, f"tensor '{E1}' has no dtype",
          raw_ckpt(lambda h: h[E1].pop("dtype")))
ckpt_case("ckpt-unknown-dtype", "a dtype that is not a safetensors dtype", checkpoint.CheckpointError,
          "dtype 'F128' is not a safetensors dtype", raw_ckpt(lambda h: h[E1].update(dtype="F128")))
ckpt_case("ckpt-metadata-not-strings", "__metadata__ with a number", checkpoint.CheckpointError,
          "__metadata__ is not a JSON object of strings", raw_ckpt(lambda h: h.update(__metadata__={"format": 1})))
ckpt_case("ckpt-header-not-object", "a header that is a JSON list", checkpoint.CheckpointError,
          "its header is not a JSON object", lambda ctx, d, a: (write_ckpt(d, {}), write_st(
              d / "model.safetensors", [1], b"", align=8)) and None)
ckpt_case("ckpt-f8-expert", "an F8_E4M3 expert tensor", checkpoint.CheckpointError,
          f"{E1} is F8_E4M3: fp8 experts are not supported yet",
          raw_ckpt(lambda h: h[E1].update(dtype="F8_E4M3", shape=[64, 128])))
ckpt_case("ckpt-missing-last-expert", "a layer missing its last expert (config.json: num_experts 4)",
          checkpoint.CheckpointError, "model.layers.1.mlp has 3 experts, but …config.json says num_experts = 4 "
          "(experts 3 .. 3 are missing)",
          lambda ctx, d, a: write_ckpt(d, {k: v for k, v in a.items() if "layers.1.mlp.experts.3." not in k}) and None)
ckpt_case("ckpt-huge-expert-index", "an expert numbered 999999999", checkpoint.CheckpointError,
          "model.layers.0.mlp has 1000000000 experts, but", lambda ctx, d, a: write_ckpt(
              d, {**a, "model.layers.0.mlp.experts.999999999.gate_proj.weight": a[E0]}) and None)
ckpt_case("ckpt-config-not-json", "config.json not JSON", checkpoint.CheckpointError,
          "config.json is not valid JSON", lambda ctx, d, a: (write_ckpt(d, a), (d / "config.json").write_text("{")) and None)


@case("ckpt-f8-tensor-read", "reading an F8_E4M3 tensor that is no expert's", checkpoint.CheckpointError,
      "model.norm.weight in …model.safetensors is F8_E4M3, a dtype ktgen does not read")
def _(ctx):
    d = ctx.tmp_path / "ckpt"
    d.mkdir()
    raw_ckpt(lambda h: h["model.norm.weight"].update(dtype="F8_E4M3", shape=[128]))(ctx, d, ctx.files.ckpt_tensors)
    ck = load_ckpt(d)   # the experts read
    ck.read("model.norm.weight")


@case("ckpt-f64-experts", "F64 expert weights", None, "read and rounded to bf16 (through float32, as torch does)")
def _(ctx):
    d = ctx.tmp_path / "ckpt"
    arrays = {k: v.astype(np.float64) if ".experts." in k else v for k, v in ctx.files.ckpt_tensors.items()}
    ck = load_ckpt(write_ckpt(d, arrays))
    gate = ck.load_layer(ck.layers[L0], "bf16")[0]
    assert np.array_equal(gate[1].view(np.uint16), ctx.files.ckpt_tensors[E1].view(np.uint16))


@case("ckpt-awq-scales-f64", "AutoAWQ expert scales stored as F64 (where float16 is the format)",
      checkpoint.CheckpointError, "model.layers.0.mlp.experts.0.gate_proj: scales: expected float16")
def _(ctx):
    rng = np.random.default_rng(0)
    arrays = {}
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            qweight, qzeros = pack_autoawq(rng.integers(0, 16, (64, 64)), rng.integers(0, 16, (2, 64)))
            key = f"model.layers.0.mlp.experts.{e}.{proj}"
            arrays.update({key + ".qweight": qweight, key + ".qzeros": qzeros,
                           key + ".scales": rng.random((2, 64)).astype(np.float64)})
    load_ckpt(write_ckpt(ctx.tmp_path / "ckpt", arrays))


@case("ckpt-shard-fifo", "a FIFO named *.safetensors in a checkpoint without an index", checkpoint.CheckpointError,
      "model.safetensors: this safetensors file is not a regular file (a FIFO)")
def _(ctx):
    d = ctx.tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CK_CONFIG))
    os.mkfifo(d / "model.safetensors")
    load_ckpt(d)


@case("ckpt-pack-missing-last-expert", "`ktgen pack` of a checkpoint missing a layer's last expert", None,
      "exit status 2, naming the layer, its 3 experts and the config's 4; no ktgen-pack.json written")
def _(ctx):
    from ktgen.cli import main as cli
    d = write_ckpt(ctx.tmp_path / "ckpt", {k: v for k, v in ctx.files.ckpt_tensors.items()
                                           if "layers.1.mlp.experts.3." not in k})
    assert cli(["pack", str(d), str(ctx.tmp_path / "out"), "--quiet"]) == 2
    assert not (ctx.tmp_path / "out" / pack.PACK_INDEX).exists()


@case("ckpt-pack-prefix-path", "`ktgen pack` of a checkpoint whose experts' prefix is a path (`../../x`)",
      checkpoint.CheckpointError, "layer prefix '../../x' cannot name a packed file")
def _(ctx):
    arrays = {k.replace("model.layers.0.mlp", "../../x"): v for k, v in ctx.files.ckpt_tensors.items()}
    pack.pack(write_ckpt(ctx.tmp_path / "ckpt", arrays), ctx.tmp_path / "out", progress=False)


# ---- PEFT adapters (load_adapter, save_adapter) ----

def adapter_model(seed: int):
    """Two KTMoE layers (rel_small) at model.layers.{0,1}.experts, LoRA random."""
    import torch
    from torch import nn
    from ktgen.torch import KTMoE
    rng = np.random.default_rng(seed)
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(2):
        block = nn.Module()
        block.experts = KTMoE(rel_spec(1), *make_weights(rel_spec(1), rng))
        model.layers.append(block)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
    return model


def adapter_case(id, what, fragment, change=None, after=None, raises=ValueError):
    """load_adapter of a copy of the saved adapter: change(config, tensors) alters them (or
    returns a new config) before they are written back, after(directory) then alters the files;
    the model must be left as it was."""
    def run(ctx):
        import torch
        from safetensors.torch import load_file, save_file
        from ktgen.torch import load_adapter
        d = ctx.tmp_path / "adapter"
        shutil.copytree(ctx.files.adapter, d)
        config = json.loads((d / "adapter_config.json").read_text())
        state = load_file(str(d / "adapter_model.safetensors"))
        changed = change(config, state) if change else None
        config = config if changed is None else changed
        (d / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        save_file(state, str(d / "adapter_model.safetensors"))
        if after:
            after(d)
        model = adapter_model(1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            load_adapter(model, d, prefix="model")
        finally:
            assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "a parameter was written"
    case(id, what, raises, fragment)(run)


def layer1(state, suffix):
    return next(k for k in state if "layers.1." in k and k.endswith(suffix))


def _shape1(config, state):
    k = layer1(state, "base_layer.lora_B.weight")
    state[k] = state[k].new_zeros(state[k].shape[0] + 1, state[k].shape[1])


def _missing1(config, state):
    del state[layer1(state, "base_layer.lora_A.weight")]


def _experts1(config, state):
    k = layer1(state, "base_layer.lora_A.weight")
    state[k] = state[k][: state[k].shape[0] // 2].clone()


def _int1(config, state):
    k = layer1(state, "experts.lora_A.weight")
    state[k] = state[k].to(dtype=__import__("torch").int32)


adapter_case("adapter-layer1-shape", "layer 1's lora_B one row too many (layer 0 fine)",
             "model.layers.1.experts.gate_up_proj: lora_B has 129 rows, expected 2 x intermediate_size", _shape1)
adapter_case("adapter-layer1-missing-key", "layer 1's gate_up lora_A missing",
             "adapter has no base_model.model.model.layers.1.experts.base_layer.lora_A.weight", _missing1)
adapter_case("adapter-layer1-expert-count", "layer 1's LoRA for 2 experts, not 4",
             "model.layers.1.experts.gate_up_proj: the adapter was trained for 2 experts", _experts1)
adapter_case("adapter-layer1-int-dtype", "layer 1's down lora_A of int32",
             "model.layers.1.experts.lora_A.weight: expected a 2-D floating-point tensor, got torch.int32", _int1)
adapter_case("adapter-layer1-scale", "an alpha_pattern giving layer 1's down_proj another scale",
             "model.layers.1.experts.down_proj: the adapter's scaling is 24.75 (rank 4)",
             lambda c, s: c["alpha_pattern"].update({"layers.1.experts.down_proj": 99}))
for _id, _field, _value, _frag in (
        ("r-zero", "r", 0, "r: expected an integer rank >= 1, got 0"),
        ("r-string", "r", "eight", "r: expected an integer rank >= 1, got 'eight'"),
        ("alpha-zero", "lora_alpha", 0, "lora_alpha: expected a number > 0, got 0"),
        ("rslora-string", "use_rslora", "yes", "use_rslora: expected true or false, got 'yes'"),
        ("dropout-string", "lora_dropout", "0.1", "lora_dropout: expected a number in [0, 1), got '0.1'"),
        ("pattern-list", "alpha_pattern", [1], "alpha_pattern: expected an object of regular expressions -> alphas > 0"),
        ("pattern-bad-regex", "rank_pattern", {"(": 8}, "rank_pattern: '(' is not a regular expression"),
        ("pattern-bad-rank", "rank_pattern", {"gate_up_proj": 0}, "rank_pattern['gate_up_proj']: expected one of the "
                                                                 "ranks >= 1, got 0"),
        ("peft-type", "peft_type", "IA3", "peft_type 'IA3', expected 'LORA'"),
        ("use_dora", "use_dora", True, "this adapter is not what ktgen's experts compute: use_dora = True"),
        ("lora_dropout", "lora_dropout", 0.1, "this adapter is not what ktgen's experts compute: lora_dropout = 0.1"),
        ("bias", "bias", "all", "this adapter is not what ktgen's experts compute: a LoRA bias")):
    adapter_case(f"adapter-config-{_id}", f"adapter_config.json with {_field} = {json.dumps(_value)}",
                 f"adapter_config.json: {_frag}", lambda c, s, f=_field, v=_value: c.update({f: v}))
adapter_case("adapter-config-not-object", "adapter_config.json a JSON list",
             "adapter_config.json: expected a JSON object, got list", lambda c, s: [1])
adapter_case("adapter-config-not-json", "adapter_config.json not JSON",
             "adapter_config.json: this adapter config is not valid JSON", lambda c, s: "{r: 8")


def fifo(name):
    def after(d):
        os.unlink(d / name)
        os.mkfifo(d / name)
    return after


adapter_case("adapter-config-fifo", "adapter_config.json a FIFO",
             "adapter_config.json: this adapter config is not a regular file (a FIFO)", after=fifo("adapter_config.json"))
adapter_case("adapter-weights-not-safetensors", "adapter_model.safetensors not a safetensors file",
             "adapter_model.safetensors: not a safetensors file",
             after=lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10" + bytes(30)))
adapter_case("adapter-weights-fifo", "adapter_model.safetensors a FIFO",
             "adapter_model.safetensors is not a regular file (a FIFO)", after=fifo("adapter_model.safetensors"))


@case("adapter-save-fails", "save_adapter failing half-way through writing the weights (a full disk)", OSError,
      "No space left on device")
def _(ctx):
    import safetensors.torch
    from ktgen.torch import save_adapter
    d = ctx.tmp_path / "adapter"
    shutil.copytree(ctx.files.adapter, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    ctx.monkeypatch.setattr(safetensors.torch, "save_file", failing)
    try:
        save_adapter(adapter_model(2), d, prefix="model")
    finally:   # the adapter there stays whole, and nothing else is left
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before


# ---- the tests ----

_FILES: Files | None = None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    global _FILES
    root = tmp_path_factory.mktemp("files")
    spec = rel_spec(1)
    rng = np.random.default_rng(0)
    moe = ktgen.MoE(spec, *make_weights(spec, rng), ktgen.LoRAWeights.random(spec, rng, 0.1))
    moe.save_packed(root / "layer.safetensors")
    x, ids, rw = make_inputs(spec, rng, 8)
    inputs = (x, ids, rw)
    arrays = ckpt_tensors(0)
    ckpt = write_ckpt(root / "ckpt", arrays)
    other = write_ckpt(root / "other_ckpt", ckpt_tensors(1))
    pack.pack(ckpt, root / "pack", progress=False)
    pack.pack(other, root / "other_pack", progress=False)
    adapter = None
    try:
        from ktgen.torch import save_adapter
        adapter = save_adapter(adapter_model(0), root / "adapter", prefix="model")
    except ImportError:   # without torch the adapter cases are skipped (pytest.importorskip)
        pass
    _FILES = Files(root / "layer.safetensors", inputs, None, ckpt, arrays, other, root / "pack",
                   root / "other_pack", adapter)
    _FILES.want = forward_bits(_FILES.packed)
    yield _FILES
    _FILES = None


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_file(c, files, monkeypatch, tmp_path):
    if c.id.startswith("adapter-"):
        pytest.importorskip("torch")
    run_case(c, Ctx(files, monkeypatch, tmp_path))


def test_docs_table_matches_cases():
    check_cases_doc(CASES, DOC)


def render_doc() -> str:
    head = """# Bad files and what they get

Every file ktgen reads may come from elsewhere: packed weight files are shared between the
processes of a host and copied between machines, checkpoints and adapters come from the Hub,
pack directories from `ktgen pack` anywhere. Each row is a file gone wrong (by accident or on
purpose) and what the caller gets: the exception (or none) and a fragment of its message (`…`
stands for any text). Each row is one test of `tests/system/test_bad_files.py`
(`test_bad_file[<id>]`), and `test_docs_table_matches_cases` checks that this table and its
`CASES` list agree row for row. Regenerate it with
`python tests/system/test_bad_files.py > docs/bad_files.md`. The bad arguments of calls are in
`docs/bad_inputs.md`; `tests/system/test_fuzz_files.py` mutates headers at random on top of these.

What is checked (docs/design.md#untrusted-files): every length, offset, shape and count a file
states, against the file and against what the kernels will read, before any pointer reaches C;
every name an index gives, as a regular file inside its directory; what a pack was made from;
an adapter, whole, before any parameter is written. A packed file's header carries a digest of
itself (metadata `header_sha256`): the rows that change a header recompute it, as a hostile
writer would, so that each reaches the check it is about.

The packed file is a `rel_small` layer (E=4, H=64, I=64; its buffers p0.down.q, p0.gate.q,
p0.up.q of 32768 bytes each, in that order); the checkpoint has two MoE layers of 4 experts
(H = I = 64, bf16) and `config.json` with `num_experts` 4; the adapter is save_adapter's of two
`rel_small` KTMoE layers at `model.layers.{0,1}.experts`.

"""
    return head + table(CASES)


if __name__ == "__main__":
    sys.stdout.write(render_doc())

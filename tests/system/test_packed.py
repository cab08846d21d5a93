"""Packed weight files: MoE.save_packed writes the kernels' buffers, from_packed
maps them where the layout matches and repacks them exactly where it does not, and the file is a
safetensors file other tools read."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import ktgen
from ktgen import isa, packed

from helpers import amx_spec, bf16, make_inputs, make_weights

PROJ = ("gate", "up", "down")


@pytest.fixture
def amx_emulated(monkeypatch):
    """The auto tier is the amx one, emulated: bf16 pairs and int8 quads in its panels (the
    generic tier packs plain K-major rows, so the two layouts differ in those modes)."""
    monkeypatch.setenv("KTGEN_EMULATE_AMX", "1")
    monkeypatch.setenv("KTGEN_ISA", "amx")


def layer(spec, isa=None, seed=0):
    rng = np.random.default_rng(seed)
    lw = ktgen.LoRAWeights.random(spec, rng, std=0.3) if spec.lora else None
    moe = ktgen.MoE(spec, *make_weights(spec, rng), lw, isa=isa)
    assert_store_sizes(moe)
    return moe, lw


def assert_store_sizes(moe):
    """packed.store_sizes, which checks files before any pointer reaches C, gives the kernel's
    own buffer sizes (and bytes per expert) for its layout: every layer of these tests checks it
    (each tier's interleaves, int8 quads with their padding, int4 splits, tp_count 2)."""
    want = packed.store_sizes(packed.layout_params(moe.packed_layout))
    for bufs in moe._packed_views():
        assert [(n, per) for _, n, per in bufs] == want, moe.packed_layout


def saved_layer(tmp_path, spec):
    """A generic-tier layer, its LoRA, and the packed file it saved."""
    src, lw = layer(spec, "generic")
    path = tmp_path / "layer.safetensors"
    src.save_packed(path)
    return src, lw, path


def assert_same_weights(a, b):
    for n in PROJ:
        assert np.array_equal(a.dequantized(n), b.dequantized(n)), n


def assert_same_layer(a, b, spec):
    """Bitwise the same forward and backward (same tier, same weights, same LoRA)."""
    rng = np.random.default_rng(7)
    x, ids, rw = make_inputs(spec, rng, 40)
    ids[:3] = 0
    g = (rng.standard_normal((40, spec.hidden_size)) * 0.1).astype(bf16)
    (oa, sa), (ob, sb) = a.forward_train(x, ids, rw), b.forward_train(x, ids, rw)
    assert np.array_equal(oa.view(np.uint16), ob.view(np.uint16))
    ga, gb = a.backward(sa, g), b.backward(sb, g)
    for name in ("input", "routing_weights") + ktgen.LORA_NAMES:
        if getattr(ga, name) is not None:
            assert np.array_equal(np.asarray(getattr(ga, name)).view(np.uint8),
                                  np.asarray(getattr(gb, name)).view(np.uint8)), name


@pytest.mark.parametrize("mode, tp", [("bf16", 1), ("int8", 2), ("k2", 1)])
def test_packed_file_maps_on_its_layout_and_repacks_exactly_on_another(amx_emulated, tmp_path, mode, tp, caplog):
    spec = amx_spec(mode, True, tp)
    path = tmp_path / "layer.safetensors"
    for writer_isa, reader_isa in ((None, None), ("generic", None), (None, "generic")):
        src, lw = layer(spec, writer_isa)
        src.save_packed(path)
        caplog.clear()
        got = ktgen.MoE.from_packed(path, lora=lw, isa=reader_isa)
        same = got.packed_layout == src.packed_layout
        # int4 panels are the same on every tier; bf16 pairs and int8 quads are the amx tier's
        assert same == (writer_isa == reader_isa or mode in ("awq", "k2"))
        assert got.mapped == same
        assert ("repacked in memory" in caplog.text) == (not same)
        assert_same_weights(src, got)
        if writer_isa == reader_isa:
            assert_same_layer(src, got, spec)
        else:
            assert_same_layer(ktgen.MoE(spec, *src.base_weights(), lw, isa=reader_isa), got, spec)


@pytest.mark.skipif("avx2" not in isa.available_tiers(), reason="the avx2 tier needs a CPU with AVX2")
def test_avx2_bf16_panels_are_split_and_repack_exactly_on_other_tiers(tmp_path):
    """avx2 bf16 panels hold columns j and j + 8 of each half row in one 32-bit word (one shift or
    one mask widens 8 columns); their layout says split=8, and a file of them maps on avx2 and
    repacks exactly on another tier, as another tier's file does on avx2."""
    spec = amx_spec("bf16", True, 2)
    path = tmp_path / "layer.safetensors"
    for writer_isa, reader_isa in (("avx2", "avx2"), ("avx2", "generic"), ("generic", "avx2")):
        src, lw = layer(spec, writer_isa)
        assert src.packed_layout.endswith(" split=8") == (writer_isa == "avx2")
        src.save_packed(path)
        got = ktgen.MoE.from_packed(path, lora=lw, isa=reader_isa)
        assert got.mapped == (writer_isa == reader_isa)
        assert_same_weights(src, got)
        assert_same_layer(ktgen.MoE(spec, *src.base_weights(), lw, isa=reader_isa), got, spec)


def test_unsplit_puts_split_columns_back_in_order():
    stored = np.array([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])   # words (j, j + 8)
    assert packed.unsplit(np.concatenate([stored, stored + 16]), 8).tolist() == list(range(32))
    nibbles = np.array([[b, b + 16] for b in range(16)]).ravel()                  # bytes (b, b + 16)
    assert packed.unsplit(nibbles, 16).tolist() == list(range(32))


def test_mapped_weights_are_the_file_pages_not_a_copy(tmp_path):
    spec = amx_spec("bf16", True, 2)
    src, lw, path = saved_layer(tmp_path, spec)
    got = ktgen.MoE.from_packed(path, lora=lw, isa="generic")
    assert got.mapped
    mapping = got._mapped._map
    lo = mapping.ctypes.data
    for bufs in got._packed_views():
        for ptr, n, _ in bufs:
            if n:
                addr = int(got.kernel.ffi.cast("uintptr_t", ptr))
                assert lo <= addr and addr + n <= lo + mapping.size
                assert addr % packed.ALIGN == 0 or n % packed.ALIGN   # only the zeros may be unaligned
    with pytest.raises(ValueError, match="read-only"):
        mapping[0] = 1


def test_packed_file_is_a_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    spec = amx_spec("awq", True, 2)
    src, _, path = saved_layer(tmp_path, spec)
    with safetensors.safe_open(str(path), "numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "ktgen-packed" and meta["layout"] == src.packed_layout
    assert ktgen.MoESpec.model_validate_json(meta["spec"]) == spec
    names = {packed.buffer_name(p, i): (p, i) for p in range(2) for i in range(12)}
    views = src._packed_views()
    assert len(tensors) == 2 * 9   # awq: payload, scales and zeros of three projections, per partition
    for name, arr in tensors.items():
        p, i = names[name]
        ptr, n, _ = views[p][i]
        assert arr.dtype == np.uint8 and arr.size == n
        assert np.array_equal(arr, np.frombuffer(src.kernel.ffi.buffer(ptr, n), np.uint8))
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % packed.ALIGN == 0


@pytest.mark.parametrize("mode", ["awq", "k2"])
def test_int4_files_of_the_earlier_nibble_order_read_back_exactly(tmp_path, mode):
    """Panels once held columns 2b and 2b + 1 in byte b of a row, and their layout string had no
    split field; they now hold b and b + 16. A file of the earlier order is repacked, exactly."""
    spec = amx_spec(mode, True, 2)
    src, lw, path = saved_layer(tmp_path, spec)
    assert src.packed_layout.endswith(" split=16")
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for name, t in header.items():
        if name.endswith(".q"):
            b, e = t["data_offsets"]
            rows = np.frombuffer(data[8 + n + b:8 + n + e], np.uint8).reshape(-1, 16)
            cols = np.concatenate([rows & 15, rows >> 4], axis=1)   # columns 0..31 of each row
            data[8 + n + b:8 + n + e] = (cols[:, 0::2] | (cols[:, 1::2] << 4)).astype(np.uint8).tobytes()
    text = data[8:8 + n].decode()
    layout = header["__metadata__"]["layout"]
    assert text.count(json.dumps(layout)) == 1
    # the same header length: the layout string loses its split field, spaces keep the offsets;
    # such files were written before headers had a digest
    text = text.replace(json.dumps(layout), json.dumps(layout.replace(" split=16", "")) + " " * 9)
    digest = f',"{packed.DIGEST}":"{header["__metadata__"][packed.DIGEST]}"'
    assert text.count(digest) == 1
    text = text.replace(digest, " " * len(digest))
    data[8:8 + n] = text.encode()
    earlier = tmp_path / "earlier.safetensors"
    earlier.write_bytes(bytes(data))
    got = ktgen.MoE.from_packed(earlier, lora=lw, isa="generic")
    assert not got.mapped and got.packed_layout == src.packed_layout
    assert_same_weights(src, got)
    assert_same_layer(src, got, spec)


def test_from_packed_takes_another_spec_of_the_same_weights(tmp_path):
    spec = amx_spec("int8", True, 1)
    src, _, path = saved_layer(tmp_path, spec)
    other = spec.replace(tp_count=2, max_len=32, lora={"rank": 16, "dtype": "bfloat16"})
    got = ktgen.MoE.from_packed(path, other, isa="generic")   # another tp_count: repacked
    assert got.spec == other and not got.mapped
    assert_same_weights(src, got)
    with pytest.raises(packed.PackedFileError, match=r"spec: .*hidden_size 128 \(the file's: 96\)"):
        ktgen.MoE.from_packed(path, spec.replace(hidden_size=128), isa="generic")
    with pytest.raises(packed.PackedFileError, match=r"quant.mode 'bf16'"):
        ktgen.MoE.from_packed(path, spec.replace(quant={"mode": "bf16"}), isa="generic")


def test_bad_packed_files_are_refused_by_name(tmp_path):
    spec = amx_spec("bf16", False, 1)
    src, _, path = saved_layer(tmp_path, spec)
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-64])
    with pytest.raises(packed.PackedFileError, match="short.safetensors: truncated"):
        ktgen.MoE.from_packed(tmp_path / "short.safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["version"] = "0"
    text = json.dumps(header).encode()
    (tmp_path / "old.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(packed.PackedFileError, match="version '0'"):
        ktgen.MoE.from_packed(tmp_path / "old.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(packed.PackedFileError, match="junk.safetensors"):
        ktgen.MoE.from_packed(tmp_path / "junk.safetensors")
    with pytest.raises(packed.PackedFileError, match="missing.safetensors"):
        ktgen.MoE.from_packed(tmp_path / "missing.safetensors")


def test_loading_weights_after_attaching_packs_into_own_storage(tmp_path):
    spec = amx_spec("bf16", True, 1)
    src, lw, path = saved_layer(tmp_path, spec)
    got = ktgen.MoE.from_packed(path, lora=lw, isa="generic")
    other, _ = layer(spec, "generic", seed=1)
    got._load(dict(zip(PROJ, other.base_weights())))   # the C load_weights on an attached context
    assert_same_weights(other, got)
    assert np.array_equal(ktgen.MoE.from_packed(path, isa="generic").dequantized("gate"),
                          src.dequantized("gate"))   # the file was not written


@pytest.mark.parametrize("mode", ["int8"])   # int8 quads: the payload's padding is read
def test_a_run_of_experts_maps_from_the_whole_layers_file(amx_emulated, tmp_path, mode):
    """Expert parallelism's view: experts 1..3 of 5 from the file are the layer of those experts
    (mapped, the int8 payload's padding read from the next expert's data), bit for bit."""
    spec = amx_spec(mode, True, 1)
    src, lw = layer(spec)
    path = tmp_path / "layer.safetensors"
    src.save_packed(path)
    for experts in (range(1, 4), range(3, 5), range(0, 1)):
        sub = spec.replace(expert_num=len(experts), num_experts_per_tok=1)
        lw_sub = ktgen.LoRAWeights(**{n: np.ascontiguousarray(getattr(lw, n)[experts.start:experts.stop])
                                      for n in ktgen.LORA_NAMES})
        got = ktgen.MoE.from_packed(path, sub, lora=lw_sub, experts=experts)
        assert got.mapped
        want = ktgen.MoE(sub, *(w[experts.start:experts.stop] if isinstance(w, np.ndarray)
                                else w.expert_slice(experts.start, experts.stop) for w in src.base_weights()),
                         lw_sub)
        assert_same_weights(want, got)
        assert_same_layer(want, got, sub)
    with pytest.raises(packed.PackedFileError, match="experts: range"):
        ktgen.MoE.from_packed(path, experts=range(4, 6))


def test_attach_packed_refuses_buffers_of_another_size(tmp_path):
    """The C side checks each buffer's byte count too: one byte off (or a buffer the layout has
    not) returns ERR_PACKED_SIZE and changes nothing; the right sizes attach."""
    spec = amx_spec("int8", True, 1)
    src, lw, path = saved_layer(tmp_path, spec)
    rng = np.random.default_rng(3)
    x, ids, rw = make_inputs(spec, rng, 9)
    want = src.forward(x, ids, rw).view(np.uint16).copy()
    f = packed.PackedFile(path)
    views = f.views(0)
    ffi, part, attach = src.kernel.ffi, src._parts[0], src.kernel.fn("attach_packed")
    ptrs = [ffi.NULL if v is None else src._ptr(v, "void *") for v in views]
    sizes = [0 if v is None else v.size for v in views]
    for i in range(12):
        bad = list(sizes)
        bad[i] = sizes[i] - 1 if sizes[i] else 64
        assert attach(part, ptrs, bad) == 13, i
        assert np.array_equal(src.forward(x, ids, rw).view(np.uint16), want)   # its own storage still
    assert "byte count" in src.kernel.error(13)
    assert attach(part, ptrs, sizes) == 0
    src._mapped = f
    assert np.array_equal(src.forward(x, ids, rw).view(np.uint16), want)

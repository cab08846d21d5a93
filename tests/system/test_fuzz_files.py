"""Fuzzing the files ktgen reads: hypothesis mutates the header of a packed weight file (its
tensor table, its metadata, the layout string, the spec, expert_bytes, raw bytes) and the header
of a checkpoint shard, one mutation a file, and each mutated file is loaded as ktgen loads it.

What must come out, for every mutated file:
- a packed file: a ktgen.PackedFileError, or a layer that computes exactly what the file's
  (mutated) header describes: the forward of a layer built from `PackedFile.unpack()` of that
  file; and, when the mutation left the header's digest stale (an accident, not a writer of
  hostile files), the forward of the unmutated file, bit for bit. Each file is loaded three
  ways: mapped (tp_count 1), repacked (tp_count 2), and a run of its experts (experts 1..2).
- a checkpoint: a ktgen.CheckpointError, or the experts that the safetensors library reads from
  the same file (rounded to bf16): ktgen accepts no header safetensors refuses, and reads what
  it reads.
- never a crash, a hang, or an out-of-bounds access: test_fuzz_under_asan runs the same fuzz in
  a subprocess whose kernels are built with AddressSanitizer and UBSan.

Each test prints (pytest -s) and records (record_property) how many mutated files it tried.
The examples are derandomized: every run tries the same files. Run it alone, with a count:

    python tests/system/test_fuzz_files.py --examples 400
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # the sanitized subprocess, or a run by hand
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ktgen
from ktgen import checkpoint, packed
from helpers import bf16, make_inputs, make_weights, rel_spec, sanitized_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = 600            # per fuzz target in the suite
SANITIZED_EXAMPLES = 150  # per fuzz target under ASan

# ---- what a mutation draws ----

LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(),
                   st.text(max_size=6))
VALUES = st.one_of(LEAVES, st.lists(LEAVES, max_size=3), st.dictionaries(st.text(max_size=3), LEAVES, max_size=2))
NEAR = [0, 1, 2, 31, 32, 63, 64, 96, 1024, 4096, 8192, 16384, 32768, 65536, 98240, 98304, 98368]
INTS = st.one_of(st.sampled_from(NEAR), st.integers(-3, 3), st.integers(-2 ** 63, 2 ** 64))


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, align: int) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)
    return struct.pack("<Q", len(text)) + text + body


def mutate_header(draw, header: dict, meta_fields: bool) -> str:
    """One mutation of a parsed safetensors header, in place; returns what it did."""
    names = sorted(k for k in header if k != "__metadata__")
    kinds = ["offset", "shape", "dtype", "entry", "delete", "rename", "add"] + (
        ["meta", "spec", "layout", "expert_bytes"] if meta_fields else ["meta"])
    kind = draw(st.sampled_from(kinds))
    name = draw(st.sampled_from(names))
    entry = header[name]
    meta = header.setdefault("__metadata__", {})
    if kind == "offset":
        i = draw(st.integers(0, 1))
        entry["data_offsets"][i] = draw(INTS)
    elif kind == "shape":
        entry["shape"] = draw(st.lists(INTS, max_size=3))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(sorted(checkpoint.DTYPE_BITS) + ["U9", "", "u8"]))
    elif kind == "entry":
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(VALUES)
    elif kind == "delete":
        del header[name]
    elif kind == "rename":
        header[draw(st.sampled_from(names + ["p0.gate.x", "p1.up.q", "x.experts.9.w1.weight"]))] = header.pop(name)
    elif kind == "add":
        header[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
    elif kind == "meta":
        key = draw(st.sampled_from(sorted(meta) + ["extra"]))
        meta[key] = draw(st.one_of(st.text(max_size=12), VALUES))
    elif kind == "spec":
        spec = json.loads(meta["spec"])
        path = draw(st.sampled_from(sorted(spec) + ["quant.mode", "quant.group_size", "lora.rank"]))
        target, key = (spec, path) if "." not in path else (spec.get(path.split(".")[0]) or {}, path.split(".")[1])
        if isinstance(target, dict):
            target[key] = draw(st.one_of(INTS, VALUES, st.sampled_from(["bf16", "int8", "awq", "k2"])))
        meta["spec"] = json.dumps(spec) if draw(st.booleans()) else json.dumps(spec)[:-1]
    elif kind == "layout":
        words = meta["layout"].split()
        i = draw(st.integers(0, len(words)))
        field = draw(st.sampled_from(list(packed.LAYOUT_FIELDS) + ["split", "rows"]))
        word = draw(st.one_of(st.builds(lambda v: f"{field}={v}", INTS), st.text(max_size=6)))
        if draw(st.booleans()) and i < len(words):
            words[i] = word
        else:
            words.insert(i, word)
        meta["layout"] = " ".join(words)
    else:  # expert_bytes
        eb = json.loads(meta["expert_bytes"])
        eb[0][draw(st.integers(0, 11))] = draw(INTS)
        meta["expert_bytes"] = json.dumps(eb)
    return f"{kind} {name}"


def mutate(draw, data: bytes, meta_fields: bool, align: int) -> tuple[bytes, bool]:
    """(mutated file bytes, whether the header's digest was recomputed after the mutation)."""
    if draw(st.integers(0, 5)) == 0:   # raw bytes of the length field and the header
        (n,) = struct.unpack("<Q", data[:8])
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            buf[draw(st.integers(0, 7 + n))] = draw(st.integers(0, 255))
        return bytes(buf), False
    header, body = split(data)
    mutate_header(draw, header, meta_fields)
    stamped = meta_fields and draw(st.booleans())
    if stamped:
        try:
            restamp(header)
        except (TypeError, ValueError, AttributeError, KeyError):   # a header too broken to digest
            stamped = False
    return join(header, body, align), stamped


def restamp(header: dict) -> None:
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and packed.DIGEST in meta:
        tensors = {n: (t["dtype"], t["shape"], *t["data_offsets"]) for n, t in header.items() if n != "__metadata__"}
        meta[packed.DIGEST] = packed.header_digest(meta, tensors)


def fuzz_settings(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ---- packed weight files ----

class PackedFuzz:
    """The unmutated file, its three loads' forwards, and a count of what the mutations gave."""

    LOADS = {   # name -> (spec, experts)
        "mapped": (rel_spec(1), None),
        "repacked": (rel_spec(2), None),
        "experts": (rel_spec(1).replace(expert_num=2, num_experts_per_tok=1), range(1, 3)),
    }

    def __init__(self, tmp: Path):
        self.tmp = tmp
        spec = rel_spec(1)
        rng = np.random.default_rng(5)
        moe = ktgen.MoE(spec, *make_weights(spec, rng), ktgen.LoRAWeights.zeros(spec))
        self.base = tmp / "base.safetensors"
        moe.save_packed(self.base)
        moe.close()
        self.data = self.base.read_bytes()
        x, ids, rw = make_inputs(spec, rng, 12)
        self.inputs = {"mapped": (x, ids, rw), "repacked": (x, ids, rw), "experts": (x, np.ascontiguousarray(ids[:, :1] % 2), np.ascontiguousarray(rw[:, :1]))}
        self.want = {name: self.forward(self.base, name) for name in self.LOADS}
        # files tried; of their loads (3 a file): refused, computing as the header says (of which
        # computing otherwise than the unmutated file: a header changed and its digest recomputed)
        self.counts = {"files": 0, "loads_refused": 0, "loads_ok": 0, "loads_changed": 0}

    def forward(self, path, name) -> np.ndarray:
        spec, experts = self.LOADS[name]
        moe = ktgen.MoE.from_packed(path, spec, isa=None, experts=experts)
        try:
            return moe.forward(*self.inputs[name]).view(np.uint16).copy()
        finally:
            moe.close()

    def described(self, path, name) -> np.ndarray:
        """The forward of a layer built from the weights the file's header describes."""
        spec, experts = self.LOADS[name]
        weights = packed.PackedFile(path).unpack()
        if experts is not None:
            weights = [w[experts.start:experts.stop] if isinstance(w, np.ndarray) else
                       w.expert_slice(experts.start, experts.stop) for w in weights]
        moe = ktgen.MoE(spec, *weights, ktgen.LoRAWeights.zeros(spec))
        try:
            return moe.forward(*self.inputs[name]).view(np.uint16).copy()
        finally:
            moe.close()

    def check(self, data: bytes, stamped: bool) -> None:
        path = self.tmp / "mutated.safetensors"
        path.write_bytes(data)
        self.counts["files"] += 1
        for name in self.LOADS:
            try:
                got = self.forward(path, name)
            except packed.PackedFileError:
                self.counts["loads_refused"] += 1
                continue
            self.counts["loads_ok"] += 1
            if not np.array_equal(got, self.want[name]):
                assert stamped, f"{name}: a header changed by accident loaded, and computes otherwise"
                self.counts["loads_changed"] += 1
            assert np.array_equal(got, self.described(path, name)), f"{name}: not what the header describes"


def fuzz_packed(tmp: Path, examples: int) -> dict:
    fz = PackedFuzz(tmp)

    @fuzz_settings(examples)
    @given(st.data())
    def run(data):
        fz.check(*mutate(data.draw, fz.data, True, packed.ALIGN))

    run()
    return fz.counts


# ---- checkpoints ----

class CheckpointFuzz:
    """A checkpoint of one MoE layer (4 experts, float32) and what the mutations gave."""

    def __init__(self, tmp: Path):
        from safetensors.numpy import save_file
        self.dir = tmp / "ckpt"
        self.dir.mkdir()
        (self.dir / "config.json").write_text(json.dumps({"num_experts": 4, "num_experts_per_tok": 2}))
        rng = np.random.default_rng(6)
        arrays = {"model.norm.weight": rng.standard_normal(32, np.float32)}
        for e in range(4):
            for proj, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
                arrays[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = rng.standard_normal(shape, np.float32)
        self.path = self.dir / "model.safetensors"
        save_file(arrays, str(self.path))
        self.data = self.path.read_bytes()
        self.counts = {"files": 0, "refused": 0, "loaded": 0}

    def check(self, data: bytes, stamped: bool) -> None:
        from safetensors import SafetensorError, safe_open
        self.path.write_bytes(data)
        self.counts["files"] += 1
        try:
            ck = checkpoint.Checkpoint(self.dir)
            layers = {p: ck.load_layer(keys, "bf16") for p, keys in ck.layers.items()}
        except checkpoint.CheckpointError:
            self.counts["refused"] += 1
            return
        self.counts["loaded"] += 1
        try:
            with safe_open(str(self.path), "numpy") as f:   # the same experts, read by safetensors
                for prefix, weights in layers.items():
                    keys = ck.layers[prefix]
                    for m, proj in enumerate(("gate", "up", "down")):
                        for e in range(weights[m].shape[0]):
                            theirs = f.get_tensor(keys.experts[(e, proj)]["weight"])
                            want = theirs.astype(np.float32).astype(bf16)
                            assert np.array_equal(weights[m][e].view(np.uint16), want.view(np.uint16)), (prefix, proj, e)
        except SafetensorError as err:
            raise AssertionError(f"ktgen read a file the safetensors library refuses: {err}") from None
        except TypeError as err:   # a dtype safetensors reads but NumPy has no type for (BF16, F8)
            assert "dtype" in str(err) or "bfloat16" in str(err), err


def fuzz_checkpoint(tmp: Path, examples: int) -> dict:
    fz = CheckpointFuzz(tmp)

    @fuzz_settings(examples)
    @given(st.data())
    def run(data):
        fz.check(*mutate(data.draw, fz.data, False, 8))

    run()
    return fz.counts


def fuzz_all(examples: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("packed", fuzz_packed), ("checkpoint", fuzz_checkpoint)):
            d = Path(tmp) / name
            d.mkdir()
            started = time.perf_counter()
            out[name] = {**fn(d, examples), "seconds": round(time.perf_counter() - started, 1)}
            print(f"FUZZ {name} " + " ".join(f"{k}={v}" for k, v in out[name].items()), flush=True)
    return out


# ---- the tests ----

def test_fuzz_packed_file_headers(tmp_path, record_property):
    counts = fuzz_packed(tmp_path, EXAMPLES)
    print(f"FUZZ packed {counts}")
    record_property("mutated_packed_files", counts["files"])
    assert counts["files"] >= EXAMPLES * 0.9
    assert counts["loads_refused"] and counts["loads_ok"]   # the mutations reach both outcomes


def test_fuzz_checkpoint_headers(tmp_path, record_property):
    counts = fuzz_checkpoint(tmp_path, EXAMPLES)
    print(f"FUZZ checkpoint {counts}")
    record_property("mutated_checkpoint_files", counts["files"])
    assert counts["files"] >= EXAMPLES * 0.9
    assert counts["refused"] and counts["loaded"]


def test_fuzz_under_asan(tmp_path, kernel_cache, record_property):
    """The same fuzz, SANITIZED_EXAMPLES a target, with kernels built under ASan and UBSan."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--examples", str(SANITIZED_EXAMPLES),
                           "--sanitized"], env=sanitized_env(kernel_cache, REPO), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    report = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert "ERROR: AddressSanitizer" not in proc.stderr, report
    assert "runtime error:" not in proc.stderr, report
    assert proc.returncode == 0, report
    found = dict(re.findall(r"^FUZZ (\w+) files=(\d+)", proc.stdout, re.M))
    assert set(found) == {"packed", "checkpoint"}, report
    for name, n in found.items():
        record_property(f"sanitized_mutated_{name}_files", int(n))
        assert int(n) >= SANITIZED_EXAMPLES * 0.9, report
    print(proc.stdout)


if __name__ == "__main__":
    import argparse
    import os
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=EXAMPLES)
    p.add_argument("--sanitized", action="store_true", help="check that the kernels are sanitized ones")
    a = p.parse_args()
    os.environ.pop("LD_PRELOAD", None)   # loaded already; the compiler ktgen runs does not need it
    if a.sanitized:
        k = ktgen.compile(rel_spec(1))
        assert "-fsanitize=address,undefined" in json.loads((k.path / "manifest.json").read_text())["flags"]
    fuzz_all(a.examples)

"""Every bad input and what it gets, one test per row of docs/bad_inputs.md.

CASES below is the single list: each case has an id, the bad input in words, the result
(an exception type, or "no exception") and a fragment of the message (or, for a case that
raises nothing, the outcome in words). test_docs_table_matches_cases checks that
docs/bad_inputs.md has exactly these rows with exactly these results and fragments, so the
table and the tests cannot drift apart. Regenerate the table with

    python tests/system/test_bad_inputs.py > docs/bad_inputs.md

Several rows are also asserted, in more depth, by test_inputs.py / test_compile.py /
test_spec.py; here each is kept tiny.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # `python tests/system/test_bad_inputs.py` prints the docs table
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import ml_dtypes
import numpy as np
import pytest

import ktgen
from ktgen import compiler, quant
from ktgen import reference as ref
from helpers import LORA_NAMES, case_list, check_cases_doc, rel_spec, run_case, table

bf16 = np.dtype(ml_dtypes.bfloat16)
DOC = Path(__file__).resolve().parents[2] / "docs" / "bad_inputs.md"
T = 4


# ---- the specs (rel_spec: helpers, compiled once a session) ----

def nolora_spec():
    return ktgen.MoESpec(name="rel_nolora", expert_num=2, num_experts_per_tok=1, hidden_size=32,
                         intermediate_size=32, max_len=4, lora=None)


def fresh_spec(name):
    """A spec no test has compiled: errors raised before the compiler runs."""
    return ktgen.MoESpec(name=name, expert_num=2, num_experts_per_tok=1, hidden_size=32,
                         intermediate_size=32, max_len=4, lora=None)


@dataclass
class Env:
    """What the cases share: a working MoE, its weights, LoRA and a valid call."""

    moe: ktgen.MoE
    weights: tuple
    lora: ktgen.LoRAWeights
    x: np.ndarray
    ids: np.ndarray
    rw: np.ndarray
    go: np.ndarray
    nolora: ktgen.MoE


@dataclass
class Ctx:
    env: Env
    monkeypatch: pytest.MonkeyPatch
    tmp_path: Path


CASES, case = case_list()


# ---- every array argument: wrong dtype, shape, contiguity ----

def bad_array(good: np.ndarray, kind: str) -> np.ndarray:
    if kind == "dtype":
        if good.dtype == bf16:
            return good.astype(np.float32)
        if good.dtype.kind == "i":
            return good.astype(np.float32)
        return good.astype(np.float64)
    if kind == "shape":  # one more column in the last dim
        return np.zeros(good.shape[:-1] + (good.shape[-1] + 1,), good.dtype)
    if kind == "contiguity":  # the right dtype and shape, every other column of a wider array
        wide = np.zeros(good.shape[:-1] + (2 * good.shape[-1],), good.dtype)
        wide[..., ::2] = good
        bad = wide[..., ::2]
        assert bad.shape == good.shape and not bad.flags.c_contiguous
        return bad
    raise AssertionError(kind)


def fragment(arg: str, kind: str, good_shape: tuple, want: str, bad_dtype: str) -> str:
    """What the ValueError says: the argument, what it expected and what it got (docs/design.md#the-python-api)."""
    if kind == "dtype":
        return f"{arg}: expected dtype {want}, got {bad_dtype}"
    if kind == "shape":
        bad_shape = good_shape[:-1] + (good_shape[-1] + 1,)
        return f"{arg}: expected shape {good_shape}, got {bad_shape}"
    return f"{arg}: expected a C-contiguous array"


KINDS = ("dtype", "shape", "contiguity")


def _slots_free(moe):
    """A rejected call took no saved-forward slot: max_cache_depth forward_trains still fit."""
    e = _ENV
    held = [moe.forward_train(e.x, e.ids, e.rw) for _ in range(moe.spec.max_cache_depth)]
    del held


def _call_arg(arg, kind):
    def run(ctx):
        e = ctx.env
        args = {"x": e.x, "expert_ids": e.ids, "routing_weights": e.rw}
        args[arg] = bad_array(args[arg], kind)
        try:
            e.moe.forward_train(args["x"], args["expert_ids"], args["routing_weights"])
        finally:
            _slots_free(e.moe)
    return run


for _arg, _shape, _want, _bad in (("x", (T, 64), "bfloat16", "float32"),
                                  ("expert_ids", (T, 2), "int32 or int64", "float32"),
                                  ("routing_weights", (T, 2), "float32", "float64")):
    for _kind in KINDS:
        case(f"{_arg}-{_kind}", f"forward / forward_train: `{_arg}` of the wrong {_kind}", ValueError,
             fragment(_arg, _kind, _shape, _want, _bad))(_call_arg(_arg, _kind))


def _grad_out(kind):
    def run(ctx):
        e = ctx.env
        out, saved = e.moe.forward_train(e.x, e.ids, e.rw)
        try:
            e.moe.backward(saved, bad_array(e.go, kind))
        finally:
            assert not saved.consumed  # a rejected backward keeps the saved forward usable
            e.moe.backward(saved, e.go)
    return run


for _kind in KINDS:
    case(f"grad_out-{_kind}", f"backward: `grad_out` of the wrong {_kind}", ValueError,
         fragment("grad_out", _kind, (T, 64), "bfloat16", "float32"))(_grad_out(_kind))


def _base(arg, kind):
    def run(ctx):
        e = ctx.env
        w = dict(zip(("gate", "up", "down"), e.weights))
        w[arg] = bad_array(w[arg], kind)
        ktgen.MoE(e.moe.spec, w["gate"], w["up"], w["down"], e.lora)
    return run


for _arg in ("gate", "up", "down"):
    for _kind in KINDS:
        case(f"{_arg}-{_kind}", f"MoE(): base weight `{_arg}` of the wrong {_kind}", ValueError,
             fragment(_arg, _kind, (4, 64, 64), "bfloat16", "float32"))(_base(_arg, _kind))


def _bad_lora(e, name, kind):
    arrays = {n: getattr(e.lora, n) for n in LORA_NAMES}
    arrays[name] = bad_array(arrays[name], kind)
    return ktgen.LoRAWeights(**arrays)


def _lora_ctor(name, kind):
    def run(ctx):
        e = ctx.env
        ktgen.MoE(e.moe.spec, *e.weights, _bad_lora(e, name, kind))
    return run


def _lora_set(name, kind):
    def run(ctx):
        e = ctx.env
        before = e.moe.forward(e.x, e.ids, e.rw)
        try:
            e.moe.set_lora(_bad_lora(e, name, kind))
        finally:  # a rejected set_lora leaves the LoRA in use as it was
            assert e.moe.lora is e.lora
            assert np.array_equal(e.moe.forward(e.x, e.ids, e.rw).view(np.uint16), before.view(np.uint16))
    return run


for _name in LORA_NAMES:
    for _kind in KINDS:
        frag = fragment(f"lora.{_name}", _kind, ktgen.LoRAWeights.shapes(rel_spec())[_name],
                        "float32", "float64")
        case(f"lora_ctor.{_name}-{_kind}", f"MoE(): LoRA `{_name}` of the wrong {_kind}",
             ValueError, frag)(_lora_ctor(_name, _kind))
        case(f"set_lora.{_name}-{_kind}", f"set_lora(): LoRA `{_name}` of the wrong {_kind}",
             ValueError, frag)(_lora_set(_name, _kind))


# ---- other arguments ----

@case("x-list", "forward: `x` a Python list, not an ndarray", ValueError, "x: expected a 2-D bf16 array")
def _(ctx):
    ctx.env.moe.forward(ctx.env.x.astype(np.float32).tolist(), ctx.env.ids, ctx.env.rw)


@case("x-1d", "forward: `x` 1-D", ValueError, "x: expected a 2-D bf16 array")
def _(ctx):
    ctx.env.moe.forward(ctx.env.x[0], ctx.env.ids, ctx.env.rw)


@case("expert_id-too-large", "forward: an expert id ≥ expert_num", ValueError,
      "expert_ids: id 4 is outside -1 .. 3")
def _(ctx):
    e = ctx.env
    ids = e.ids.copy()
    ids[2, 1] = 4
    try:
        e.moe.forward_train(e.x, ids, e.rw)
    finally:
        _slots_free(e.moe)


@case("expert_id-below-minus-one", "forward: an expert id < -1", ValueError,
      "expert_ids: id -2 is outside -1 .. 3")
def _(ctx):
    e = ctx.env
    ids = e.ids.astype(np.int32)
    ids[0, 0] = -2
    e.moe.forward(e.x, ids, e.rw)


@case("tokens-over-max_len", "forward: T > max_len tokens", ValueError,
      "T = 17 tokens exceeds the spec's max_len = 16")
def _(ctx):
    e = ctx.env
    rng = np.random.default_rng(0)
    x = rng.standard_normal((17, 64), np.float32).astype(bf16)
    try:
        e.moe.forward_train(x, np.zeros((17, 2), np.int64), np.ones((17, 2), np.float32))
    finally:
        _slots_free(e.moe)


@case("saved-backward-twice", "backward twice on one saved forward", ValueError, "already used by a backward")
def _(ctx):
    e = ctx.env
    _, saved = e.moe.forward_train(e.x, e.ids, e.rw)
    e.moe.backward(saved, e.go)
    e.moe.backward(saved, e.go)


@case("saved-other-moe", "backward with the saved forward of another MoE", ValueError,
      "expected the SavedForward returned by this MoE's forward_train")
def _(ctx):
    e = ctx.env
    other = ktgen.MoE(e.moe.spec, *e.weights, e.lora)
    _, saved = other.forward_train(e.x, e.ids, e.rw)
    e.moe.backward(saved, e.go)


@case("saved-not-saved", "backward with something that is not a saved forward", ValueError,
      "expected the SavedForward")
def _(ctx):
    ctx.env.moe.backward(object(), ctx.env.go)


@case("cache-full", "forward_train with every max_cache_depth slot held", ktgen.CacheFullError,
      "all max_cache_depth = 2 saved-forward slots of rel_small are taken")
def _(ctx):
    e = ctx.env
    held = [e.moe.forward_train(e.x, e.ids, e.rw) for _ in range(2)]
    try:
        e.moe.forward_train(e.x, e.ids, e.rw)
    finally:
        del held
        _slots_free(e.moe)


@case("lora-not-loraweights", "set_lora() with a tuple of arrays", TypeError,
      "lora: expected a ktgen.LoRAWeights, got tuple")
def _(ctx):
    ctx.env.moe.set_lora(ctx.env.lora.arrays())


@case("lora-for-spec-without-lora", "MoE(): LoRA weights for a spec with `lora: null`", ValueError,
      "has no LoRA (lora: null), but LoRA weights were given")
def _(ctx):
    e = ctx.env
    spec = e.nolora.spec
    rng = np.random.default_rng(0)
    w = [(rng.standard_normal(s, np.float32)).astype(bf16) for s in [(2, 32, 32)] * 3]
    ktgen.MoE(spec, *w, e.lora)


@case("set_lora-without-lora", "set_lora() on a MoE whose spec has `lora: null`", ValueError,
      "has no LoRA (lora: null)")
def _(ctx):
    ctx.env.nolora.set_lora(ctx.env.lora)


@case("spec-not-moespec", "MoE() with a dict for the spec", TypeError,
      "spec: expected a ktgen.MoESpec, got dict")
def _(ctx):
    ktgen.MoE(ctx.env.moe.spec.model_dump(), *ctx.env.weights)


@case("dequantized-bad-name", "MoE.dequantized() of an unknown matrix", ValueError,
      "name: expected one of gate, up, down, got 'gates'")
def _(ctx):
    ctx.env.moe.dequantized("gates")


# ---- quantized weights (every quant.mode is implemented now: no NotImplementedError) ----

@case("quant-mode-mismatch", "MoE(): pre-quantized int8 weights for a bf16 spec", ValueError,
      "gate: pre-quantized int8 weights given to a spec with quant.mode 'bf16'")
def _(ctx):
    e = ctx.env
    ktgen.MoE(e.moe.spec, quant.quantize(e.weights[0], "int8"), *e.weights[1:], e.lora)


@case("quant-group-size-mismatch", "MoE(): awq weights of group_size 64 for a spec with group_size 32",
      ValueError, "gate: group_size 64 does not match the spec's quant.group_size 32")
def _(ctx):
    e = ctx.env
    spec = e.moe.spec.replace(quant=dict(mode="awq", group_size=32))
    ktgen.MoE(spec, *(quant.quantize(w, "awq", 64) for w in e.weights), e.lora)


@case("quant-shape-mismatch", "MoE(): pre-quantized weights of one expert too few", ValueError,
      "gate: expected quantized weights of shape (4, 64, 64), got (3, 64, 64)")
def _(ctx):
    e = ctx.env
    spec = e.moe.spec.replace(quant=dict(mode="int8"))
    ktgen.MoE(spec, quant.quantize(e.weights[0][:3], "int8"),
              *(quant.quantize(w, "int8") for w in e.weights[1:]), e.lora)


# ---- NaN and Inf: no exception, they reach out in their own tokens only ----

def _nonfinite(where, value):
    def run(ctx):
        e = ctx.env
        moe = e.moe
        x, ids, rw, go = e.x.copy(), e.ids.copy(), e.rw.copy(), e.go.copy()
        ids[:] = [[0, 1], [2, 3], [1, -1], [3, 2]]
        bad = [1]  # the tokens that must come out non-finite
        if where == "x":
            x[1, 5] = value
        elif where == "routing_weights":
            rw[1, 0] = value
        elif where == "skipped_slot":  # a NaN weight on a skipped slot adds nothing (docs/design.md#the-math)
            rw[2, 1] = value
            bad = []
        elif where == "weights":  # one weight of expert 2's gate: tokens 1 and 3 use expert 2
            gate = e.weights[0].copy()
            gate[2, 3, 7] = value
            moe = ktgen.MoE(moe.spec, gate, *e.weights[1:], e.lora)
            bad = [1, 3]
        else:
            raise AssertionError(where)
        out = moe.forward(x, ids, rw)
        out_t, saved = moe.forward_train(x, ids, rw)
        grads = moe.backward(saved, go)
        good = [t for t in range(T) if t not in bad]
        o = out.astype(np.float32)
        for t in bad:
            assert not np.isfinite(o[t]).all(), f"non-finite {where} must reach out[{t}]"
        assert np.isfinite(o[good]).all(), "a non-finite value leaked into other tokens"
        assert np.array_equal(out_t.view(np.uint16), out.view(np.uint16))
        W = [e.moe.dequantized(n) for n in ("gate", "up", "down")]
        rw_clean = np.where(np.isfinite(rw), rw, 0).astype(np.float32)
        expected = ref.forward(x[good], ids[good], rw_clean[good], *W, e.lora, moe.spec.lora.scale)
        assert ref.rel_l2(o[good], expected) <= 1e-2
        assert np.isfinite(grads.input.astype(np.float32)[good]).all()
        if where == "skipped_slot":
            assert grads.routing_weights[2, 1] == 0
    return run


NONFINITE = [  # (id, where, value, bad input in words)
    ("nan-in-x", "x", np.nan, "NaN in x"),
    ("inf-in-x", "x", np.inf, "Inf in x"),
    ("nan-in-weights", "weights", np.nan, "NaN in a base weight"),
    ("neg_inf-in-weights", "weights", -np.inf, "-Inf in a base weight"),
    ("nan-in-routing_weights", "routing_weights", np.nan, "NaN in routing_weights"),
    ("inf-in-routing_weights", "routing_weights", np.inf, "Inf in routing_weights"),
    ("nan-routing_weight-on-skipped-slot", "skipped_slot", np.nan,
     "NaN routing weight on a skipped slot (id -1)"),
]
for _id, _where, _val, _what in NONFINITE:
    _outcome = ("that token's out row is finite and correct; its routing gradient is 0"
                if _where == "skipped_slot" else
                "non-finite values in the out rows of the tokens it touches; other rows finite and "
                "correct; backward runs")
    case(_id, _what, None, _outcome)(_nonfinite(_where, _val))


# ---- spec files ----

def _spec_file(text):
    def run(ctx):
        path = ctx.tmp_path / "layer.yaml"
        path.write_text(text)
        ktgen.load_spec(path)
    return run


GOOD_YAML = "name: layer\nexpert_num: 4\nnum_experts_per_tok: 2\nhidden_size: 64\nintermediate_size: 64\n"
SPEC_CASES = [
    ("spec-not-yaml", "a spec file that is not YAML", "name: [layer\n", "not valid YAML"),
    ("spec-not-mapping", "a spec file that is a YAML list", "- name\n- layer\n",
     "expected a mapping of spec fields, got a list"),
    ("spec-empty", "an empty spec file", "", "expected a mapping of spec fields, got an empty document"),
    ("spec-unknown-key", "a spec file with an unknown key", GOOD_YAML + "experts: 8\n",
     "unknown key 'experts'"),
    ("spec-unknown-nested-key", "a spec file with an unknown key under lora",
     GOOD_YAML + "lora:\n  rnak: 8\n", "unknown key 'lora.rnak'"),
    ("spec-missing-field", "a spec file without a required field",
     GOOD_YAML.replace("hidden_size: 64\n", ""), "field 'hidden_size'"),
    ("spec-rule-name", "a name that is not a C identifier",
     GOOD_YAML.replace("name: layer", "name: My-Layer"),
     "field 'name'"),
    ("spec-rule-hidden_size", "hidden_size not a multiple of 32",
     GOOD_YAML.replace("hidden_size: 64", "hidden_size: 48"), "field 'hidden_size'"),
    ("spec-rule-num_experts_per_tok", "num_experts_per_tok > expert_num",
     GOOD_YAML.replace("num_experts_per_tok: 2", "num_experts_per_tok: 5"),
     "field 'num_experts_per_tok': must be at most expert_num (4)"),
    ("spec-rule-intermediate_size", "intermediate_size not a multiple of 32 × tp_count",
     GOOD_YAML + "tp_count: 4\n", "field 'intermediate_size'"),
    ("spec-rule-lora.rank", "lora.rank 0", GOOD_YAML + "lora:\n  rank: 0\n", "field 'lora.rank'"),
    ("spec-rule-quant.group_size", "quant.group_size that does not divide hidden_size",
     GOOD_YAML + "quant:\n  mode: k2\n  group_size: 48\n", "field 'quant.group_size'"),
    ("spec-wrong-type", "a string where an int belongs",
     GOOD_YAML.replace("expert_num: 4", "expert_num: '4'"),
     "field 'expert_num'"),
]
for _id, _what, _text, _frag in SPEC_CASES:
    case(_id, _what, ktgen.SpecError, _frag)(_spec_file(_text))


@case("spec-file-missing", "a spec path that does not exist", ktgen.SpecError, "cannot read")
def _(ctx):
    ktgen.load_spec(ctx.tmp_path / "missing.yaml")


@case("spec-unknown-name", "a bundled spec name that does not exist", ktgen.SpecError,
      "unknown spec name 'qwen9'; bundled specs:")
def _(ctx):
    ktgen.load_spec("qwen9")


# ---- the kernel cache ----

@case("cache-dir-cannot-create", "KTGEN_CACHE_DIR below a regular file", ktgen.CacheError,
      "cannot create the kernel cache directory")
def _(ctx):
    blocker = ctx.tmp_path / "a-file"
    blocker.write_text("")
    ctx.monkeypatch.setenv("KTGEN_CACHE_DIR", str(blocker / "cache"))
    ktgen.compile(fresh_spec("rel_cache_create"))


@case("cache-dir-not-writable", "KTGEN_CACHE_DIR an existing directory this process cannot write",
      ktgen.CacheError, "(KTGEN_CACHE_DIR) is not writable")
def _(ctx):
    import os
    ro = ctx.tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode bits; procfs refuses even root
        ro = Path("/proc/self")
    assert not os.access(ro, os.W_OK)
    ctx.monkeypatch.setenv("KTGEN_CACHE_DIR", str(ro))
    ktgen.compile(fresh_spec("rel_cache_ro"))


@case("cache-truncated-module", "a cache entry whose compiled module was truncated", None,
      "rebuilt silently; the new kernel works")
def _(ctx):
    import shutil
    e = ctx.env
    src = ktgen.compile(e.moe.spec)
    cache = ctx.tmp_path / "cache"
    shutil.copytree(src.path, cache / src.path.name)
    manifest = json.loads((cache / src.path.name / "manifest.json").read_text())
    module = cache / src.path.name / manifest["module_file"]
    data = module.read_bytes()
    module.write_bytes(data[: len(data) // 2])
    ctx.monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache))
    ctx.monkeypatch.delitem(compiler._loaded, src.cache_key)  # forget the module this process loaded
    kernel = ktgen.compile(e.moe.spec)
    assert kernel.compiled and kernel.cache_key == src.cache_key
    rebuilt = json.loads((cache / src.path.name / "manifest.json").read_text())
    module = cache / src.path.name / rebuilt["module_file"]
    assert hashlib.sha256(module.read_bytes()).hexdigest() == rebuilt["sha256"]
    assert module.stat().st_size > len(data) // 2
    moe = ktgen.MoE(e.moe.spec, *e.weights, e.lora)
    assert moe.kernel.lib is kernel.lib
    assert np.array_equal(moe.forward(e.x, e.ids, e.rw).view(np.uint16),
                          e.moe.forward(e.x, e.ids, e.rw).view(np.uint16))


# ---- the compiler and the ISA tier ----

@case("no-c-compiler", "KTGEN_CC=/nonexistent/cc and a spec not in the cache", ktgen.CompilerError,
      "apt-get install gcc")
def _(ctx):
    ctx.monkeypatch.setenv("KTGEN_CC", "/nonexistent/cc")
    ktgen.compile(fresh_spec("rel_no_cc"))


@case("c-compiler-fails", "KTGEN_CC a compiler that runs but fails to compile", ktgen.CompilerError,
      "compiling _ktgen_rel_broken_cc_… with '…/broken-cc' failed")
def _(ctx):
    cc = ctx.tmp_path / "broken-cc"
    cc.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "brokencc 1.0"; exit 0; fi\n'
                  'echo "brokencc: internal error" >&2\nexit 1\n')
    cc.chmod(0o755)
    ctx.monkeypatch.setenv("KTGEN_CC", str(cc))
    ctx.monkeypatch.setenv("KTGEN_CACHE_DIR", str(ctx.tmp_path / "cache"))
    ktgen.compile(fresh_spec("rel_broken_cc"))


AVX2_ONLY = frozenset({"sse2", "avx", "avx2", "fma", "f16c"})


def no_emulation(ctx):
    for var in ktgen.isa.EMULATION_VARS.values():
        ctx.monkeypatch.delenv(var, raising=False)


@case("isa-cpu-lacks-tier-spec", "spec isa avx512 on a CPU without AVX-512", ktgen.ISAError,
      "ISA tier 'avx512' needs CPU features avx512f")
def _(ctx):
    no_emulation(ctx)
    ctx.monkeypatch.setattr(ktgen.isa, "cpu_flags", lambda: AVX2_ONLY)
    ktgen.compile(fresh_spec("rel_isa").replace(isa="avx512"))


@case("isa-cpu-lacks-tier-env", "KTGEN_ISA=avx512 on a CPU without AVX-512", ktgen.ISAError,
      "ISA tier 'avx512' needs CPU features avx512f")
def _(ctx):
    no_emulation(ctx)
    ctx.monkeypatch.setattr(ktgen.isa, "cpu_flags", lambda: AVX2_ONLY)
    ctx.monkeypatch.setenv("KTGEN_ISA", "avx512")
    ktgen.MoE(ctx.env.moe.spec, *ctx.env.weights, ctx.env.lora)


@case("isa-unknown-env", "KTGEN_ISA set to an unknown tier", ktgen.ISAError,
      "unknown ISA tier 'sse9'; known tiers: amx, avx512bf16, avx512, avx2, generic")
def _(ctx):
    ctx.monkeypatch.setenv("KTGEN_ISA", "sse9")
    ktgen.compile(fresh_spec("rel_isa"))


@case("sanitize-unknown", "KTGEN_SANITIZE naming an unknown sanitizer", ktgen.CompilerError,
      "KTGEN_SANITIZE: unknown sanitizer(s) thread")
def _(ctx):
    ctx.monkeypatch.setenv("KTGEN_SANITIZE", "address,thread")
    ktgen.compile(fresh_spec("rel_sanitize"))


# ---- concurrent calls and a closed MoE ----

def _closed_moe(tp):
    e = _ENV
    spec = rel_spec(tp)
    lora = ktgen.LoRAWeights.random(spec, np.random.default_rng(tp), 0.1)
    return ktgen.MoE(spec, *e.weights, lora), lora


CLOSED_CALLS = {   # name -> the call on a closed MoE (the test's context, a saved forward, a LoRA)
    "forward": lambda m, c, saved, lora: m.forward(c.env.x, c.env.ids, c.env.rw),
    "forward_train": lambda m, c, saved, lora: m.forward_train(c.env.x, c.env.ids, c.env.rw),
    "backward": lambda m, c, saved, lora: m.backward(saved, c.env.go),
    "set_lora": lambda m, c, saved, lora: m.set_lora(lora),
    "dequantized": lambda m, c, saved, lora: m.dequantized("gate"),
    "base_weights": lambda m, c, saved, lora: m.base_weights(),
    "save_packed": lambda m, c, saved, lora: m.save_packed(c.tmp_path / "closed.safetensors"),
}


def _closed(name, tp):
    def run(ctx):
        moe, lora = _closed_moe(tp)
        _, saved = moe.forward_train(ctx.env.x, ctx.env.ids, ctx.env.rw)
        moe.close()
        moe.close()   # twice: nothing more
        try:
            CLOSED_CALLS[name](moe, ctx, saved, lora)
        finally:
            assert not saved.consumed   # the refused call did not take it
    return run


for _tp in (1, 2):
    for _name in CLOSED_CALLS:
        case(f"closed-{_name}-tp{_tp}", f"`{_name}` after `close()` (tp_count {_tp})", ktgen.MoEClosedError,
             "MoE of spec rel_small is closed")(_closed(_name, _tp))


@case("backward-refused-busy", "backward that every context refuses as busy (ERR_BUSY: another caller "
      "of the C API on the same context)", ktgen.KernelError,
      "another call is running on this context (a context runs one call at a time) (code 12); nothing ran "
      "and the saved forward is kept: retry")
def _(ctx):
    e = ctx.env
    want_out, want_saved = e.moe.forward_train(e.x, e.ids, e.rw)
    want = e.moe.backward(want_saved, e.go)
    out, saved = e.moe.forward_train(e.x, e.ids, e.rw)
    real = e.moe.kernel.fn
    ctx.monkeypatch.setattr(e.moe.kernel, "fn", lambda name: (lambda *a: 12) if name == "backward" else real(name))
    try:
        e.moe.backward(saved, e.go)
    finally:
        ctx.monkeypatch.undo()
        assert not saved.consumed
        grads = e.moe.backward(saved, e.go)   # the retry: the same gradients as the first backward
        assert np.array_equal(grads.input.view(np.uint16), want.input.view(np.uint16))
        assert np.array_equal(grads.gate_a, want.gate_a)


@case("backward-beside-forward", "backwards in one thread while another thread runs forwards on the "
      "same MoE", None, "each call waits for the other: every backward succeeds with the gradients of "
      "one thread alone, every forward its output")
def _(ctx):
    e = ctx.env
    want_out = e.moe.forward(e.x, e.ids, e.rw).view(np.uint16).copy()
    _, s0 = e.moe.forward_train(e.x, e.ids, e.rw)
    want = e.moe.backward(s0, e.go).input.view(np.uint16).copy()
    stop, bad = threading.Event(), []

    def forwards():
        while not stop.is_set():
            if not np.array_equal(e.moe.forward(e.x, e.ids, e.rw).view(np.uint16), want_out):
                bad.append("forward")

    t = threading.Thread(target=forwards)
    t.start()
    try:
        for _ in range(50):
            _, saved = e.moe.forward_train(e.x, e.ids, e.rw)
            if not np.array_equal(e.moe.backward(saved, e.go).input.view(np.uint16), want):
                bad.append("backward")
    finally:
        stop.set()
        t.join()
    assert not bad, bad


@case("set_lora-during-forward", "set_lora in one thread while another runs forwards (tp_count 2)", None,
      "set_lora waits for the running forward: every output is that of one LoRA or the other")
def _(ctx):
    e = ctx.env
    moe, lora_a = _closed_moe(2)
    lora_b = ktgen.LoRAWeights.random(moe.spec, np.random.default_rng(9), 0.3)
    want = []
    for lw in (lora_a, lora_b):
        moe.set_lora(lw)
        want.append(moe.forward(e.x, e.ids, e.rw).view(np.uint16).copy())
    assert not np.array_equal(*want)
    stop = threading.Event()

    def swap():
        i = 0
        while not stop.is_set():
            moe.set_lora((lora_a, lora_b)[i % 2])
            i += 1

    t = threading.Thread(target=swap)
    t.start()
    try:
        outs = [moe.forward(e.x, e.ids, e.rw).view(np.uint16) for _ in range(200)]
    finally:
        stop.set()
        t.join()
    assert all(np.array_equal(o, want[0]) or np.array_equal(o, want[1]) for o in outs)
    moe.close()


@case("cache-clear-during-hit", "`ktgen cache clear` between a cache hit's manifest check and its import",
      None, "the hit is taken as a miss: the entry is rebuilt and the compile succeeds")
def _(ctx):
    import subprocess
    cache = ctx.tmp_path / "cache"
    ctx.monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache))
    spec = fresh_spec("rel_cache_race").replace(isa="generic")
    # built by another process, so that this one has not loaded the module yet
    subprocess.run([sys.executable, "-c", f"import ktgen; ktgen.compile(ktgen.MoESpec.model_validate_json("
                    f"{spec.model_dump_json()!r}))"], check=True, env={**__import__("os").environ})
    real, imports = compiler._import, []

    def racing(name, path):
        if not imports:
            assert compiler.clear_cache()[0] == 1   # the entry goes after the manifest was read
        imports.append(path)
        return real(name, path)

    ctx.monkeypatch.setattr(compiler, "_import", racing)
    kernel = ktgen.compile(spec)
    assert kernel.compiled and len(imports) == 2
    assert kernel.error(12).startswith("another call is running")


# ---- the tests ----

_ENV: Env | None = None


@pytest.fixture(scope="module")
def env():
    global _ENV
    spec = rel_spec()
    rng = np.random.default_rng(0)
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    weights = tuple((rng.standard_normal(s, np.float32) * 0.5).astype(bf16)
                    for s in [(E, I, H), (E, I, H), (E, H, I)])
    lora = ktgen.LoRAWeights.random(spec, rng, 0.1)
    moe = ktgen.MoE(spec, *weights, lora)
    x = rng.standard_normal((T, H), np.float32).astype(bf16)
    ids = np.array([[0, 1], [2, 3], [1, -1], [3, 3]], np.int64)
    rw = rng.random((T, 2)).astype(np.float32)
    go = rng.standard_normal((T, H), np.float32).astype(bf16)
    nspec = nolora_spec()
    nolora = ktgen.MoE(nspec, *[(rng.standard_normal(s, np.float32)).astype(bf16)
                                for s in [(2, 32, 32)] * 3])
    _ENV = Env(moe, weights, lora, x, ids, rw, go, nolora)
    yield _ENV
    _ENV = None


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c, env, monkeypatch, tmp_path):
    run_case(c, Ctx(env, monkeypatch, tmp_path))


def test_docs_table_matches_cases():
    check_cases_doc(CASES, DOC)


def render_doc() -> str:
    head = """# Bad inputs and what they get

Every bad input ktgen is known to meet, and what the caller gets: the exception (or none)
and a fragment of its message (`…` stands for any text). One row per case; each row
is one test of `tests/system/test_bad_inputs.py` (`test_bad_input[<id>]`), and
`test_docs_table_matches_cases` checks that this table and the test's `CASES` list agree row
for row. Regenerate the table with
`python tests/system/test_bad_inputs.py > docs/bad_inputs.md`. The files ktgen reads (packed weight
files, pack directories, checkpoints, adapters) have their own table: `docs/bad_files.md`.

General rules (docs/design.md#the-python-api): every array argument must be a C-contiguous NumPy array of the
stated dtype and shape, else `ValueError` naming the argument, what it expected and what it got.
A rejected `forward_train` takes no saved-forward slot; a rejected `backward` leaves its saved
forward usable; a rejected `set_lora` leaves the LoRA in use unchanged. NaN and Inf are not
checked (that would cost a pass over every input): they propagate to `out`, in the tokens they
touch only. Every `quant.mode` of docs/design.md#the-spec is implemented, so no spec raises `NotImplementedError`.

The array rows use the `rel_small` spec (E=4, k=2, H=64, I=64, LoRA rank 4 float32, max_len 16,
T=4); a wrong dtype is float32 for a bf16 array (float64 for a float32 one, float32 for
`expert_ids`), a wrong shape has one extra column, a non-contiguous array is every other column
of a twice-as-wide one.

"""
    return head + table(CASES)


if __name__ == "__main__":
    sys.stdout.write(render_doc())

"""What the tests share: the tiers this CPU runs, the LoRA names, the accuracy limits, the specs
every file uses (kept identical so the kernels compile once a session) and the data makers.
Test modules import from here, never from each other."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
import pytest

import ktgen
from ktgen import isa
from ktgen import reference as ref
from ktgen.render import BLOCKING

bf16 = np.dtype(ml_dtypes.bfloat16)

LORA_NAMES = ktgen.LORA_NAMES
GRAD_FIELDS = ("input", "routing_weights") + LORA_NAMES

# relL2 limits against ktgen.reference, (out, every gradient) per quant mode (docs/design.md,
# "Accuracy"): ktgen's own table, which `ktgen check` applies too.
LIMITS = ref.ACCURACY_LIMITS
OUT_TOL, GRAD_TOL = LIMITS["bf16"]
QUANT_OUT_TOL, QUANT_GRAD_TOL = LIMITS["int8"]
assert all(LIMITS[m] == (QUANT_OUT_TOL, QUANT_GRAD_TOL) for m in ("int8", "awq", "k2"))

# Tiers rendered by ktgen that this CPU runs natively, plus avx512 through its software
# emulation (KTGEN_EMULATE_AVX512=1, bit-exact with native) on a CPU without AVX-512, so that
# every tier's kernels are tested everywhere. amx and avx512bf16 (which differs from avx512 in
# its bf16 forward GEMMs only) have tests of their own that run emulated everywhere
# (test_amx.py, test_avx512bf16.py); conftest turns on the emulation of every tier in EMULATED.
NATIVE_TIERS = [t for t in isa.available_tiers() if t in BLOCKING and t != "amx"]
EMULATED = [t for t in ("avx512bf16", "avx512") if t not in NATIVE_TIERS]
EMULATED_AVX512 = "avx512" in EMULATED
RUN_TIERS = NATIVE_TIERS + (["avx512"] if EMULATED_AVX512 else [])
ALL_TIERS = list(BLOCKING)


def make_weights(spec, rng, std=0.5):
    """bf16 gate [E,I,H], up [E,I,H], down [E,H,I] of the given std."""
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    gate = (rng.standard_normal((E, I, H), np.float32) * std).astype(bf16)
    up = (rng.standard_normal((E, I, H), np.float32) * std).astype(bf16)
    down = (rng.standard_normal((E, H, I), np.float32) * std).astype(bf16)
    return gate, up, down


def make_inputs(spec, rng, T, std=1.0, ids=None):
    """x bf16 [T,H], expert_ids int64 [T,k] (random with some -1 slots unless given),
    routing_weights float32 [T,k]."""
    k = spec.num_experts_per_tok
    x = (rng.standard_normal((T, spec.hidden_size), np.float32) * std).astype(bf16)
    if ids is None:
        ids = rng.integers(0, spec.expert_num, (T, k))
        ids[rng.random((T, k)) < 0.1] = -1
    rw = rng.random((T, k)).astype(np.float32)
    return x, np.asarray(ids, np.int64), rw


LORA_KINDS = ["float32", "bfloat16", None]
# (weight std, activation std): the corners of what real models see (docs/design.md#accuracy).
MAGNITUDES = [(0.02, 10.0), (1.0, 0.01), (1.0, 10.0), (0.02, 0.01)]
AWK_MAX_LEN = 100
AWK_TOKENS = [0, 1, 7, 64, AWK_MAX_LEN]
# (T, weight std, activation std): every T, two magnitudes each, all four at T = max_len.
AWK_CASES = [(0, 0.02, 10.0), (0, 1.0, 0.01), (1, 1.0, 0.01), (1, 0.02, 10.0), (7, 1.0, 10.0),
             (7, 0.02, 0.01), (64, 0.02, 10.0), (64, 1.0, 0.01)] + [
    (AWK_MAX_LEN, w, x) for w, x in MAGNITUDES]
assert sorted({c[0] for c in AWK_CASES}) == AWK_TOKENS
ROUTINGS = ["random", "duplicates", "empty_expert", "one_expert", "one_expert_every_slot",
            "reversed_order"]


# ---- specs (kept identical across test files so the kernels compile once a session) ----

def awkward_spec(lora_dtype, tier="auto"):
    lora = None if lora_dtype is None else dict(rank=5, dtype=lora_dtype)
    return ktgen.MoESpec(name="awkward", expert_num=8, num_experts_per_tok=3, hidden_size=96,
                         intermediate_size=160, max_len=AWK_MAX_LEN, lora=lora, isa=tier)


# Qwen3-30B-A3B's layer dims, fewer experts. Per (tier): tp1/f32, tp2/f32, tp2/bf16 (rsLoRA), tp2/none.
QWEN_VARIANTS = {
    "tp1-f32": (1, "float32"),
    "tp2-f32": (2, "float32"),
    "tp2-bf16": (2, "bfloat16"),
    "tp2-nolora": (2, None),
}


def qwen_spec(variant, tier="auto"):
    tp, lora_dtype = QWEN_VARIANTS[variant]
    if lora_dtype is None:
        lora = None
    elif lora_dtype == "bfloat16":
        lora = dict(rank=16, alpha=8.0, use_rslora=True, dtype="bfloat16")  # s = 8 / 4 = 2
    else:
        lora = dict(rank=16, dtype="float32")                                # s = 32 / 16 = 2
    return ktgen.load_spec("qwen3-30b-a3b").replace(
        expert_num=4, num_experts_per_tok=2, max_len=16, tp_count=tp, lora=lora, isa=tier)


def lora_std(spec, weight_std):
    """LoRA A/B std so that s*B(Ax) is about half the base term: LoRA matters but does not dominate."""
    return float(np.sqrt(0.5 * weight_std / (spec.lora.scale * np.sqrt(spec.lora.rank))))


@functools.lru_cache(maxsize=8)
def _weights(E, I, H, seed, weight_std):
    spec = ktgen.MoESpec(name="w", expert_num=E, num_experts_per_tok=1, hidden_size=H,
                         intermediate_size=I)
    arrays = make_weights(spec, np.random.default_rng(seed), weight_std)
    for a in arrays:
        a.flags.writeable = False  # shared between tests
    return arrays


def base_weights(spec, seed, weight_std):
    """make_weights for the spec's shape, made once per (shape, seed, std) and shared read-only."""
    return _weights(spec.expert_num, spec.intermediate_size, spec.hidden_size, seed, weight_std)


def build(spec, seed=0, weight_std=1.0, lora="random"):
    """(moe, lora) with base weights of the given std; lora 'random', 'zeros' or None.
    The base weights of one (shape, seed, std) are made once and shared (they are read-only)."""
    rng = np.random.default_rng(seed + 1000)
    gate, up, down = base_weights(spec, seed, weight_std)
    lw = None
    if spec.lora is not None and lora == "random":
        lw = ktgen.LoRAWeights.random(spec, rng, lora_std(spec, weight_std))
    elif spec.lora is not None and lora == "zeros":
        lw = ktgen.LoRAWeights.zeros(spec)
    return ktgen.MoE(spec, gate, up, down, lw), lw


def expected_forward(moe, x, ids, rw):
    spec = moe.spec
    return ref.forward(x, ids, rw, moe.dequantized("gate"), moe.dequantized("up"),
                       moe.dequantized("down"), moe.lora,
                       spec.lora.scale if spec.lora else 1.0, spec.swiglu_limit)


def routing(kind, T, k, E, rng):
    """expert_ids [T, k] int64 for one of ROUTINGS."""
    if kind == "random":                       # with about 10% skipped slots
        ids = rng.integers(0, E, (T, k))
        ids[rng.random((T, k)) < 0.1] = -1
    elif kind == "duplicates":                 # the same expert twice (or more) in a row
        ids = rng.integers(0, E, (T, k))
        ids[:, 1] = ids[:, 0]
        ids[::3, :] = ids[::3, :1]
    elif kind == "empty_expert":               # experts 0 and E-2 get no token at all
        pool = np.array([e for e in range(E) if e not in (0, E - 2)])
        ids = pool[rng.integers(0, len(pool), (T, k))]
        ids[rng.random((T, k)) < 0.1] = -1
    elif kind == "one_expert":                 # every token on expert E-1, other slots skipped
        ids = np.full((T, k), -1)
        ids[:, 0] = E - 1
    elif kind == "one_expert_every_slot":      # every slot of every token on expert 2
        ids = np.full((T, k), 2)
    elif kind == "reversed_order":             # late tokens on low experts, slots descending
        ids = np.empty((T, k), np.int64)
        for t in range(T):
            for j in range(k):
                ids[t, j] = (E - 1 - (t * E) // max(T, 1) - 2 * j) % E
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(ids, np.int64)


def check_out(out, T, H):
    assert isinstance(out, np.ndarray)
    assert out.dtype == bf16
    assert out.shape == (T, H)
    assert out.flags.c_contiguous


def expected_backward(moe, x, ids, rw, grad_out):
    spec = moe.spec
    return ref.backward(x, ids, rw, moe.dequantized("gate"), moe.dequantized("up"),
                        moe.dequantized("down"), grad_out, moe.lora,
                        spec.lora.scale if spec.lora else 1.0, spec.swiglu_limit)


# ---- the amx (and avx512bf16) layer: M tails on both sides of a 16-row tile ----

def amx_spec(mode, lora, tp, G=32):
    """lora: False, True (rank 3: the scalar paths of the LoRA on the tiles), or a LoRA dict."""
    q = {"mode": mode} if mode in ("bf16", "int8") else {"mode": mode, "group_size": G}
    return ktgen.MoESpec(name=f"amx_{mode}", expert_num=5, num_experts_per_tok=2, hidden_size=96,
                         intermediate_size=128, max_len=64, quant=q, tp_count=tp,
                         lora={"rank": 3} if lora is True else (lora or None))


def tail_routing(rng, E=5):
    """Experts with 1, 15, 17, 16 and 0 entries: M tails on both sides of a 16-row tile."""
    flat = np.concatenate([np.full(n, e) for e, n in ((0, 1), (1, 15), (2, 17), (3, 16))])
    rng.shuffle(flat)  # token order differs from expert order
    ids = np.full(50, -1)
    ids[:49] = flat
    return ids.reshape(25, 2)


def run_layer(spec, seed=0, std=0.5):
    rng = np.random.default_rng(seed)
    gate, up, down = make_weights(spec, rng, std=std)
    lw = ktgen.LoRAWeights.random(spec, rng, std=0.3) if spec.lora else None
    moe = ktgen.MoE(spec, gate, up, down, lw)
    ids = tail_routing(rng)
    T = ids.shape[0]
    x = rng.standard_normal((T, spec.hidden_size), np.float32).astype(bf16)
    rw = rng.random(ids.shape).astype(np.float32)
    grad_out = (rng.standard_normal((T, spec.hidden_size)) * 0.1).astype(bf16)
    out, saved = moe.forward_train(x, ids, rw)
    grads = moe.backward(saved, grad_out)
    return moe, (x, ids, rw, grad_out, lw), out, grads


def assert_layer_meets_limits(moe, mode, inputs, out, grads):
    """A run_layer result against the float64 reference on the kernels' dequantized weights,
    within the accuracy limits of `mode` (out, then every gradient)."""
    x, ids, rw, grad_out, lw = inputs
    dq = [moe.dequantized(n) for n in ("gate", "up", "down")]
    scale = moe.spec.lora.scale if moe.spec.lora else 1.0
    out_limit, grad_limit = LIMITS[mode]
    clamp = moe.spec.swiglu_limit
    assert ref.rel_l2(out, ref.forward(x, ids, rw, *dq, lw, scale, clamp)) <= out_limit
    expect = ref.backward(x, ids, rw, *dq, grad_out, lw, scale, clamp)
    for name, e in expect.items():
        assert ref.rel_l2(getattr(grads, name), e) <= grad_limit, name


def build_harness(tmp_path, target, harness: str) -> str:
    """Compile a C harness that #includes the kernel rendered for `target` (a tiny spec), with
    the flags the target compiles with; returns the executable's path."""
    from ktgen.render import render

    spec = ktgen.MoESpec(name="harness", expert_num=2, num_experts_per_tok=1, hidden_size=32,
                         intermediate_size=32, max_len=4, lora=None)
    rendered = render(spec, target)
    d = tmp_path / ("emulated" if target.emulate else "native")
    d.mkdir()
    (d / rendered.header_name).write_text(rendered.header)
    (d / "kernel.c").write_text(rendered.source)
    (d / "harness.c").write_text(harness)
    subprocess.run(["cc", *target.cflags, "-w", "harness.c", "-o", "harness", "-lm"], check=True, cwd=d)
    return str(d / "harness")


# ---- checkpoint formats, packed by independent implementations of the published layouts ----

def pack_autoawq(intweight, intzeros):
    """AutoAWQ GEMM packing (WQLinear_GEMM.from_linear): int [K, N] -> int32 [K, N/8], where
    nibble i of word c holds column 8c + order[i], order = [0, 2, 4, 6, 1, 3, 5, 7]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack(a):
        rows, N = a.shape
        out = np.zeros((rows, N // 8), np.uint32)
        for c in range(N // 8):
            for i in range(8):
                out[:, c] |= a[:, 8 * c + order[i]].astype(np.uint32) << np.uint32(4 * i)
        return out.view(np.int32)

    return pack(intweight), pack(intzeros)


def pack_compressed_tensors(q):
    """compressed-tensors pack-quantized int4: int [N, K] in -8..7 stored as q + 8,
    element k = 8c + i at bits 4i .. 4i+3 of int32 word c."""
    u = (q + 8).astype(np.uint32)
    N, K = q.shape
    out = np.zeros((N, K // 8), np.uint32)
    for i in range(8):
        out |= u[:, i::8] << np.uint32(4 * i)
    return out.view(np.int32)


# ---- the small specs of the reliability tests (compiled once a session) ----

def rel_spec(tp=1):
    """E=4, k=2, H=64, I=64, max_len 16: LoRA rank 4 float32 (tp 1) or bfloat16 (tp 2)."""
    return ktgen.MoESpec(name="rel_small", expert_num=4, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=64, max_len=16, tp_count=tp,
                         lora=dict(rank=4, dtype="float32" if tp == 1 else "bfloat16"))


# ---- tables of cases: every bad input and what it gets (docs/bad_inputs.md, docs/bad_files.md) ----

@dataclass
class Case:
    id: str
    what: str                         # the bad input, in words
    raises: type | None               # None: no exception
    fragment: str                     # in the message (… = any text); or the outcome if nothing is raised
    run: Callable

    @property
    def result(self) -> str:
        if self.raises is None:
            return "no exception"
        mod = "ktgen." if self.raises.__module__.startswith("ktgen") else ""
        return f"{mod}{self.raises.__name__}"


def case_list():
    """(cases, case): a list of Cases and the decorator `case(id, what, raises, fragment)` that
    appends the function it decorates (called with the test's context) to it."""
    cases: list[Case] = []

    def case(id, what, raises, fragment):
        def deco(fn):
            cases.append(Case(id, what, raises, fragment, fn))
            return fn
        return deco
    return cases, case


def matches(fragment: str, message: str) -> bool:
    """The fragment is in the message; `…` in a fragment stands for any text."""
    return re.search(".*?".join(re.escape(p) for p in fragment.split("…")), message, re.S) is not None


def run_case(c: Case, ctx) -> None:
    """Run a case: it raises exactly its exception with its fragment, or nothing."""
    if c.raises is None:
        c.run(ctx)
        return
    with pytest.raises(c.raises) as info:
        c.run(ctx)
    assert type(info.value) is c.raises, f"{type(info.value).__name__}: {info.value}"
    assert matches(c.fragment, str(info.value)), f"{c.fragment!r} not in {str(info.value)!r}"


def _escape(s: str) -> str:
    return s.replace("|", "\\|")


def _unescape(s: str) -> str:
    s = s.replace("\\|", "|")
    return s[1:-1] if s.startswith("`") and s.endswith("`") else s


def doc_rows(text: str) -> dict[str, tuple[str, str]]:
    """id -> (result, fragment) of every table row of a cases document."""
    rows = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| `([^`]+)` \| (.*) \| (.*) \| (.*) \|", line.strip())
        if m:
            assert m.group(1) not in rows, f"row {m.group(1)} twice"
            rows[m.group(1)] = (m.group(3).strip().strip("`"), _unescape(m.group(4).strip()))
    return rows


def table(cases: list[Case]) -> str:
    rows = [f"| `{c.id}` | {_escape(c.what)} | `{c.result}` | `{_escape(c.fragment)}` |"
            if c.raises is not None else
            f"| `{c.id}` | {_escape(c.what)} | {c.result} | {_escape(c.fragment)} |"
            for c in cases]
    return "| id | bad input | result | message contains |\n| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"


def check_cases_doc(cases: list[Case], doc) -> None:
    """The document has exactly the cases' rows, with their results and fragments."""
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9_.\-]+", i) for i in ids), ids
    rows = doc_rows(doc.read_text())
    missing = [c.id for c in cases if c.id not in rows]
    extra = sorted(set(rows) - set(ids))
    assert not missing and not extra, f"{doc.name}: missing rows {missing}, unknown rows {extra}"
    for c in cases:
        assert rows[c.id] == (c.result, c.fragment), (c.id, rows[c.id], (c.result, c.fragment))


# ---- sanitized subprocesses (tests/system/test_sanitize.py, tests/system/test_fuzz_files.py) ----

def libasan() -> str | None:
    cc = os.environ.get("KTGEN_CC") or os.environ.get("CC") or "cc"
    try:
        out = subprocess.run([cc.split()[0], "-print-file-name=libasan.so"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except OSError:
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


def sanitized_env(kernel_cache: str, repo) -> dict:
    """The environment of a subprocess whose kernels run under ASan and UBSan: the ASan runtime
    preloaded (it must be first), every kernel built with -fsanitize=address,undefined."""
    asan = libasan()
    assert asan, "the C compiler has no libasan.so (Debian: apt-get install libasan8 / gcc)"
    env = dict(os.environ)
    env.pop("KTGEN_ISA", None)
    env.update(LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1",
               KTGEN_SANITIZE="address,undefined", KTGEN_CACHE_DIR=kernel_cache,
               PYTHONPATH=os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p))
    return env

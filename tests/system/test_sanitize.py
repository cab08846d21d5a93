"""The kernels under AddressSanitizer + UndefinedBehaviorSanitizer.

`KTGEN_SANITIZE=address,undefined` builds every kernel with
`-fsanitize=address,undefined -fno-sanitize-recover=all`. An ASan kernel only loads into a
process that starts with the ASan runtime preloaded, so the check runs in subprocesses:

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        KTGEN_SANITIZE=address,undefined python script.py

The script runs, for every tier in RUN_TIERS and the emulated amx tier, each quant mode once
(with LoRA float32 / bfloat16 / off and tp_count 1 and 2 spread over the modes), a small spec's
forward, forward_train + backward at awkward routings (T = 0,
T = max_len, every slot skipped, every token on one expert, duplicate experts in a row,
two saved forwards given back out of order, an in-place LoRA update, the packed weights saved,
mapped back and packed again) and checks the accuracy limits (docs/design.md#accuracy) against
ktgen.reference, printing one `CASE ... OK` line per case. Any out-of-bounds access or UB
in a kernel aborts the process with an ASan/UBSan report on stderr.

Sanitized builds use -O1 (ASan's usual level), ~5 s a kernel, and the cases are split over two
processes that run at once (one per core of the reference machine); sanitized kernels are
cached like any other (their flags are part of the cache key), so a rerun with
KTGEN_TEST_CACHE_DIR is quick.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ktgen
from helpers import RUN_TIERS, sanitized_env

REPO = Path(__file__).resolve().parents[2]
SHARDS = 2
# (quant mode, LoRA, tp_count) run on every tier: each mode once, the LoRA kinds and tp spread.
MODE_CASES = (("bf16", "float32", 2), ("int8", "bfloat16", 1), ("awq", "none", 2), ("k2", "float32", 1))
SANITIZED_TIERS = RUN_TIERS + ["amx"]  # amx through KTGEN_EMULATE_AMX
ROUTINGS = ("T0", "Tmax", "all_skipped", "one_expert", "duplicates", "random")

SCRIPT = textwrap.dedent(r'''
    """Sanitizer check: run every case of one shard, print one line per case."""
    import json
    import os
    import sys
    import zlib

    # The ASan runtime is already loaded into this process; the C compiler that ktgen runs
    # does not need it (and is ~20% slower with it).
    os.environ.pop("LD_PRELOAD", None)

    import ml_dtypes
    import numpy as np

    import ktgen
    from ktgen import reference as ref

    bf16 = ml_dtypes.bfloat16
    from ktgen import LORA_NAMES

    cases = json.loads(sys.argv[1])
    failures = 0


    def make_spec(tier, mode, lora_kind, tp):
        if lora_kind == "none":
            lora = None
        elif lora_kind == "bfloat16":
            lora = dict(rank=3, alpha=4.0, use_rslora=True, dtype="bfloat16")
        else:
            lora = dict(rank=3, dtype="float32")
        # awkward sizes: H = 3 blocks of 32, k = 3, max_len 17 (odd)
        quant = {"mode": mode} if mode in ("bf16", "int8") else {"mode": mode, "group_size": 32}
        return ktgen.MoESpec(name=f"san_{mode}_{lora_kind}_tp{tp}", expert_num=4, num_experts_per_tok=3,
                             hidden_size=96, intermediate_size=64, max_len=17, lora=lora,
                             tp_count=tp, isa=tier, quant=quant)


    def routing(kind, spec, rng):
        E, k, L = spec.expert_num, spec.num_experts_per_tok, spec.max_len
        if kind == "T0":
            return np.empty((0, k), np.int64)
        if kind == "Tmax":
            ids = rng.integers(0, E, (L, k))
            ids[rng.random((L, k)) < 0.15] = -1
            return ids
        if kind == "all_skipped":
            return np.full((L, k), -1, np.int64)
        if kind == "one_expert":      # every token on the last expert, other slots skipped
            ids = np.full((L, k), -1, np.int64)
            ids[:, 0] = E - 1
            return ids
        if kind == "duplicates":      # the same expert in several slots of a row
            ids = rng.integers(0, E, (L, k))
            ids[:, 1] = ids[:, 0]
            ids[::2, 2] = ids[::2, 0]
            return ids
        if kind == "random":
            ids = rng.integers(-1, E, (5, k))
            return ids
        raise AssertionError(kind)


    def inputs(spec, rng, ids):
        T, H = ids.shape[0], spec.hidden_size
        x = rng.standard_normal((T, H), np.float32).astype(bf16)
        rw = rng.random(ids.shape).astype(np.float32)
        go = rng.standard_normal((T, H), np.float32).astype(bf16)
        return x, np.ascontiguousarray(ids, np.int64), rw, go


    def check(moe, x, ids, rw, go, out, grads):
        """The worst relL2 of each checked quantity, raising AssertionError past its accuracy limit."""
        spec = moe.spec
        W = [moe.dequantized(n) for n in ("gate", "up", "down")]
        s = spec.lora.scale if spec.lora else 1.0
        e_out = ref.forward(x, ids, rw, *W, moe.lora, s)
        errs = {"out": ref.rel_l2(out, e_out)}
        if grads is not None:
            e = ref.backward(x, ids, rw, *W, go, moe.lora, s)
            errs["input"] = ref.rel_l2(grads.input, e["input"])
            errs["rw"] = ref.rel_l2(grads.routing_weights, e["routing_weights"])
            if spec.lora is not None:
                errs["lora"] = max(ref.rel_l2(getattr(grads, n), e[n]) for n in LORA_NAMES)
            else:
                assert all(getattr(grads, n) is None for n in LORA_NAMES)
        out_tol, grad_tol = ref.limits(spec.quant.mode)
        for name, err in errs.items():
            tol = out_tol if name == "out" else grad_tol
            assert err <= tol, f"{name}: relL2 {err:.3e} > {tol}"
        return errs


    def fmt(errs):
        return " ".join(f"{k}={v:.1e}" for k, v in errs.items())


    def run_case(tier, mode, lora_kind, tp, routings):
        global failures
        spec = make_spec(tier, mode, lora_kind, tp)
        rng = np.random.default_rng(zlib.crc32(f"{tier}/{mode}/{lora_kind}/{tp}".encode()))
        gate, up, down = (
            (rng.standard_normal(s, np.float32) * 0.5).astype(bf16)
            for s in [(4, 64, 96), (4, 64, 96), (4, 96, 64)])
        lora = None
        if spec.lora is not None:
            lora = ktgen.LoRAWeights.random(spec, rng, 0.2)
        moe = ktgen.MoE(spec, gate, up, down, lora)
        assert moe.kernel.isa == tier, moe.kernel.isa
        assert "-fsanitize=address,undefined" in json.load(
            open(moe.kernel.path / "manifest.json"))["flags"]
        tag = f"tier={tier} mode={mode} lora={lora_kind} tp={tp}"
        for kind in routings:
            try:
                x, ids, rw, go = inputs(spec, rng, routing(kind, spec, rng))
                out = moe.forward(x, ids, rw)
                check(moe, x, ids, rw, go, out, None)
                out_t, saved = moe.forward_train(x, ids, rw)
                grads = moe.backward(saved, go)
                errs = check(moe, x, ids, rw, go, out_t, grads)
                print(f"CASE {tag} routing={kind} T={x.shape[0]} {fmt(errs)} OK", flush=True)
            except Exception as exc:
                failures += 1
                print(f"CASE {tag} routing={kind} FAIL {type(exc).__name__}: {exc}", flush=True)

        # two saved forwards at once, given back out of order; a third dropped unused
        try:
            a = inputs(spec, rng, routing("Tmax", spec, rng))
            b = inputs(spec, rng, routing("random", spec, rng))
            out_a, saved_a = moe.forward_train(*a[:3])
            out_b, saved_b = moe.forward_train(*b[:3])
            grads_b = moe.backward(saved_b, b[3])
            _, dropped = moe.forward_train(*b[:3])
            del dropped
            grads_a = moe.backward(saved_a, a[3])
            errs_a = check(moe, *a, out_a, grads_a)
            errs_b = check(moe, *b, out_b, grads_b)
            print(f"CASE {tag} routing=two_slots T={a[0].shape[0]}+{b[0].shape[0]} "
                  f"{fmt({k: max(errs_a[k], errs_b[k]) for k in errs_a})} OK", flush=True)
        except Exception as exc:
            failures += 1
            print(f"CASE {tag} routing=two_slots FAIL {type(exc).__name__}: {exc}", flush=True)

        # zero-copy LoRA: an in-place update is seen by the next forward
        if lora is not None:
            try:
                for n in LORA_NAMES:
                    a = getattr(lora, n)
                    a[...] = (a.astype(np.float32) * -1.5).astype(a.dtype)
                x, ids, rw, go = inputs(spec, rng, routing("Tmax", spec, rng))
                errs = check(moe, x, ids, rw, go, moe.forward(x, ids, rw), None)
                print(f"CASE {tag} routing=lora_inplace T={x.shape[0]} {fmt(errs)} OK", flush=True)
            except Exception as exc:
                failures += 1
                print(f"CASE {tag} routing=lora_inplace FAIL {type(exc).__name__}: {exc}", flush=True)
        # packed weights: saved, mapped back, unpacked and packed again (the same kernel)
        try:
            import tempfile
            x, ids, rw, go = inputs(spec, rng, routing("Tmax", spec, rng))
            want = moe.forward(x, ids, rw).view(np.uint16)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "layer.safetensors")
                moe.save_packed(path)
                mapped = ktgen.MoE.from_packed(path, lora=lora)
                assert mapped.mapped and np.array_equal(mapped.forward(x, ids, rw).view(np.uint16), want)
                mapped._load(dict(zip(("gate", "up", "down"), moe.base_weights())))   # own storage again
                assert np.array_equal(mapped.forward(x, ids, rw).view(np.uint16), want)
                mapped.close()
                del mapped
            print(f"CASE {tag} routing=packed T={x.shape[0]} OK", flush=True)
        except Exception as exc:
            failures += 1
            print(f"CASE {tag} routing=packed FAIL {type(exc).__name__}: {exc}", flush=True)
        moe.close()


    for tier, mode, lora_kind, tp in cases:
        run_case(tier, mode, lora_kind, tp, ["T0", "Tmax", "all_skipped", "one_expert", "duplicates", "random"])
    print(f"DONE cases={len(cases)} failures={failures}", flush=True)
    sys.exit(1 if failures else 0)
''')


def combos():
    return [(tier,) + case for tier in SANITIZED_TIERS for case in MODE_CASES]


def expected_lines(tier, mode, lora, tp):
    names = list(ROUTINGS) + ["two_slots"] + ([] if lora == "none" else ["lora_inplace"]) + ["packed"]
    return [f"CASE tier={tier} mode={mode} lora={lora} tp={tp} routing={name} " for name in names]


def test_sanitized_kernels_are_clean(tmp_path, kernel_cache):
    script = tmp_path / "sanitize_check.py"
    script.write_text(SCRIPT)
    env = sanitized_env(kernel_cache, REPO)
    env["KTGEN_EMULATE_AMX"] = "1"
    all_cases = combos()
    shards = [all_cases[i::SHARDS] for i in range(SHARDS)]
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(cases)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cases in shards if cases]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, stdout, stderr))

    stdout = "".join(r[1] for r in results)
    stderr = "".join(r[2] for r in results)
    report = f"--- stdout ---\n{stdout}\n--- stderr (tail) ---\n{stderr[-6000:]}"
    assert "ERROR: AddressSanitizer" not in stderr, report
    assert "runtime error:" not in stderr, report
    assert [r[0] for r in results] == [0] * len(results), report
    assert "FAIL" not in stdout, report
    lines = [ln for ln in stdout.splitlines() if ln.startswith("CASE ")]
    for case in all_cases:
        for prefix in expected_lines(*case):
            hits = [ln for ln in lines if ln.startswith(prefix)]
            assert len(hits) == 1 and hits[0].endswith(" OK"), f"{prefix!r} missing\n{report}"
    assert len(lines) == sum(len(expected_lines(*c)) for c in all_cases), report
    done = re.findall(r"^DONE cases=(\d+) failures=(\d+)$", stdout, re.M)
    assert sorted(done) == sorted((str(len(s)), "0") for s in shards if s), report
    print(stdout)  # the summary, visible with pytest -s / -rP


def test_unknown_sanitizer_is_a_compiler_error(monkeypatch):
    monkeypatch.setenv("KTGEN_SANITIZE", "address,bogus")
    spec = ktgen.MoESpec(name="san_unknown", expert_num=2, num_experts_per_tok=1, hidden_size=32,
                         intermediate_size=32, max_len=4)
    with pytest.raises(ktgen.CompilerError, match="KTGEN_SANITIZE") as info:
        ktgen.compile(spec)
    assert "bogus" in str(info.value)
    assert "address" in str(info.value) and "undefined" in str(info.value)  # what is supported


def test_sanitize_flags_change_the_cache_key(monkeypatch):
    """A sanitized kernel never reuses (or overwrites) the plain kernel's cache entry."""
    from ktgen import compiler
    from ktgen.render import render

    spec = ktgen.MoESpec(name="san_key", expert_num=2, num_experts_per_tok=1, hidden_size=32,
                         intermediate_size=32, max_len=4, isa="generic")
    rendered = render(spec, "generic")
    cc = shutil.which("cc") or "gcc"
    plain = compiler.cache_key(rendered, ktgen.Target("generic", cc=cc))
    target = ktgen.Target("generic", cc=cc, sanitize=("address", "undefined"))
    sanitized = compiler.cache_key(rendered, target)
    assert plain != sanitized
    assert "-fsanitize=address,undefined" in target.cflags and "-fno-sanitize-recover=all" in target.cflags
    assert "-fsanitize=address,undefined" in target.ldflags

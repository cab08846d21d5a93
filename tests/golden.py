"""Golden hashes of the kernels' results: every target x quant mode x LoRA kind x tp_count,
forward (inference and saved) and backward, on fixed inputs, as SHA-256 digests of the bits.

A change to the compiler that must not change any result (a restructuring, a new file layout,
a tier moved elsewhere) is checked by recording the hashes before it and comparing after:

    python tests/golden.py record tests/golden.json      # on the code before the change
    python tests/golden.py check tests/golden.json       # after it: lists every case that differs

`tests/kernels/test_golden.py` checks the recorded file for the targets this CPU runs (natively, or
through the emulations, which are bit-exact with native code). A change that means to change
results (other arithmetic) records the file again and says so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

bf16 = np.dtype(ml_dtypes.bfloat16)

# (target name, emulated): every kernel set the renderer has, with and without VNNI.
TARGETS = [("generic", False), ("avx2", False), ("avx512", False), ("avx512+vnni", False),
           ("avx512bf16", False), ("avx512bf16+vnni", False), ("avx512", True), ("avx512bf16", True),
           ("amx", True)]
MODES = ("bf16", "int8", "awq", "k2")
# (LoRA dtype or None, rank, tp_count)
LORAS = (("float32", 16, 1), ("float32", 16, 2), ("bfloat16", 5, 1), ("bfloat16", 16, 2), (None, 0, 1),
         (None, 0, 2))
ACTIVATIONS = (None, 1.5)   # swiglu_limit: plain SiLU, and the clamped one (tp 1, float32 LoRA only)


def case_name(target: str, emulated: bool, mode: str, lora, rank: int, tp: int, limit) -> str:
    t = target + ("-emulated" if emulated else "")
    l = f"{lora}-r{rank}" if lora else "nolora"
    a = f"-clamp{limit}" if limit else ""
    return f"{t}/{mode}/{l}/tp{tp}{a}"


def cases():
    for target, emulated in TARGETS:
        for mode in MODES:
            for lora, rank, tp in LORAS:
                yield target, emulated, mode, lora, rank, tp, None
            yield target, emulated, mode, "float32", 16, 1, ACTIVATIONS[1]


def spec_of(mode, lora, rank, tp, limit):
    import ktgen
    q = dict(mode=mode)
    if mode in ("awq", "k2"):
        q["group_size"] = 32
    lora_spec = None if lora is None else dict(rank=rank, dtype=lora, alpha=2.0 * rank)
    return ktgen.MoESpec(name="golden", expert_num=6, num_experts_per_tok=3, hidden_size=256,
                         intermediate_size=192, max_len=160, quant=q, lora=lora_spec, tp_count=tp,
                         max_cache_depth=2, swiglu_limit=limit, threads=2)


def inputs(spec, seed=7):
    """Weights of std 0.05, LoRA of std 0.05, and two batches: a random routing with skipped
    slots (T = 131), and T = 160 with expert 2 in every slot of most tokens (a hot expert split
    into several chunks) and expert 5 empty."""
    import ktgen
    rng = np.random.default_rng(seed)
    E, H, I, k = spec.expert_num, spec.hidden_size, spec.intermediate_size, spec.num_experts_per_tok
    w = [(rng.standard_normal(s, np.float32) * 0.05).astype(bf16) for s in ((E, I, H), (E, I, H), (E, H, I))]
    lora = ktgen.LoRAWeights.random(spec, rng, 0.05) if spec.lora else None
    batches = []
    for T, hot in ((131, False), (160, True)):
        x = (rng.standard_normal((T, H), np.float32) * 2.0).astype(bf16)
        ids = rng.integers(0, E - 1, (T, k)).astype(np.int32)
        if hot:
            ids[: T - 9] = 2
        else:
            ids[rng.random((T, k)) < 0.15] = -1
        rw = rng.random((T, k)).astype(np.float32)
        dout = rng.standard_normal((T, H), np.float32).astype(bf16)
        batches.append((x, ids, rw, dout))
    return w, lora, batches


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            a = np.ascontiguousarray(a)
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.view(np.uint8).tobytes())
    return h.hexdigest()[:24]


def run_case(target, emulated, mode, lora, rank, tp, limit) -> str:
    import ktgen
    from ktgen.target import Target, parse
    tier, exts = parse(target)
    spec = spec_of(mode, lora, rank, tp, limit)
    w, lora_w, batches = inputs(spec)
    moe = ktgen.MoE(spec, *w, lora_w, isa=Target(tier, exts, emulated))
    parts = []
    for x, ids, rw, dout in batches:
        out_inf = moe.forward(x, ids, rw)
        out, saved = moe.forward_train(x, ids, rw)
        g = moe.backward(saved, dout)
        parts += [out_inf, out, g.input, g.routing_weights] + [getattr(g, n) for n in ktgen.LORA_NAMES]
    parts.append(moe.dequantized("down"))
    moe.close()
    return digest(*parts)


def runnable(target: str, emulated: bool) -> bool:
    from ktgen.target import Target, parse
    tier, exts = parse(target)
    return not Target(tier, exts, emulated).missing_features()


def main(argv) -> int:
    if len(argv) != 3 or argv[1] not in ("record", "check"):
        print(__doc__)
        return 2
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    path = Path(argv[2])
    old = json.loads(path.read_text()) if path.exists() else {}
    new, bad = dict(old) if argv[1] == "record" else {}, []
    for c in cases():
        name = case_name(*c)
        if not runnable(c[0], c[1]):
            print(f"skip  {name} (this CPU lacks it)", flush=True)
            continue
        h = run_case(*c)
        if argv[1] == "record":
            new[name] = h
            print(f"rec   {name} {h}", flush=True)
        else:
            ok = old.get(name) == h
            bad += [] if ok else [name]
            print(f"{'ok ' if ok else 'DIFF'}  {name} {h} {'' if ok else old.get(name)}", flush=True)
    if argv[1] == "record":
        path.write_text(json.dumps(dict(sorted(new.items())), indent=1) + "\n")
        print(f"{len(new)} hashes in {path}")
        return 0
    print(f"{len(bad)} differ" + (": " + ", ".join(bad) if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv))

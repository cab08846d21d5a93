"""Old against new in one process: two checkouts of ktgen side by side, the same layer, weights,
LoRA and routing, their calls alternating, and the median of the per-round new/old ratios.

    python benchmarks/ab.py OLD_CHECKOUT NEW_CHECKOUT [--spec qwen3-30b-a3b] [--qlen 64 512]
        [--modes bf16 int8 awq k2] [--isa auto] [--rounds 9]

Timings on shared machines drift by tens of percent within minutes; a ratio taken within each
round (old, then new, then the next round new first) cancels the drift that a comparison of two
separate runs would measure. Each checkout's `ktgen` package is copied under its own name
(ktgen_old, ktgen_new) so both import at once; their kernels compile into one cache (their keys
differ where their sources do). The outputs are compared bit for bit too.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def load(checkout: str, name: str, tmp: Path):
    shutil.copytree(Path(checkout) / "ktgen", tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
    pkg = importlib.import_module(name)
    for sub in ("workload", "quant"):
        importlib.import_module(f"{name}.{sub}")
    return pkg


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--spec", default="qwen3-30b-a3b")
    p.add_argument("--qlen", type=int, nargs="+", default=[64, 512])
    p.add_argument("--modes", nargs="+", default=["bf16", "int8", "awq", "k2"])
    p.add_argument("--isa", default="auto")
    p.add_argument("--experts", type=int, default=None, help="a subset of the layer's experts")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ktgen-ab-"))
    sys.path.insert(0, str(tmp))
    old, new = load(args.old, "ktgen_old", tmp), load(args.new, "ktgen_new", tmp)
    for mode in args.modes:
        base = old.load_spec(args.spec)
        q = {"mode": mode}
        spec_fields = dict(quant=q, isa=args.isa, max_len=max(args.qlen))
        if args.experts:
            spec_fields.update(expert_num=args.experts,
                               num_experts_per_tok=min(base.num_experts_per_tok, args.experts))
        specs = {m: m.load_spec(args.spec).replace(**spec_fields) for m in (old, new)}
        weights = old.workload.random_weights(specs[old], seed=1)
        if mode != "bf16":
            weights = tuple(old.quant.quantize(w, mode, specs[old].quant.group_size) for w in weights)
        rng = np.random.default_rng(2)
        lora = old.workload.random_lora(specs[old], rng)
        moes = {}
        for m in (old, new):
            lw = None if lora is None else m.LoRAWeights(*lora.arrays())
            ws = weights if mode == "bf16" else tuple(m.quant.QuantizedWeights(w.mode, w.q, w.scales, w.zeros, w.shape,
                                                                               w.group_size) for w in weights)
            moes[m] = m.MoE(specs[m], *ws, lw)
        for T in args.qlen:
            x, ids, rw, dout = old.workload.random_inputs(specs[old], T, np.random.default_rng(T))
            runs = {"fwd": {}, "bwd": {}}
            for m in (old, new):
                a = moes[m].forward(x, ids, rw)                       # warm-up, and the bits
                runs["fwd"].setdefault("out", []).append(a.view(np.uint16))
            same = np.array_equal(*runs["fwd"]["out"])
            ratios = {"fwd": [], "bwd": []}
            times = {(k, m): [] for k in ratios for m in (old, new)}
            for r in range(args.rounds):
                order = (old, new) if r % 2 == 0 else (new, old)
                t = {}
                for m in order:
                    t[("fwd", m)] = timed(lambda: moes[m].forward(x, ids, rw))
                    _, saved = moes[m].forward_train(x, ids, rw)
                    t[("bwd", m)] = timed(lambda: moes[m].backward(saved, dout))
                for k in ratios:
                    ratios[k].append(t[(k, new)] / t[(k, old)])
                    for m in (old, new):
                        times[(k, m)].append(t[(k, m)])
            tier = moes[new].kernel.target.name
            for k in ratios:
                print(f"{tier:16s} {mode:5s} {k} T={T:<5d} old median {statistics.median(times[(k, old)]):8.1f} ms  "
                      f"new median {statistics.median(times[(k, new)]):8.1f} ms  new/old per round median "
                      f"{statistics.median(ratios[k]):.3f}  (min {min(ratios[k]):.3f}, max {max(ratios[k]):.3f})"
                      + ("" if k == "bwd" else f"  outputs {'bit-identical' if same else 'DIFFER'}"), flush=True)
        for m in moes.values():
            m.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Timing a layer for `ktgen bench`: ktgen's forward and forward_train + backward, an fp32 GEMM
roof, the weight-streaming rate, and the PyTorch baselines of ktgen.baselines in the same run.
Returns plain dicts (written as --json); ktgen.cli prints them.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .baselines import load_average
from .runtime import MoE, usable_cores
from .workload import Plan

# The PyTorch baselines may be orders of magnitude slower (bf16 matmuls without native bf16
# instructions): they get fewer timed runs when their warm-up shows they would exceed this.
TORCH_BUDGET_S = 15.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def median_ms(fn, repeat: int, warmup: int = 1, budget_s: float | None = None) -> tuple[float, list[float]]:
    """Median wall time in ms of `repeat` calls after `warmup` calls, and every timed call.

    With `budget_s`, a slow fn gets fewer timed calls: as many as fit in budget_s judging by
    the warm-up (at least one), and none beyond the warm-up when the warm-up alone took longer
    than budget_s (its time is then the only sample)."""
    warm = []
    for _ in range(warmup):
        started = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - started)
    if budget_s is not None and warm:
        if warm[-1] > budget_s:
            return warm[-1] * 1e3, [warm[-1] * 1e3]
        repeat = max(1, min(repeat, int(budget_s / max(warm[-1], 1e-9))))
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), times


def numpy_roof(repeat: int) -> dict:
    """The fp32 roof where PyTorch is missing: a NumPy 2048^3 matmul."""
    n = 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    ms, _ = median_ms(lambda: a @ b, max(3, repeat))
    return {"what": f"numpy fp32 matmul {n}x{n}x{n}", "ms": ms, "gflops": 2 * n ** 3 / ms / 1e6}


def _gflops(flop: float, ms: float) -> float:
    return flop / ms * 1e3 if ms > 0 else float("nan")


def run(moe: MoE, plan: Plan, weights, lora, inputs, repeat: int, torch: bool = True,
        torch_budget_s: float = TORCH_BUDGET_S, say: Callable[[str], None] = lambda line: None) -> dict:
    """Every figure of one bench: `weights` (gate, up, down) and `lora` as the MoE got them,
    `inputs` (x, expert_ids, routing_weights, grad_out). `say` reports progress."""
    from . import baselines

    spec = moe.spec
    x, ids, rw, grad_out = inputs
    T = x.shape[0]
    R = repeat
    k, H, I = spec.num_experts_per_tok, spec.hidden_size, spec.intermediate_size
    gflop = 2 * 3 * T * k * H * I / 1e9     # base GEMMs of one forward; backward the same again

    fwd_ms, fwd_all = median_ms(lambda: moe.forward(x, ids, rw), R)
    parts = {"forward_train": [], "backward": []}

    def train():
        t0 = time.perf_counter()
        _, saved = moe.forward_train(x, ids, rw)
        t1 = time.perf_counter()
        moe.backward(saved, grad_out)
        t2 = time.perf_counter()
        parts["forward_train"].append((t1 - t0) * 1e3)
        parts["backward"].append((t2 - t1) * 1e3)

    train_ms, train_all = median_ms(train, R)
    # the forward reads every weight of each expert that has a token once
    active = len(np.unique(ids[ids >= 0]))
    weight_bytes = moe.memory()["base_weights"]
    streamed_gbs = weight_bytes * active / spec.expert_num / (fwd_ms * 1e-3) / 1e9
    ft_ms = statistics.median(parts["forward_train"][1:])
    bw_ms = statistics.median(parts["backward"][1:])

    res = {
        "base_weights_bytes": weight_bytes,
        "active_experts": active,
        "forward_weight_stream_gbs": streamed_gbs,
        "spec": plan.full.name, "expert_num": spec.expert_num, "full_expert_num": plan.full.expert_num,
        "subset": plan.subset, "memory_note": plan.note, "tokens": T, "k": k, "hidden_size": H,
        "intermediate_size": I, "lora_rank": spec.lora.rank if spec.lora else 0,
        "quant": spec.quant.mode, "tier": moe.kernel.isa, "target": moe.kernel.target.name,
        "threads": moe.threads, "repeat": R, "load_average": load_average(), "cpu": cpu_model(),
        "cores": usable_cores(),
        "forward_gflop": gflop, "backward_gflop": gflop, "flops_note": "base GEMMs only, LoRA excluded",
        "ktgen": {
            "forward_ms": fwd_ms, "forward_gflops": _gflops(gflop, fwd_ms), "forward_runs_ms": fwd_all,
            "train_ms": train_ms, "train_gflops": _gflops(2 * gflop, train_ms), "train_runs_ms": train_all,
            "forward_train_ms": ft_ms, "forward_train_gflops": _gflops(gflop, ft_ms),
            "backward_ms": bw_ms, "backward_gflops": _gflops(gflop, bw_ms),
        },
    }
    kt = res["ktgen"]

    gate, up, down = weights
    if not torch or not baselines.torch_available():
        base = {"roof_fp32": None, "bandwidth": baselines.read_bandwidth(moe.threads, repeat=max(3, R))}
    else:
        say("  running the PyTorch baselines (eager per-expert loop and torch._grouped_mm, bf16 and fp32) ...")
        base = baselines.run_all(spec, x, ids, rw, grad_out, gate, up, down, lora, repeat=R,
                                 threads=moe.threads, budget_s=torch_budget_s)
    roof = base["roof_fp32"]
    if not roof or not math.isfinite(roof["gflops"]):   # no torch, or its fp32 matmul was skipped
        roof = numpy_roof(R)
    res["baselines"] = base
    res["fp32_gemm_roof"] = roof
    kt["forward_vs_roof"] = kt["forward_gflops"] / roof["gflops"]
    kt["train_vs_roof"] = kt["train_gflops"] / roof["gflops"]
    kt["backward_vs_roof"] = kt["backward_gflops"] / roof["gflops"]
    bw = (base.get("bandwidth") or {}).get("gbs")
    res["read_bandwidth_gbs"] = bw
    kt["forward_stream_vs_bandwidth"] = streamed_gbs / bw if bw else None
    for which, ms in (("best_forward", fwd_ms), ("best_train", train_ms)):
        if base.get(which):
            kt[which.replace("best", "speedup_vs_best")] = base[which]["ms"] / ms
    return res

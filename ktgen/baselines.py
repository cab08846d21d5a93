"""Honest baselines for `ktgen bench`, measured in the same process as ktgen.

Everything here takes the layer's data as `ktgen bench` holds it (NumPy arrays, bf16 as
`ml_dtypes.bfloat16`) and returns plain dicts, so the bench command can print them next to
its own figures:

- the eager per-expert PyTorch loop with LoRA (as Hugging Face MoE blocks with PEFT adapters
  run it), in bf16 and in fp32, forward and forward+backward (autograd);
- `torch._grouped_mm` (what transformers' ``grouped_mm`` experts run), in bf16 and in fp32,
  forward, and forward+backward attempted (its CPU backward may raise: the error text is kept);
- the best forward and the best forward+backward among them, named;
- torch's 2048^3 matmul in fp32 (the compute roof) and in bf16 (reported separately, where the
  CPU has bf16 arithmetic);
- before each of these, a probe on a small share of the work: one predicted past a few budgets
  is skipped and its prediction reported, not run for minutes;
- a multi-threaded read bandwidth measured in C through cffi and OpenMP (the roof for small T).

The math is that of docs/design.md#the-math (e = -1 slots are skipped)::

    g = Wg x + s Bg(Ag x),  u = Wu x + s Bu(Au x),  h = silu(g) * u,
    y = Wd h + s Bd(Ad h),  out = sum_j w_j y_j

FLOP count (see `flop_counts`): N = number of routed (token, slot) entries (slots with
e = -1 excluded), r = LoRA rank (0 without LoRA). A product of an [n, K] by a [K, M] matrix
counts 2 n K M; elementwise work (silu, products, routing weights, scatter-add) is not counted.

    forward  base  = 2 N (3 H I)                 gate, up: [N,H]x[H,I]; down: [N,I]x[I,H]
    forward  LoRA  = 2 N r (H + I) * 3           per pair: A: 2 N r K, B: 2 N M r, K + M = H + I
    backward base  = 2 N (3 H I)                 only the data gradients (dh = dy Wd, dx = dg Wg + du Wu):
                                                 the base weights are frozen, so there is no weight-gradient
                                                 GEMM and the backward costs 1x (not 2x) the forward's base
    backward LoRA  = 2 * forward LoRA            the LoRA matrices are trained: per product one data-gradient
                                                 and one weight-gradient GEMM of the same size
    train          = forward + backward          what a forward+backward measurement runs

`gflops` in a measurement uses these totals (LoRA included); `base_gflops` counts the base GEMMs
only, as `ktgen bench` counts its own GFLOP/s.

Run standalone: ``python -m ktgen.baselines --spec qwen3-30b-a3b --qlen 512``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from . import isa
from .files import write_atomic
from .runtime import usable_cores
from .spec import LORA_NAMES
from .workload import meminfo

BF16 = np.dtype(ml_dtypes.bfloat16)

DEFAULT_REPEAT = 3
DEFAULT_BUDGET_S = 20.0        # per measurement
ROOF_N = 2048
BANDWIDTH_BYTES = 1 << 30      # the read-bandwidth buffer, 1 GiB unless memory is short
MIN_BANDWIDTH_BYTES = 64 << 20
# Before a measurement, a probe times one call on 1/PROBE_SHARE of the tokens (the matmul roof:
# an (n/8)^3 matmul), twice, the second after first-call effects. Where the probe predicts a
# call past PROBE_BUDGETS times the budget (bf16 on a CPU without bf16 arithmetic, where one
# forward+backward took 95 s), the measurement is skipped and the prediction reported instead
# of spending minutes on a warm-up.
PROBE_SHARE = 32
PROBE_BUDGETS = 3.0
# x86 flags of bf16 arithmetic: without them torch's bf16 matmul converts as it goes (one 2048^3
# call took 55 s on a 2-core AMD EPYC, 0.3 GFLOP/s, and a 1/8-size probe predicted 13 s), so it
# is no roof and is not timed.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# measurement keys, in table order
MEASUREMENTS = (
    ("eager_bf16_forward", "eager", "bf16", False),
    ("eager_bf16_train", "eager", "bf16", True),
    ("grouped_mm_bf16_forward", "grouped_mm", "bf16", False),
    ("grouped_mm_bf16_train", "grouped_mm", "bf16", True),
    ("eager_fp32_forward", "eager", "fp32", False),
    ("eager_fp32_train", "eager", "fp32", True),
    ("grouped_mm_fp32_forward", "grouped_mm", "fp32", False),
    ("grouped_mm_fp32_train", "grouped_mm", "fp32", True),
)
IMPL_NAMES = {"eager": "torch eager per-expert loop", "grouped_mm": "torch._grouped_mm"}


# --------------------------------------------------------------------------- helpers

def default_threads() -> int:
    """The cores this process may run on (ktgen's own default thread count)."""
    return usable_cores()


def mem_available() -> int | None:
    """MemAvailable in bytes, None where unknown."""
    return meminfo("MemAvailable")


def load_average() -> float:
    """The 1-minute load average (NaN where unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _gf(flop: float, ms: float) -> float:
    return flop / ms / 1e6 if ms and ms > 0 and math.isfinite(ms) else float("nan")


def timed(fn: Callable[[], Any], repeat: int, budget_s: float, warmup: int = 1,
          warm_ms: tuple[float, ...] = ()) -> dict:
    """Time `fn`: `warmup` untimed calls, then up to `repeat` timed calls within `budget_s`.

    `warm_ms` are warm-up calls the caller already made (their durations, counted in the
    warm-up and in the budget). The budget counts from the first warm-up call. A timed call is
    skipped when the time spent so far plus the median of the calls so far would pass the
    budget, but at least one timed call runs, unless the warm-up alone used up the budget: then
    the last warm-up's time is the only sample. Returns ms (median of the samples), runs_ms,
    runs, repeat, skipped, budget_s and a note ("" when every repeat ran)."""
    repeat = max(1, int(repeat))
    warm = [float(w) for w in warm_ms]
    started = time.perf_counter() - sum(warm) / 1e3
    for _ in range(max(0, warmup - len(warm))):
        if warm and time.perf_counter() - started >= budget_s:
            break
        t0 = time.perf_counter()
        fn()
        warm.append((time.perf_counter() - t0) * 1e3)
    if warm and time.perf_counter() - started >= budget_s:
        return {"ms": warm[-1], "runs_ms": [warm[-1]], "runs": 1, "repeat": repeat, "skipped": repeat,
                "budget_s": budget_s,
                "note": f"the warm-up alone took {sum(warm) / 1e3:.1f} s, past the {budget_s:g} s budget: "
                        f"its time (first-call effects included) is the only sample, {repeat} repeat(s) skipped"}
    runs: list[float] = []
    for _ in range(repeat):
        spent = time.perf_counter() - started
        if runs and spent + statistics.median(runs) / 1e3 > budget_s:
            break
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    skipped = repeat - len(runs)
    note = f"{skipped} of {repeat} repeat(s) skipped: past the {budget_s:g} s budget" if skipped else ""
    return {"ms": statistics.median(runs), "runs_ms": runs, "runs": len(runs), "repeat": repeat,
            "skipped": skipped, "budget_s": budget_s, "note": note}


def flop_counts(spec, expert_ids) -> dict:
    """FLOPs of one forward and one backward of the layer on this routing (formulas in the module
    docstring). Keys: entries, active_experts, rank, forward_base, forward_lora, forward,
    backward_base, backward_lora, backward, train_base, train; `formula` states them."""
    ids = np.asarray(expert_ids)
    H, I = spec.hidden_size, spec.intermediate_size
    r = spec.lora.rank if spec.lora is not None else 0
    N = int((ids >= 0).sum())
    fb = 2 * N * 3 * H * I
    fl = 6 * N * r * (H + I)
    return {
        "entries": N, "active_experts": int(len(np.unique(ids[ids >= 0]))), "rank": r,
        "forward_base": fb, "forward_lora": fl, "forward": fb + fl,
        "backward_base": fb, "backward_lora": 2 * fl, "backward": fb + 2 * fl,
        "train_base": 2 * fb, "train": 2 * fb + 3 * fl,
        "formula": ("N = routed (token, slot) entries; forward = 2N(3HI) + 6Nr(H+I); backward = 2N(3HI) "
                    "(data gradients only: base weights frozen) + 12Nr(H+I) (LoRA data and weight "
                    "gradients); train = forward + backward; elementwise work not counted"),
    }


def _lora_get(lora, name):
    if lora is None:
        return None
    return lora[name] if isinstance(lora, dict) else getattr(lora, name)


def _lora_scale(spec) -> float:
    return float(spec.lora.scale) if spec.lora is not None else 0.0


# --------------------------------------------------------------------------- the layer in torch

def _torch_dtype(dtype: str):
    import torch
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    raise ValueError(f"dtype: expected 'bf16' or 'fp32', got {dtype!r}")


def _t16(a):
    """Zero-copy bf16 NumPy array -> torch bf16 tensor."""
    import torch
    a = np.ascontiguousarray(a)
    if a.dtype != BF16:
        a = a.astype(BF16)
    with warnings.catch_warnings():  # read-only arrays (mmaps): torch never writes to them here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


class TorchWeights:
    """The base weights as a transformers MoE block holds them in one dtype: gate and up fused
    into gate_up [E, 2I, H] (for grouped_mm) and down [E, H, I]. In bf16 the eager loop reads the
    caller's arrays without a copy; fp32 makes one fp32 copy that both implementations share."""

    def __init__(self, gate, up, down, dtype: str):
        import torch
        self.dtype = dtype
        self.tdtype = _torch_dtype(dtype)
        g, u, d = _t16(gate), _t16(up), _t16(down)
        self.E, self.I, self.H = g.shape
        self._gate_up = None
        if dtype == "bf16":
            self._g, self._u, self.down = g, u, d
        else:
            gu = torch.empty((self.E, 2 * self.I, self.H), dtype=self.tdtype)
            gu[:, :self.I].copy_(g)
            gu[:, self.I:].copy_(u)
            self._gate_up = gu
            self._g, self._u = gu[:, :self.I], gu[:, self.I:]
            self.down = d.to(self.tdtype)

    def gate(self, e):
        return self._g[e]

    def up(self, e):
        return self._u[e]

    @property
    def gate_up(self):
        """[E, 2I, H], built on first use in bf16 (a copy, as transformers stores gate_up_proj)."""
        import torch
        if self._gate_up is None:
            self._gate_up = torch.cat([self._g, self._u], dim=1)
        return self._gate_up


def _fp32_bytes(gate, up, down) -> int:
    return 2 * (np.asarray(gate).nbytes + np.asarray(up).nbytes + np.asarray(down).nbytes)


class _Layer:
    """One implementation (eager or grouped_mm) of the layer in one dtype, with its inputs and its
    LoRA leaf tensors: per expert for eager (PEFT has one adapter module per expert), stacked
    [E, ...] for grouped_mm."""

    def __init__(self, impl, spec, weights: TorchWeights, x, expert_ids, routing_weights, grad_out, lora):
        import torch
        if impl not in IMPL_NAMES:
            raise ValueError(f"impl: expected one of {', '.join(IMPL_NAMES)}, got {impl!r}")
        self.impl, self.spec, self.W = impl, spec, weights
        dt = weights.tdtype
        self.E, self.k = spec.expert_num, spec.num_experts_per_tok
        self.s = _lora_scale(spec)
        self.x = _t16(x).to(dt) if dt != torch.bfloat16 else _t16(x).clone()
        self.go = _t16(grad_out).to(dt) if dt != torch.bfloat16 else _t16(grad_out).clone()
        self.ids = torch.from_numpy(np.ascontiguousarray(expert_ids).astype(np.int64))
        self.rw = torch.from_numpy(np.ascontiguousarray(routing_weights, np.float32)).to(dt)
        self.lora = None
        if lora is not None and spec.lora is not None:
            mats = {n: torch.from_numpy(np.asarray(_lora_get(lora, n)).astype(np.float32)).to(dt) for n in LORA_NAMES}
            if impl == "eager":
                self.lora = [{n: mats[n][e].clone().requires_grad_(True) for n in LORA_NAMES}
                             for e in range(self.E)]
            else:
                self.lora = {n: mats[n].contiguous().requires_grad_(True) for n in LORA_NAMES}
        self.xg = self.x.clone().requires_grad_(True)
        self.rwg = self.rw.clone().requires_grad_(True)

    # routing: the valid entries sorted by expert (stable), their token and slot, per-expert counts
    def _route(self):
        import torch
        flat = self.ids.reshape(-1)
        valid = torch.nonzero(flat >= 0).flatten()
        ev = flat.index_select(0, valid)
        _, order = torch.sort(ev, stable=True)
        perm = valid.index_select(0, order)           # flat (t*k + j) indices, grouped by expert
        counts = torch.bincount(ev, minlength=self.E)
        return perm, perm // self.k, counts

    def _eager(self, x, rw):
        import torch
        import torch.nn.functional as F
        W, s, L = self.W, self.s, self.lora
        out = torch.zeros_like(x)
        perm, tok, counts = self._route()
        rwf = rw.reshape(-1)
        bounds = [0] + torch.cumsum(counts, 0).tolist()
        for e in torch.nonzero(counts).flatten().tolist():
            lo, hi = bounds[e], bounds[e + 1]
            te = tok[lo:hi]
            xe = x.index_select(0, te)
            g = F.linear(xe, W.gate(e))
            u = F.linear(xe, W.up(e))
            if L is not None:
                le = L[e]
                g = g + s * F.linear(F.linear(xe, le["gate_a"]), le["gate_b"])
                u = u + s * F.linear(F.linear(xe, le["up_a"]), le["up_b"])
            h = F.silu(g) * u
            y = F.linear(h, W.down[e])
            if L is not None:
                y = y + s * F.linear(F.linear(h, le["down_a"]), le["down_b"])
            out.index_add_(0, te, y * rwf.index_select(0, perm[lo:hi])[:, None])
        return out

    def _grouped(self, x, rw):
        """As transformers' grouped_mm experts: entries sorted by expert, offs = cumulative
        counts (int32), one grouped GEMM for the fused gate_up and one for down; LoRA as grouped
        low-rank products (x A^T, then B^T) on the stacked adapters."""
        import torch
        import torch.nn.functional as F
        gmm = torch._grouped_mm
        W, s, L = self.W, self.s, self.lora
        I = W.I
        perm, tok, counts = self._route()
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x.index_select(0, tok)
        gu = gmm(xs, W.gate_up.transpose(-2, -1), offs=offs)
        g, u = gu[:, :I], gu[:, I:]
        if L is not None:
            g = g + s * gmm(gmm(xs, L["gate_a"].transpose(-2, -1), offs=offs), L["gate_b"].transpose(-2, -1), offs=offs)
            u = u + s * gmm(gmm(xs, L["up_a"].transpose(-2, -1), offs=offs), L["up_b"].transpose(-2, -1), offs=offs)
        h = F.silu(g) * u
        y = gmm(h, W.down.transpose(-2, -1), offs=offs)
        if L is not None:
            y = y + s * gmm(gmm(h, L["down_a"].transpose(-2, -1), offs=offs), L["down_b"].transpose(-2, -1), offs=offs)
        y = y * rw.reshape(-1).index_select(0, perm)[:, None]
        return torch.zeros_like(x).index_add_(0, tok, y)

    def forward(self, x=None, rw=None):
        f = self._eager if self.impl == "eager" else self._grouped
        return f(self.x if x is None else x, self.rw if rw is None else rw)

    def infer(self):
        import torch
        with torch.no_grad():
            return self.forward()

    def _leaves(self):
        if self.lora is None:
            return []
        if self.impl == "eager":
            return [p for le in self.lora for p in le.values()]
        return list(self.lora.values())

    def train(self):
        self.xg.grad = self.rwg.grad = None
        for p in self._leaves():
            p.grad = None
        out = self.forward(self.xg, self.rwg)
        out.backward(self.go)
        return out

    def grads(self) -> dict:
        """float64 NumPy gradients of the last train(): input, routing_weights, LoRA names."""
        def f64(t, shape=None):
            return np.zeros(shape) if t is None else t.detach().double().numpy()

        res = {"input": f64(self.xg.grad, tuple(self.x.shape)),
               "routing_weights": f64(self.rwg.grad, tuple(self.rw.shape))}
        if self.lora is not None:
            for n in LORA_NAMES:
                if self.impl == "eager":
                    res[n] = np.stack([f64(le[n].grad, tuple(le[n].shape)) for le in self.lora])
                else:
                    res[n] = f64(self.lora[n].grad, tuple(self.lora[n].shape))
        return res


def _with_threads(threads: int | None):
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    return old


def outputs(impl: str, spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora=None, *,
            dtype: str = "bf16", backward: bool = True, threads: int | None = None,
            weights: TorchWeights | None = None) -> dict:
    """Run one implementation once and return float64 NumPy results: "out" [T, H] and, with
    `backward`, "input", "routing_weights" and the six LoRA names (their shapes in docs/design.md#the-math); a backward
    that raises gives "backward_error" (its text) instead of the gradients."""
    import torch
    old = _with_threads(threads)
    try:
        W = weights or TorchWeights(gate, up, down, dtype)
        layer = _Layer(impl, spec, W, x, expert_ids, routing_weights, grad_out, lora)
        res = {"out": layer.infer().double().numpy()}
        if backward:
            try:
                layer.train()
                res.update(layer.grads())
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                res["backward_error"] = f"{type(exc).__name__}: {exc}"
        return res
    finally:
        torch.set_num_threads(old)


def eager_outputs(spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora=None, **kw) -> dict:
    """`outputs("eager", ...)`."""
    return outputs("eager", spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora, **kw)


def grouped_mm_outputs(spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora=None, **kw) -> dict:
    """`outputs("grouped_mm", ...)`."""
    return outputs("grouped_mm", spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora, **kw)


def _probe(fn_small: Callable[[], Any], scale: float, budget_s: float, what: str) -> dict:
    """Time fn_small twice (the second call's time counts) and predict a full call as `scale`
    times it. Returns {small_ms, predicted_s, too_slow: the reason to skip, or None}."""
    fn_small()
    t0 = time.perf_counter()
    fn_small()
    small_ms = (time.perf_counter() - t0) * 1e3
    predicted = small_ms / 1e3 * scale
    why = None
    if predicted > PROBE_BUDGETS * budget_s:
        why = (f"{what} took {small_ms / 1e3:.2f} s, so one call would take about {predicted:.0f} s, "
               f"past {PROBE_BUDGETS:g} x the {budget_s:g} s budget")
    return {"small_ms": small_ms, "predicted_s": predicted, "too_slow": why}


def measure(impl: str, spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora=None, *,
            dtype: str = "bf16", train: bool = False, repeat: int = DEFAULT_REPEAT, threads: int | None = None,
            budget_s: float = DEFAULT_BUDGET_S, weights: TorchWeights | None = None, probe: bool = True) -> dict:
    """Time one PyTorch implementation of the layer (impl "eager" or "grouped_mm", dtype "bf16" or
    "fp32"), forward only (torch.no_grad) or, with `train`, forward + autograd backward (grads for
    x, the routing weights and the LoRA matrices).

    Returns a dict: key, name, impl, dtype, pass ("forward" or "forward+backward"), threads,
    torch_version, ok, error (the exception text when it raised, else None), probe (`_probe`'s
    dict, None when no probe ran: `probe` False, fewer than 2 tokens, or the probe raised), and when ok the
    `timed` keys (ms, runs_ms, runs, repeat, skipped, budget_s, note) plus gflop, gflops,
    base_gflop, base_gflops (see `flop_counts`). When not ok, ms and the rates are NaN; when the
    probe predicted a call past PROBE_BUDGETS budgets, nothing else ran and note says so."""
    import torch
    threads = threads or default_threads()
    passname = "forward+backward" if train else "forward"
    key = f"{impl}_{dtype}_{'train' if train else 'forward'}"
    fl = flop_counts(spec, expert_ids)
    flop = fl["train"] if train else fl["forward"]
    base = fl["train_base"] if train else fl["forward_base"]
    res = {"key": key, "name": f"{IMPL_NAMES[impl]} {dtype} {passname}", "impl": impl, "dtype": dtype,
           "pass": passname, "threads": threads, "torch_version": torch.__version__,
           "ok": False, "error": None, "ms": float("nan"), "runs_ms": [], "runs": 0, "repeat": repeat,
           "skipped": repeat, "budget_s": budget_s, "note": "", "probe": None,
           "gflop": flop / 1e9, "gflops": float("nan"), "base_gflop": base / 1e9, "base_gflops": float("nan")}
    old = _with_threads(threads)
    try:
        W = weights or TorchWeights(gate, up, down, dtype)
        T = int(np.shape(x)[0])
        tp = max(1, T // PROBE_SHARE)
        if probe and T >= 2:
            small = _Layer(impl, spec, W, x[:tp], expert_ids[:tp], routing_weights[:tp], grad_out[:tp], lora)
            try:
                res["probe"] = _probe(small.train if train else small.infer, T / tp, budget_s,
                                      f"a probe on {tp} of {T} tokens")
            except Exception:  # noqa: BLE001 - the full call below reports the error
                res["probe"] = None
            del small
            if res["probe"] and res["probe"]["too_slow"]:
                res["note"] = "skipped: " + res["probe"]["too_slow"]
                return res
        layer = _Layer(impl, spec, W, x, expert_ids, routing_weights, grad_out, lora)
        fn = layer.train if train else layer.infer
        t0 = time.perf_counter()
        try:
            fn()  # the warm-up; when it raises, the error is the result
        except Exception as exc:  # noqa: BLE001
            res["error"] = f"{type(exc).__name__}: {exc}".strip()
            res["note"] = f"raised: {res['error'].splitlines()[0][:200]}"
            return res
        t = timed(fn, repeat, budget_s, warmup=1, warm_ms=((time.perf_counter() - t0) * 1e3,))
        res.update(t)
        res["ok"] = True
        res["gflops"] = _gf(flop, t["ms"])
        res["base_gflops"] = _gf(base, t["ms"])
        return res
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- roofs

def matmul_roof(threads: int | None = None, dtype: str = "fp32", n: int = ROOF_N, repeat: int = 5,
                budget_s: float = 10.0, probe: bool = True, skip: str | None = None) -> dict:
    """torch's n^3 matmul in fp32 or bf16 with `threads` threads: keys what, dtype, n, threads,
    torch_version, gflop, gflops, probe (as `measure`'s) and the `timed` keys (ms, runs_ms, ...).
    Not timed, ms and gflops NaN and note "skipped: why", when `skip` gives a reason or when the
    probe (an (n / 8)^3 matmul) predicts a call past PROBE_BUDGETS budgets."""
    import torch
    threads = threads or default_threads()
    flop = 2 * n ** 3
    out = {"what": f"torch {dtype} matmul {n}x{n}x{n}", "dtype": dtype, "n": n, "threads": threads,
           "torch_version": torch.__version__, "gflop": flop / 1e9, "gflops": float("nan"), "probe": None}

    def skipped(why):
        return {**out, "ms": float("nan"), "runs_ms": [], "runs": 0, "repeat": repeat, "skipped": repeat,
                "budget_s": budget_s, "note": "skipped: " + why}

    if skip:
        return skipped(skip)
    old = _with_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)

        def operands(m):
            a = torch.randn((m, m), generator=g).to(_torch_dtype(dtype))
            b = torch.randn((m, m), generator=g).to(_torch_dtype(dtype))
            return a, b, torch.empty((m, m), dtype=a.dtype)

        m = n // 8
        if probe and m >= 16:
            a, b, c = operands(m)
            out["probe"] = _probe(lambda: torch.matmul(a, b, out=c), (n / m) ** 3, budget_s,
                                  f"a {m}x{m}x{m} probe")
            if out["probe"]["too_slow"]:
                return skipped(out["probe"]["too_slow"])
        a, b, c = operands(n)
        t = timed(lambda: torch.matmul(a, b, out=c), max(1, repeat), budget_s, warmup=1)
    finally:
        torch.set_num_threads(old)
    return {**out, "gflops": _gf(flop, t["ms"]), **t}


_BW_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <omp.h>

#define KTGEN_BW_BLOCK 64   /* uint64 per block: 512 bytes, 8 cache lines */

/* Thread t of nt owns blocks [nb*t/nt, nb*(t+1)/nt): the same split in fill and read, so the
   pages a thread reads were first touched by it (and sit on its NUMA node). */
static void ktgen_bw_range(size_t n, int t, int nt, size_t *lo, size_t *hi) {
    size_t nb = n / KTGEN_BW_BLOCK;
    *lo = nb * (size_t)t / (size_t)nt * KTGEN_BW_BLOCK;
    *hi = nb * (size_t)(t + 1) / (size_t)nt * KTGEN_BW_BLOCK;
}

void ktgen_bw_fill(uint64_t *buf, size_t n, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        size_t lo, hi;
        ktgen_bw_range(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (size_t i = lo; i < hi; i++) buf[i] = (uint64_t)i;
    }
    for (size_t i = n / KTGEN_BW_BLOCK * KTGEN_BW_BLOCK; i < n; i++) buf[i] = (uint64_t)i;
}

/* The sum of every element: eight independent lanes per block, which the compiler turns into
   vector loads and adds; the sum is returned so no read can be dropped. */
uint64_t ktgen_bw_read(const uint64_t *restrict buf, size_t n, int threads) {
    uint64_t total = 0;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    {
        size_t lo, hi;
        ktgen_bw_range(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (size_t i = lo; i < hi; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += buf[i + j];
        for (int j = 0; j < 8; j++) total += acc[j];
    }
    for (size_t i = n / KTGEN_BW_BLOCK * KTGEN_BW_BLOCK; i < n; i++) total += buf[i];
    return total;
}
"""
_BW_CDEF = """
void ktgen_bw_fill(uint64_t *buf, size_t n, int threads);
uint64_t ktgen_bw_read(const uint64_t *buf, size_t n, int threads);
"""
_bw_module = None


def _bandwidth_module():
    """The compiled probe, built once into ktgen's cache dir (an entry with a manifest, like the
    kernels', so `ktgen cache list/clear` see it) and loaded once per process."""
    global _bw_module
    if _bw_module is not None:
        return _bw_module, _bw_module._ktgen_flags
    import cffi

    from . import compiler as C
    from ._version import __version__
    from .settings import settings

    cfg = settings()
    tier, _ = isa.choose("auto")
    flags = ("-O3", "-std=gnu11", "-fopenmp", "-fPIC") + isa.compile_flags(tier)
    key = hashlib.sha256(json.dumps({
        "source": _BW_SOURCE, "cdef": _BW_CDEF, "flags": flags, "compiler": C.compiler_identity(cfg.cc),
        "cc": cfg.cc, "build_env": dict(cfg.build_env),
        "ktgen": __version__, "cffi": cffi.__version__,
        "python": sysconfig.get_config_var("EXT_SUFFIX") or sys.version}, sort_keys=True).encode()).hexdigest()
    module_name = f"_ktgen_bandwidth_{key[:20]}"
    entry = cfg.cache_dir / f"bandwidth-{key[:20]}"
    with C._build_lock:
        module, _ = C.load_entry(entry, key, module_name,
                                 lambda: _build_bandwidth(entry, key, module_name, flags, cfg, tier))
    module._ktgen_flags = flags
    _bw_module = module
    return module, flags


def _build_bandwidth(entry: Path, key: str, module_name: str, flags, cfg, tier: str) -> dict:
    import tempfile

    from . import compiler as C
    from .target import Target

    cc = cfg.cc
    entry.mkdir(parents=True, exist_ok=True)
    (entry / C.MANIFEST).unlink(missing_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".build-{entry.name}-") as tmp:
        # In a child process, as the kernels: the caller's cwd and os.environ stay as they are.
        target = Target(tier, cc=cc, build_env=cfg.build_env)
        built = C.build_cffi_module(module_name, _BW_CDEF, _BW_SOURCE, target, Path(tmp), flags, ("-fopenmp",))
        write_atomic(entry / built.name, built.read_bytes(), fsync=True)
    manifest = {"key": key, "module": module_name, "module_file": built.name,
                "sha256": C._sha256(entry / built.name), "spec": "(bandwidth probe)", "tier": tier,
                "flags": list(flags), "compiler": C.compiler_identity(cc),
                "build_seconds": round(time.perf_counter() - started, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(entry / C.MANIFEST, json.dumps(manifest, indent=2).encode(), fsync=True)
    return manifest


def read_bandwidth(threads: int | None = None, nbytes: int | None = None, repeat: int = 5,
                   budget_s: float = 10.0) -> dict:
    """Multi-threaded read bandwidth in GB/s (1e9 bytes/s): OpenMP threads sum a uint64 buffer
    of `nbytes` (default 1 GiB, less when MemAvailable is short: at most a quarter of it, at
    least 64 MiB), each thread reading the part it first touched; the best of `repeat` passes
    after one warm-up pass, within `budget_s`.

    Keys: what, gbs (best), median_gbs, bytes, threads, runs_gbs, runs, repeat, skipped,
    budget_s, note, checksum_ok, flags."""
    threads = threads or default_threads()
    note = ""
    if nbytes is None:
        nbytes = BANDWIDTH_BYTES
        avail = mem_available()
        if avail is not None and nbytes > avail // 4:
            nbytes = max(MIN_BANDWIDTH_BYTES, (avail // 4) >> 20 << 20)
            note = f"buffer cut to {nbytes >> 20} MiB: MemAvailable {avail >> 20} MiB"
    n = max(64, int(nbytes) // 8)
    module, flags = _bandwidth_module()
    ffi, lib = module.ffi, module.lib
    buf = np.empty(n, np.uint64)       # pages untouched until the parallel fill
    ptr = ffi.cast("uint64_t *", buf.ctypes.data)
    lib.ktgen_bw_fill(ptr, n, threads)
    expected = (n * (n - 1) // 2) % (1 << 64)
    sums = []

    def one():
        sums.append(int(lib.ktgen_bw_read(ptr, n, threads)))

    t = timed(one, max(1, repeat), budget_s, warmup=1)
    del buf
    runs_gbs = [n * 8 / (ms * 1e-3) / 1e9 for ms in t["runs_ms"]]
    notes = "; ".join(s for s in (note, t["note"]) if s)
    return {"what": f"C read bandwidth, {threads} OpenMP thread(s), {n * 8 / 2 ** 20:.0f} MiB buffer, best pass",
            "gbs": max(runs_gbs), "median_gbs": statistics.median(runs_gbs), "bytes": n * 8, "threads": threads,
            "runs_gbs": runs_gbs, "runs": t["runs"], "repeat": t["repeat"], "skipped": t["skipped"],
            "budget_s": budget_s, "note": notes, "checksum_ok": all(s == expected for s in sums),
            "flags": list(flags)}


# --------------------------------------------------------------------------- everything

def _best(measurements: dict, train: bool) -> dict | None:
    ok = [m for m in measurements.values() if m["ok"] and (m["pass"] == "forward+backward") == train]
    if not ok:
        return None
    m = min(ok, key=lambda m: m["ms"])
    return {"key": m["key"], "name": m["name"], "ms": m["ms"], "gflops": m["gflops"], "base_gflops": m["base_gflops"]}


def run_all(spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora=None, *,
            repeat: int = DEFAULT_REPEAT, threads: int | None = None, budget_s: float = DEFAULT_BUDGET_S,
            train: bool = True, fp32: bool = True, roof: bool = True, bandwidth: bool = True,
            bandwidth_bytes: int | None = None, roof_n: int = ROOF_N,
            log: Callable[[str], None] | None = None) -> dict:
    """Every baseline for one layer, in one process. `budget_s` bounds each measurement (not the
    total); `log` receives a line before each one. Without torch, only the bandwidth probe runs.
    `bandwidth_bytes` and `roof_n` shrink the probes (tests); the defaults are the roofs.

    Returns a dict with keys:
      torch_version (None without torch), threads, tokens, flops (`flop_counts`),
      load_average: [at the start, at the end] (1-minute; other work on the cores makes the
        timings noisy, and OpenMP regions wait for preempted threads),
      cores: the usable cores,
      measurements: {key: `measure` dict} for the keys of MEASUREMENTS that ran (the train ones
        only with `train`, the fp32 ones only with `fp32` and enough memory for an fp32 copy of
        the weights; a grouped_mm backward that raises is kept with ok False and its error),
      skipped: {key: why} for those that did not run (not requested, not enough memory, or a
        probe that predicted a call past PROBE_BUDGETS budgets),
      best_forward, best_train: {key, name, ms, gflops, base_gflops} of the fastest ok
        measurement of each pass (None if none),
      roof_fp32, roof_bf16: `matmul_roof` dicts (None without `roof` or torch),
      bandwidth: `read_bandwidth` dict (None without `bandwidth`; {"error": text} if it failed)."""
    say = log or (lambda s: None)
    threads = threads or default_threads()
    res: dict[str, Any] = {"torch_version": None, "threads": threads, "tokens": int(np.shape(x)[0]),
                           "load_average": [load_average()], "cores": default_threads(),
                           "flops": flop_counts(spec, expert_ids), "measurements": {}, "skipped": {},
                           "best_forward": None, "best_train": None, "roof_fp32": None, "roof_bf16": None,
                           "bandwidth": None}
    has_torch = torch_available()
    if has_torch:
        import torch
        res["torch_version"] = torch.__version__
        args = (spec, x, expert_ids, routing_weights, grad_out, gate, up, down, lora)
        for dtype in ("bf16", "fp32"):
            todo = [m for m in MEASUREMENTS if m[2] == dtype and (train or not m[3])]
            if dtype == "fp32":
                need, avail = _fp32_bytes(gate, up, down), mem_available()
                why = None
                if not fp32:
                    why = "fp32 baselines not requested"
                elif avail is not None and need * 1.25 > avail:
                    why = (f"not enough memory for an fp32 copy of the weights ({need / 2 ** 30:.1f} GiB needed, "
                           f"{avail / 2 ** 30:.1f} GiB available)")
                if why:
                    for key, *_ in todo:
                        res["skipped"][key] = why
                    continue
            W = TorchWeights(gate, up, down, dtype)
            for key, impl, _, is_train in todo:
                say(f"{IMPL_NAMES[impl]} {dtype} {'forward+backward' if is_train else 'forward'} ...")
                m = measure(impl, *args, dtype=dtype, train=is_train, repeat=repeat, threads=threads,
                            budget_s=budget_s, weights=W)
                if m["probe"] and m["probe"]["too_slow"]:
                    res["skipped"][key] = m["probe"]["too_slow"]
                else:
                    res["measurements"][key] = m
            del W
            gc.collect()
        res["best_forward"] = _best(res["measurements"], False)
        res["best_train"] = _best(res["measurements"], True)
        if roof:
            say(f"torch fp32 and bf16 {roof_n}^3 matmul ...")
            res["roof_fp32"] = matmul_roof(threads, "fp32", roof_n, repeat=max(3, repeat), budget_s=budget_s)
            no_bf16 = None
            if not set(BF16_FLAGS) & isa.cpu_flags():
                no_bf16 = f"this CPU has no bf16 arithmetic ({', '.join(BF16_FLAGS)}), so it is no roof"
            res["roof_bf16"] = matmul_roof(threads, "bf16", roof_n, repeat=max(3, repeat), budget_s=budget_s,
                                           skip=no_bf16)
    else:
        for key, *_ in MEASUREMENTS:
            res["skipped"][key] = "PyTorch is not installed"
    if bandwidth:
        say("C read bandwidth ...")
        try:
            res["bandwidth"] = read_bandwidth(threads, bandwidth_bytes, repeat=max(3, repeat), budget_s=budget_s)
        except Exception as exc:  # noqa: BLE001 - a compiler problem must not lose the other figures
            res["bandwidth"] = {"error": f"{type(exc).__name__}: {exc}"}
    res["load_average"].append(load_average())
    return res


def format_table(res: dict, width: int = 46) -> list[str]:
    """The result of `run_all` as compact text lines."""
    lines = []
    fl = res["flops"]
    lines.append(f"  PyTorch baselines ({'torch ' + res['torch_version'] if res['torch_version'] else 'no torch'}, "
                 f"{res['threads']} threads, T={res['tokens']}, {fl['entries']} routed entries, "
                 f"{fl['active_experts']} active experts)")
    la = res.get("load_average") or []
    if la:
        busy = max(la) > 0.5 * res.get("cores", res["threads"]) + 0.5
        lines.append(f"  load average {' -> '.join(f'{v:.1f}' for v in la)} on {res.get('cores', '?')} cores"
                     + (" (busy machine: timings are noisy)" if busy else ""))
    lines.append(f"  FLOPs: {fl['formula']}")
    lines.append(f"  {'':<{width}}{'ms':>10}{'GFLOP/s':>10}{'base':>8}  runs")
    for key, impl, dtype, is_train in MEASUREMENTS:
        m = res["measurements"].get(key)
        label = f"{IMPL_NAMES[impl]} {dtype} {'fwd+bwd' if is_train else 'fwd'}"
        if m is None:
            if key in res["skipped"]:
                lines.append(f"  {label:<{width}}  skipped: {res['skipped'][key]}")
            continue
        if not m["ok"]:
            lines.append(f"  {label:<{width}}{'FAILED':>10}  {(m['error'] or '').splitlines()[0][:110]}")
            continue
        tail = f"  {m['runs']}/{m['repeat']}" + (f" ({m['note']})" if m["note"] else "")
        lines.append(f"  {label:<{width}}{m['ms']:>10.1f}{m['gflops']:>10.1f}{m['base_gflops']:>8.1f}{tail}")
    for which, label in (("best_forward", "best PyTorch forward"), ("best_train", "best PyTorch forward+backward")):
        b = res[which]
        if b:
            lines.append(f"  {label:<{width}}{b['ms']:>10.1f}{b['gflops']:>10.1f}{b['base_gflops']:>8.1f}"
                         f"  = {b['name']}")
    for which in ("roof_fp32", "roof_bf16"):
        r = res[which]
        if r and not math.isfinite(r["ms"]):
            lines.append(f"  {r['what']:<{width}}  {r['note']}")
        elif r:
            lines.append(f"  {r['what'] + (' (the roof)' if which == 'roof_fp32' else ''):<{width}}"
                         f"{r['ms']:>10.2f}{r['gflops']:>10.1f}" + (f"   ({r['note']})" if r["note"] else ""))
    bw = res["bandwidth"]
    if bw:
        if "error" in bw:
            lines.append(f"  C read bandwidth: FAILED: {bw['error'].splitlines()[0][:120]}")
        else:
            chk = "" if bw["checksum_ok"] else "  CHECKSUM MISMATCH"
            lines.append(f"  {bw['what']}: {bw['gbs']:.1f} GB/s (median {bw['median_gbs']:.1f})"
                         + (f" ({bw['note']})" if bw["note"] else "") + chk)
    return lines


# --------------------------------------------------------------------------- standalone

def random_layer(spec, T: int, seed: int = 0, std: float = 0.02):
    """Random data of `ktgen bench`'s kind: bf16 weights and LoRA of std `std`, x of std 1,
    top-k distinct experts per token, positive routing weights summing to 1, bf16 grad_out.
    Returns (x, expert_ids, routing_weights, grad_out, gate, up, down, lora dict or None)."""
    rng = np.random.default_rng(seed)
    E, H, I, k = spec.expert_num, spec.hidden_size, spec.intermediate_size, spec.num_experts_per_tok

    def w(shape):
        out = np.empty((E,) + shape, BF16)
        for e in range(E):  # one expert at a time: no full-size float32 temporary
            out[e] = (rng.standard_normal(shape, np.float32) * std).astype(BF16)
        return out

    gate, up, down = w((I, H)), w((I, H)), w((H, I))
    lora = None
    if spec.lora is not None:
        r = spec.lora.rank
        ldt = BF16 if spec.lora.dtype == "bfloat16" else np.dtype(np.float32)
        shapes = {"gate_a": (r, H), "gate_b": (I, r), "up_a": (r, H), "up_b": (I, r),
                  "down_a": (r, I), "down_b": (H, r)}
        lora = {n: (rng.standard_normal((E,) + s, np.float32) * std).astype(ldt) for n, s in shapes.items()}
    x = rng.standard_normal((T, H), np.float32).astype(BF16)
    ids = np.ascontiguousarray(np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32))
    raw = rng.random((T, k)) + 0.05
    rw = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    grad_out = rng.standard_normal((T, H), np.float32).astype(BF16)
    return x, ids, rw, grad_out, gate, up, down, lora


def report(spec, qlen: int = 512, *, repeat: int = DEFAULT_REPEAT, threads: int | None = None,
           budget_s: float = DEFAULT_BUDGET_S, seed: int = 0, experts: int | None = None, train: bool = True,
           out: Callable[[str], None] = print) -> dict:
    """Build random data for `spec` (a MoESpec, or a bundled name / YAML path for
    `ktgen.load_spec`), run `run_all` and print its table through `out`; returns the result.
    `experts` keeps only that many experts (top-k capped to it); without it, a layer whose bf16
    weights plus an fp32 copy would not fit in half of MemAvailable is cut to the experts that do."""
    from .spec import load_spec

    if isinstance(spec, str):
        spec = load_spec(spec)
    full_E = spec.expert_num
    per_expert = 3 * spec.hidden_size * spec.intermediate_size * 2     # bf16 bytes
    if experts is None:
        avail = mem_available()
        if avail is not None and full_E * per_expert * 3 > avail // 2:
            experts = max(1, int(avail // 2 // (per_expert * 3)))
    if experts is not None and experts < full_E:
        spec = spec.replace(expert_num=experts, num_experts_per_tok=min(spec.num_experts_per_tok, experts))
    threads = threads or spec.threads or default_threads()
    T = min(int(qlen), spec.max_len)
    started = time.perf_counter()
    data = random_layer(spec, T, seed)
    subset = f" (subset: {spec.expert_num} of {full_E} experts)" if spec.expert_num < full_E else ""
    out(f"ktgen baselines: spec {spec.name}: E={spec.expert_num}{subset} k={spec.num_experts_per_tok} "
        f"H={spec.hidden_size} I={spec.intermediate_size} LoRA rank {spec.lora.rank if spec.lora else 0}; "
        f"T={T}, {threads} threads, repeat {repeat}, budget {budget_s:g} s per measurement "
        f"(random data in {time.perf_counter() - started:.1f} s)")
    res = run_all(spec, *data, repeat=repeat, threads=threads, budget_s=budget_s, train=train,
                  log=lambda s: out(f"  running {s}"))
    res["spec"] = spec.name
    res["expert_num"] = spec.expert_num
    res["full_expert_num"] = full_E
    for line in format_table(res):
        out(line)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktgen.baselines",
                                description="PyTorch and hardware baselines for one MoE LoRA layer (ktgen bench's)")
    p.add_argument("--spec", default="qwen3-30b-a3b", help="bundled spec name or YAML path")
    p.add_argument("--qlen", type=int, default=512, help="tokens (default 512)")
    p.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    p.add_argument("--threads", type=int, default=None, help="default: the spec's, else the usable cores")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts", type=int, default=None, help="keep only this many experts")
    p.add_argument("--no-train", action="store_true", help="forward only")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    res = report(a.spec, a.qlen, repeat=a.repeat, threads=a.threads, budget_s=a.budget, seed=a.seed,
                 experts=a.experts, train=not a.no_train)
    if a.json:
        path = Path(a.json)
        write_atomic(path, json.dumps(res, indent=2, default=str) + "\n")
        print(f"  figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The layer `ktgen check` and `ktgen bench` run: which experts fit in memory, random weights,
LoRA and inputs, and the comparison with the float64 reference.

Memory rule: the whole layer runs when its bf16 base weights fit the budget, else a subset of
its experts at the real hidden and intermediate sizes (the kernels' speed and accuracy depend on
those, not on how many experts there are), and the plan says so.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from . import reference
from .runtime import LoRAWeights, MoE, usable_cores
from .spec import LORA_NAMES, MoESpec

BUDGET_FRACTION = 0.25           # of MemTotal
BUDGET_CAP = 4 << 30             # bytes: never more than this, whatever MemTotal says
DEFAULT_SUBSET = 16              # experts when the layer does not fit

WEIGHT_STD = 0.02                # base weights and LoRA A/B, typical of real checkpoints
ACTIVATION_STD = 1.0

bf16 = np.dtype(ml_dtypes.bfloat16)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def meminfo(field: str) -> int | None:
    """A /proc/meminfo field (MemTotal, MemAvailable, ...) in bytes, None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_total() -> int | None:
    return meminfo("MemTotal")


def memory_budget() -> int:
    total = mem_total()
    return BUDGET_CAP if total is None else min(int(total * BUDGET_FRACTION), BUDGET_CAP)


def layer_bytes(spec: MoESpec, experts: int | None = None) -> int:
    """bf16 bytes of the base weights (gate, up, down) of `experts` experts."""
    e = spec.expert_num if experts is None else experts
    return 3 * e * spec.hidden_size * spec.intermediate_size * 2


# --------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    spec: MoESpec         # the spec that runs (the full one, or a subset of its experts)
    full: MoESpec         # the spec as given
    subset: bool
    budget: int
    note: str             # one line, printed and stored in --json


def plan(spec: MoESpec, experts: int | None = None) -> Plan:
    """The whole layer when it fits the memory budget (or `experts` of it when given), else a
    subset of DEFAULT_SUBSET experts, halved until it fits."""
    budget = memory_budget()
    full_bytes = layer_bytes(spec)
    E = spec.expert_num
    if experts is not None:
        n = min(experts, E)
        why = f"--experts {experts}"
    elif full_bytes <= budget:
        n = E
        why = ""
    else:
        n = min(DEFAULT_SUBSET, E)
        while n > 1 and layer_bytes(spec, n) > budget:
            n //= 2
        why = (f"the full layer's bf16 weights ({fmt_bytes(full_bytes)}) exceed the memory budget "
               f"({fmt_bytes(budget)}: {BUDGET_FRACTION:.0%} of MemTotal, at most {fmt_bytes(BUDGET_CAP)})")
    if n >= E:
        note = (f"whole layer: {E} experts, {fmt_bytes(full_bytes)} of bf16 weights "
                f"(budget {fmt_bytes(budget)})")
        return Plan(spec, spec, False, budget, note)
    k = min(spec.num_experts_per_tok, n)
    derived = spec.replace(expert_num=n, num_experts_per_tok=k, name=spec.name)
    note = (f"SUBSET: {n} of {E} experts (top-{k} routing) at the real H={spec.hidden_size}, "
            f"I={spec.intermediate_size}, {fmt_bytes(layer_bytes(spec, n))} of bf16 weights, "
            f"because {why}; --experts N changes this")
    return Plan(derived, spec, True, budget, note)


# --------------------------------------------------------------------------- random data

def random_bf16(shape, count: int, std: float, seed: int, tag: int, threads: int) -> np.ndarray:
    """bf16 [count, *shape] of N(0, std^2), one generator per (seed, tag, index): the values
    do not depend on the thread count, and no float32 copy of the whole array is made."""
    out = np.empty((count, *shape), bf16)

    def fill(i: int) -> None:
        a = np.random.default_rng([seed, tag, i]).standard_normal(shape, np.float32)
        a *= std
        out[i] = a.astype(bf16)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(fill, range(count)))
    return out


def random_weights(spec: MoESpec, seed: int, std: float = WEIGHT_STD):
    """bf16 gate [E,I,H], up [E,I,H], down [E,H,I]."""
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    n = usable_cores()
    return (random_bf16((I, H), E, std, seed, 1, n),
            random_bf16((I, H), E, std, seed, 2, n),
            random_bf16((H, I), E, std, seed, 3, n))


def random_inputs(spec: MoESpec, T: int, rng: np.random.Generator):
    """x bf16 [T,H] of std 1, expert_ids int32 [T,k] (top-k distinct experts per token),
    routing_weights float32 [T,k] (positive, summing to 1 per token), grad_out bf16 [T,H]."""
    E, H, k = spec.expert_num, spec.hidden_size, spec.num_experts_per_tok
    x = (rng.standard_normal((T, H), np.float32) * ACTIVATION_STD).astype(bf16)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    raw = rng.random((T, k)) + 0.05
    rw = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    grad_out = rng.standard_normal((T, H), np.float32).astype(bf16)
    return x, np.ascontiguousarray(ids), rw, grad_out


def random_lora(spec: MoESpec, rng: np.random.Generator) -> LoRAWeights | None:
    return LoRAWeights.random(spec, rng, WEIGHT_STD) if spec.lora is not None else None


def random_moe(spec: MoESpec, seed: int, rng: np.random.Generator, isa=None):
    """(MoE of random bf16 weights, its LoRA, seconds to build it). The caller's copies of the
    weights are dropped once the kernel has its own (it copies them at load)."""
    gate, up, down = random_weights(spec, seed)
    lora = random_lora(spec, rng)
    started = time.perf_counter()
    moe = MoE(spec, gate, up, down, lora, isa=isa)
    return moe, lora, time.perf_counter() - started


# --------------------------------------------------------------------------- the check

@dataclass
class Check:
    rows: list[tuple[str, float, float, bool]]   # (quantity, relL2, limit, within the limit)
    kernel_s: float                              # forward_train + backward
    reference_s: float

    @property
    def failed(self) -> list[str]:
        return [name for name, _, _, ok in self.rows if not ok]


def check(moe: MoE, lora: LoRAWeights | None, x, ids, rw, grad_out) -> Check:
    """One forward_train + backward against the float64 reference on the weights the kernels
    use (MoE.dequantized), every quantity against its accuracy limit (docs/design.md, Accuracy)."""
    spec = moe.spec
    started = time.perf_counter()
    out, saved = moe.forward_train(x, ids, rw)
    grads = moe.backward(saved, grad_out)
    kernel_s = time.perf_counter() - started

    started = time.perf_counter()
    scale = spec.lora.scale if spec.lora else 1.0
    W = [moe.dequantized(n) for n in ("gate", "up", "down")]
    clamp = spec.swiglu_limit
    ref_out = reference.forward(x, ids, rw, *W, lora=lora, scale=scale, clamp=clamp)
    ref = reference.backward(x, ids, rw, *W, grad_out, lora=lora, scale=scale, clamp=clamp)
    del W
    reference_s = time.perf_counter() - started

    out_lim, grad_lim = reference.limits(spec.quant.mode)
    pairs = [("out", out, ref_out, out_lim),
             ("grads.input", grads.input, ref["input"], grad_lim),
             ("grads.routing_weights", grads.routing_weights, ref["routing_weights"], grad_lim)]
    if spec.lora is not None:
        pairs += [(f"grads.{n}", getattr(grads, n), ref[n], grad_lim) for n in LORA_NAMES]
    rows = []
    for name, actual, expected, limit in pairs:
        err = reference.rel_l2(actual, expected)
        rows.append((name, err, limit, bool(err <= limit)))  # NaN fails
    return Check(rows, kernel_s, reference_s)

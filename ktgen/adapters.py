"""Convert LoRA adapters between ktgen's per-expert layout and PEFT's layout for expert
parameters (``LoraConfig(target_parameters=...)``). NumPy only: no torch needed.

ktgen's layout (docs/design.md#the-math, ``ktgen.LoRAWeights``), per layer::

    gate_a [E, r, H]   gate_b [E, I, r]      g += s * B_gate[e] (A_gate[e] x)
    up_a   [E, r, H]   up_b   [E, I, r]      u += s * B_up[e]   (A_up[e]   x)
    down_a [E, r, I]   down_b [E, H, r]      y += s * B_down[e] (A_down[e] h)

PEFT's layout
-------------
Hugging Face transformers (≥ 5) stores the experts of Qwen3-MoE, Mixtral, DeepSeek-V2/V3 and
Qwen2-MoE as two 3-D parameters of one ``*Experts`` module: ``gate_up_proj`` [E, 2I, H] (gate
rows first, then up rows) and ``down_proj`` [E, H, I]. PEFT adapts such parameters with
``lora.ParamWrapper`` (``LoraConfig(target_modules=[], target_parameters=[...])``). The
convention below is read from PEFT's source, huggingface/peft:

- ``src/peft/tuners/lora/layer.py``, class ``ParamWrapper``: ``_get_in_out_features`` and
  ``update_layer`` give a parameter [E, out, in] (``is_transposed`` False, the transformers
  default) ``in_features = in``, ``out_features = out``, and create
  ``lora_A = nn.Linear(in, r * E)`` and ``lora_B = nn.Linear(r * E, out)``, so the stored
  tensors are ``lora_A.weight`` [E*r, in] and ``lora_B.weight`` [out, r*E];
  ``get_delta_weight`` unfolds them as ``A.reshape(E, r, in)`` (expert-major rows) and
  ``B.reshape(out, r, E)`` (rank-major, expert-minor columns) and computes
  ``delta[e] = scaling * B[:, :, e] @ A[e]`` (``einsum("o r e, e r i -> e o i")``), with
  ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
- ``src/peft/tuners/tuners_utils.py``, ``BaseTuner._inject_parameters``: the parameters of
  one module are wrapped in the order ``module.named_parameters()`` gives them
  (``gate_up_proj`` then ``down_proj``), each wrapper wrapping the previous one, so the
  ``gate_up_proj`` adapter sits one ``base_layer`` deeper. The saved keys (adapter name
  removed by ``get_peft_model_state_dict``) are therefore::

      base_model.model.<experts path>.base_layer.lora_A.weight   gate_up_proj  [E*R, H]
      base_model.model.<experts path>.base_layer.lora_B.weight   gate_up_proj  [2I, R*E]
      base_model.model.<experts path>.lora_A.weight              down_proj     [E*r, I]
      base_model.model.<experts path>.lora_B.weight              down_proj     [H, r*E]

  ``rank_pattern`` / ``alpha_pattern`` keys are matched against the end of the parameter's
  name (``peft.utils.other.get_pattern_key``), so ``{"gate_up_proj": R}`` sets that rank.

(Checked against peft 0.21.2: ``tests/integration/test_torch.py`` builds the same adapter with PEFT
itself when it is installed, and loads ktgen's files with ``PeftModel.from_pretrained``.)

The mapping
-----------
PEFT has one LoRA on the fused ``gate_up_proj``; ktgen has one on gate and one on up. ktgen
writes the pair exactly as a fused LoRA of rank R = 2r with a block-diagonal B::

    A_gate_up[e] = [[A_gate[e]], [A_up[e]]]                  [2r, H]
    B_gate_up[e] = [[B_gate[e], 0], [0, B_up[e]]]            [2I, 2r]
    so B_gate_up[e] A_gate_up[e] = [[B_gate A_gate], [B_up A_up]]

with ``rank_pattern = {"gate_up_proj": 2r}`` and an ``alpha_pattern`` that keeps the scale
(2 alpha, or sqrt(2) alpha with rsLoRA). ``down_proj`` maps one to one. Reading accepts
that form (the off-diagonal blocks must be zero) and also the plain form PEFT itself
trains, rank R = r on gate_up_proj: ktgen then uses the shared A for both gate and up
(``A_gate = A_up = A``, ``B_gate = B[:I]``, ``B_up = B[I:]``). Both are exact; a save and a
load give back the same bits.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from .runtime import LORA_NAMES, LoRAWeights
from .spec import LoRASpec

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "check_config", "fold_a", "fold_b", "from_peft", "inexact_features",
    "module_scale", "peft_config", "peft_keys", "peft_scale", "to_peft", "unfold_a", "unfold_b",
]

WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's SAFETENSORS_WEIGHTS_NAME
CONFIG_NAME = "adapter_config.json"         # PEFT's CONFIG_NAME
GATE_UP, DOWN = "gate_up_proj", "down_proj"  # transformers' expert parameter names


# ---- folding one projection: ktgen [E, r, K] / [E, N, r]  <->  PEFT [E*r, K] / [N, r*E] ----

def fold_a(a: np.ndarray) -> np.ndarray:
    """ktgen A [E, r, K] -> PEFT lora_A.weight [E*r, K] (row e*r + j is A[e][j])."""
    E, r, K = a.shape
    return np.ascontiguousarray(a.reshape(E * r, K))


def unfold_a(w: np.ndarray, num_experts: int) -> np.ndarray:
    """PEFT lora_A.weight [E*r, K] -> ktgen A [E, r, K]."""
    rows, K = w.shape
    if rows % num_experts:
        raise ValueError(f"lora_A.weight: {rows} rows is not a multiple of num_experts = {num_experts}")
    return np.ascontiguousarray(w.reshape(num_experts, rows // num_experts, K))


def fold_b(b: np.ndarray) -> np.ndarray:
    """ktgen B [E, N, r] -> PEFT lora_B.weight [N, r*E] (column j*E + e is B[e][:, j])."""
    E, N, r = b.shape
    return np.ascontiguousarray(b.transpose(1, 2, 0).reshape(N, r * E))


def unfold_b(w: np.ndarray, num_experts: int) -> np.ndarray:
    """PEFT lora_B.weight [N, r*E] -> ktgen B [E, N, r]."""
    N, cols = w.shape
    if cols % num_experts:
        raise ValueError(f"lora_B.weight: {cols} columns is not a multiple of num_experts = {num_experts}")
    return np.ascontiguousarray(w.reshape(N, cols // num_experts, num_experts).transpose(2, 0, 1))


# ---- the whole layer ----

def _arrays(lora) -> dict[str, np.ndarray]:
    if isinstance(lora, LoRAWeights):
        return {n: getattr(lora, n) for n in LORA_NAMES}
    missing = [n for n in LORA_NAMES if n not in lora]
    if missing:
        raise ValueError(f"lora: missing {', '.join(missing)}")
    return {n: np.asarray(lora[n]) for n in LORA_NAMES}


def to_peft(lora) -> dict[str, np.ndarray]:
    """ktgen's six matrices (a LoRAWeights or a mapping of the names) -> PEFT's four tensors:
    {"gate_up_proj.lora_A": [E*2r, H], "gate_up_proj.lora_B": [2I, 2r*E],
    "down_proj.lora_A": [E*r, I], "down_proj.lora_B": [H, r*E]}, same dtype as given."""
    m = _arrays(lora)
    ga, gb, ua, ub = m["gate_a"], m["gate_b"], m["up_a"], m["up_b"]
    E, r, H = ga.shape
    I = gb.shape[1]
    a_gu = np.concatenate([ga, ua], axis=1)                 # [E, 2r, H]
    b_gu = np.zeros((E, 2 * I, 2 * r), gb.dtype)            # block-diagonal [E, 2I, 2r]
    b_gu[:, :I, :r] = gb
    b_gu[:, I:, r:] = ub
    return {f"{GATE_UP}.lora_A": fold_a(a_gu), f"{GATE_UP}.lora_B": fold_b(b_gu),
            f"{DOWN}.lora_A": fold_a(m["down_a"]), f"{DOWN}.lora_B": fold_b(m["down_b"])}


def from_peft(tensors: Mapping[str, np.ndarray], num_experts: int, rank: int) -> dict[str, np.ndarray]:
    """PEFT's four tensors (keys as `to_peft` returns them) -> ktgen's six matrices for a layer
    of `num_experts` experts and LoRA rank `rank`. gate_up_proj may have rank 2*rank
    (block-diagonal, as `to_peft` writes it) or rank (a shared A, as PEFT trains it)."""
    E, r = num_experts, rank
    a_gu = unfold_a(np.asarray(tensors[f"{GATE_UP}.lora_A"]), E)      # [E, R, H]
    b_gu = unfold_b(np.asarray(tensors[f"{GATE_UP}.lora_B"]), E)      # [E, 2I, R]
    R = a_gu.shape[1]
    if b_gu.shape[2] != R:
        raise ValueError(f"gate_up_proj: lora_A has rank {R} per expert but lora_B has {b_gu.shape[2]}")
    if b_gu.shape[1] % 2:
        raise ValueError(f"gate_up_proj: lora_B has {b_gu.shape[1]} rows, expected 2 x intermediate_size")
    I = b_gu.shape[1] // 2
    if R == 2 * r:
        off = (b_gu[:, :I, r:], b_gu[:, I:, :r])
        if any(np.any(blk.astype(np.float32) != 0) for blk in off):
            raise ValueError(
                f"gate_up_proj: rank {R} = 2 x {r} but lora_B is not block-diagonal (gate rows "
                f"use up's rank columns or the reverse): not representable at ktgen rank {r}")
        out = {"gate_a": a_gu[:, :r], "up_a": a_gu[:, r:],
               "gate_b": b_gu[:, :I, :r], "up_b": b_gu[:, I:, r:]}
    elif R == r:
        out = {"gate_a": a_gu, "up_a": a_gu.copy(), "gate_b": b_gu[:, :I], "up_b": b_gu[:, I:]}
    else:
        raise ValueError(f"gate_up_proj: rank {R} per expert fits neither ktgen rank {r} (shared A) "
                         f"nor 2 x {r} (block-diagonal)")
    out["down_a"] = unfold_a(np.asarray(tensors[f"{DOWN}.lora_A"]), E)
    out["down_b"] = unfold_b(np.asarray(tensors[f"{DOWN}.lora_B"]), E)
    if out["down_a"].shape[1] != r or out["down_b"].shape[2] != r:
        raise ValueError(f"down_proj: rank {out['down_a'].shape[1]} per expert, expected {r}")
    return {n: np.ascontiguousarray(out[n]) for n in LORA_NAMES}


def peft_keys(prefix: str) -> dict[str, str]:
    """The state-dict keys PEFT saves for the experts module at `prefix` (its path in the
    model, e.g. "model.layers.0.mlp.experts"), keyed like `to_peft`'s result."""
    p = f"base_model.model.{prefix}" if prefix else "base_model.model"
    return {f"{GATE_UP}.lora_A": f"{p}.base_layer.lora_A.weight",
            f"{GATE_UP}.lora_B": f"{p}.base_layer.lora_B.weight",
            f"{DOWN}.lora_A": f"{p}.lora_A.weight",
            f"{DOWN}.lora_B": f"{p}.lora_B.weight"}


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def peft_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's `scaling` for a module of rank r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def peft_config(lora: LoRASpec, prefixes: list[str], base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for ktgen layers at the experts paths `prefixes`: a LoraConfig with
    target_parameters, rank 2r (and the alpha keeping ktgen's scale) on gate_up_proj."""
    r, alpha = lora.rank, float(lora.alpha)
    # gate_up_proj has rank 2r: its alpha keeps the scale s = alpha/r (alpha/sqrt(r) rsLoRA).
    alpha_gu = alpha * math.sqrt(2.0) if lora.use_rslora else 2.0 * alpha
    targets = sorted(f"{p}.{name}" if p else name for p in prefixes for name in (GATE_UP, DOWN))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _number(alpha),
        "use_rslora": bool(lora.use_rslora),
        "target_modules": [],
        "target_parameters": targets,
        "rank_pattern": {GATE_UP: 2 * r},
        "alpha_pattern": {GATE_UP: _number(alpha_gu)},
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _pattern_value(patterns: Mapping, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for pattern in patterns or {}:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def inexact_features(get) -> list[str]:
    """What of a LoRA configuration ktgen's experts do not compute, in words: dropout, DoRA, a
    bias. get(field, default) reads a field (of a peft.LoraConfig or of adapter_config.json)."""
    bad = []
    if get("lora_dropout", 0.0):
        bad.append(f"lora_dropout = {get('lora_dropout', 0.0)} (ktgen's LoRA has no dropout)")
    if get("use_dora", False):
        bad.append("use_dora = True (ktgen's LoRA has no magnitude vector)")
    if get("bias", "none") != "none" or get("lora_bias", False):
        bad.append("a LoRA bias")
    return bad


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(config, where: str) -> dict:
    """adapter_config.json as load_adapter reads it: a JSON object whose fields ktgen uses have
    the types and ranges PEFT gives them (r >= 1, lora_alpha > 0, use_rslora a bool, rank and
    alpha patterns objects of regular expressions -> ranks / alphas), for an adapter ktgen
    computes exactly (inexact_features). Anything else is a ValueError naming the field."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")

    def bad(field, want):
        return ValueError(f"{where}: {field}: expected {want}, got {config.get(field)!r:.80}")

    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r:.40}, expected 'LORA'")
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad("r", "an integer rank >= 1")
    if not _finite(config.get("lora_alpha", 8)) or config.get("lora_alpha", 8) <= 0:
        raise bad("lora_alpha", "a number > 0")
    for field in ("use_rslora", "use_dora", "lora_bias"):
        if not isinstance(config.get(field, False), bool):
            raise bad(field, "true or false")
    dropout = config.get("lora_dropout", 0.0)
    if not _finite(dropout) or not 0 <= dropout < 1:
        raise bad("lora_dropout", "a number in [0, 1)")
    if not isinstance(config.get("bias", "none"), str):
        raise bad("bias", "'none', 'all' or 'lora_only'")
    for field, want, ok in (("rank_pattern", "ranks >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool)
                             and v >= 1), ("alpha_pattern", "alphas > 0", lambda v: _finite(v) and v > 0)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise bad(field, f"an object of regular expressions -> {want}")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as err:
                raise ValueError(f"{where}: {field}: {pattern!r:.60} is not a regular expression ({err})") from None
            if not ok(value):
                raise ValueError(f"{where}: {field}[{pattern!r:.60}]: expected one of the {want}, got {value!r:.40}")
    refused = inexact_features(config.get)
    if refused:
        raise ValueError(f"{where}: this adapter is not what ktgen's experts compute: {'; '.join(refused)}")
    return config


def module_scale(config: Mapping, param_key: str, rank: int) -> float:
    """The scaling PEFT applies to the adapter of parameter `param_key` (a target_parameters
    entry such as "model.layers.0.mlp.experts.gate_up_proj") whose tensors have rank `rank`."""
    alpha = _pattern_value(config.get("alpha_pattern"), param_key, config.get("lora_alpha", 8))
    return peft_scale(rank, float(alpha), bool(config.get("use_rslora", False)))

"""Hugging Face experts: the refusal checks, from_hf_experts, patch_model (a whole transformers model)."""

from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import adapters, checkpoint as _checkpoint, formats as _formats, pack as _pack
from ..spec import MoESpec
from .interop import _from_np
from .module import KTMoE, _PackedFile

logger = logging.getLogger("ktgen.torch")

# ---- Hugging Face experts ----

def _top_k_of(module) -> int | None:
    for obj in (module, getattr(module, "gate", None), getattr(module, "router", None),
                getattr(module, "config", None)):
        if obj is None:
            continue
        for attr in ("top_k", "num_experts_per_tok"):
            v = getattr(obj, attr, None)
            if isinstance(v, int):
                return v
    return None


class UnsupportedExpertsError(ValueError):
    """A Hugging Face experts module whose computation ktgen does not reproduce exactly (a
    clamp, an overridden gate, another activation, biases, ...): refused rather than run
    wrong. The message names the module's class and the reason."""


# Attributes through which transformers' experts classes clamp their gated activation
# (DeepSeek-V4, gpt-oss, Step3, MiniMax, ... : `limit` from `config.swiglu_limit`).
_CLAMP_ATTRS = ("limit", "swiglu_limit", "activation_clamp", "clamp_limit", "alpha")
_CLAMP_CONFIG_ATTRS = ("swiglu_limit", "activation_clamp", "swiglu_alpha")
# The ones that may name the limit L of DeepSeek-V4's clamped SwiGLU, silu(min(g, L)) *
# clamp(u, -L, L), which ktgen runs (spec.swiglu_limit). Whether a module computes exactly that
# is decided by running it (_probe), not by its class: gpt-oss's clamp, with its alpha and +1,
# fails there and is refused.
_LIMIT_ATTRS = ("limit", "swiglu_limit")


def _swiglu_limit(module) -> float | None:
    """The clamp limit a fused experts module declares (its `limit` or `swiglu_limit`, or its
    config's swiglu_limit), None when it declares none."""
    for v in [getattr(module, a, None) for a in _LIMIT_ATTRS] + [
            getattr(getattr(module, "config", None), "swiglu_limit", None)]:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
    return None


def _refuse(module, reason: str):
    raise UnsupportedExpertsError(
        f"module: {type(module).__module__}.{type(module).__qualname__} cannot run on ktgen: "
        f"{reason}. ktgen computes exactly down(silu(gate x) * up x) per expert (docs/design.md#the-math), "
        f"or DeepSeek-V4's clamped down(silu(min(gate x, L)) * clamp(up x, -L, L)), with no bias, "
        f"other clamp or other activation")


def _check_activation(module) -> None:
    act = getattr(module, "act_fn", None)
    if act is None:
        _refuse(module, "it has no act_fn, so its activation is unknown")
    try:
        from transformers.activations import SiLUActivation
        silu_types: tuple = (nn.SiLU, SiLUActivation)
    except ImportError:  # pragma: no cover - transformers < 5
        silu_types = (nn.SiLU,)
    if type(act) not in silu_types:
        _refuse(module, f"its activation act_fn is {type(act).__name__}, not SiLU")


def _check_config(module, limit: float | None = None) -> None:
    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None)
    if isinstance(act, str) and act not in ("silu", "swish"):
        _refuse(module, f"its config has hidden_act = {act!r}, not 'silu'")
    for attr in _CLAMP_CONFIG_ATTRS:
        if attr == "swiglu_limit" and limit is not None:
            continue  # the clamp ktgen runs; _probe checks that it is the one the module applies
        v = getattr(config, attr, None)
        if v is not None and v is not False:
            _refuse(module, f"its config sets {attr} = {v!r}: the gated activation is clamped")


def _check_fused_experts(module, limit: float | None = None) -> None:
    """Refuse a transformers >= 5 fused experts module unless it computes what ktgen does (with
    `limit`: DeepSeek-V4's clamped SwiGLU, which _probe then confirms by running the module)."""
    for attr in _CLAMP_ATTRS:
        if attr in _LIMIT_ATTRS and limit is not None:
            continue
        v = getattr(module, attr, None)
        if v is not None and not isinstance(v, (nn.Module, torch.Tensor)) and v is not False:
            _refuse(module, f"it has {attr} = {v!r} (a swiglu_limit-style clamp of the "
                            f"gate/up activations, which ktgen's kernels do not apply)")
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None:
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:  # pragma: no cover
            _default_apply_gate = None
        if apply_gate is not _default_apply_gate and limit is None:
            where = getattr(apply_gate, "__qualname__", repr(apply_gate))
            _refuse(module, f"its class overrides _apply_gate ({where}), so its gated "
                            f"activation is not silu(gate) * up")
    if getattr(module, "has_bias", False):
        _refuse(module, "it has biases (has_bias = True)")
    if getattr(module, "has_gate", True) is False:
        _refuse(module, "it has no gate projection (has_gate = False)")
    if getattr(module, "has_post_expert_norm", False):
        _refuse(module, "it normalizes each expert's output (has_post_expert_norm = True)")
    extra = [n for n, _ in itertools.chain(module.named_parameters(recurse=False),
                                           module.named_buffers(recurse=False))
             if n not in ("gate_up_proj", "down_proj")]
    if extra:
        _refuse(module, f"it holds {', '.join(extra)} besides gate_up_proj and down_proj "
                        f"(biases, scales or other state ktgen would drop)")
    children = [n for n, c in module.named_children() if n != "act_fn"]
    if children:
        _refuse(module, f"it has submodules {', '.join(children)} besides act_fn")
    _check_activation(module)
    _check_config(module, limit)


def _check_mlp_expert(mlp, names) -> None:
    """Refuse an older per-expert MLP (gate_proj/up_proj/down_proj or w1/w3/w2) unless exact."""
    for n in names:
        lin = getattr(mlp, n)
        if not isinstance(lin, nn.Linear):
            _refuse(mlp, f"its {n} is a {type(lin).__name__}, not an nn.Linear")
        if lin.bias is not None:
            _refuse(mlp, f"its {n} has a bias")
    for attr in _CLAMP_ATTRS:
        v = getattr(mlp, attr, None)
        if v is not None and not isinstance(v, (nn.Module, torch.Tensor)) and v is not False:
            _refuse(mlp, f"it has {attr} = {v!r} (a clamp of the gate/up activations)")
    _check_activation(mlp)
    _check_config(mlp)


def _probe_inputs(g: torch.Tensor, n: int, scale: float, gen: torch.Generator):
    """n inputs [n, H] whose gate pre-activations have RMS about `scale`."""
    x = torch.randn(n, g.shape[-1], generator=gen, dtype=torch.float32)
    pre = x @ g.float().T
    rms = float(pre.pow(2).mean().sqrt())
    return x * (scale / rms if rms > 0 else 1.0)


def _probe(module, g, u, d, experts_list=None, limit: float | None = None) -> None:
    """Run the module itself on a few tokens at a moderate and at a large activation scale
    (where a clamp binds) and compare with silu(g x) * (u x) through down (with `limit` L:
    silu(min(g x, L)) * clamp(u x, -L, L)): a forward that does something else (an override the
    checks above do not know) is refused, not run wrong."""
    if any(t.device.type == "meta" for t in (g, u, d)):
        return
    E = g.shape[0]
    experts = sorted({0, E - 1, E // 2, 1 % E})
    dtype = g.dtype
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 4e-2
    gen = torch.Generator().manual_seed(1234)
    for scale in (2.0, 200.0):
        for e in experts:
            x = _probe_inputs(g[e], 4, scale, gen)
            xd = x.to(dtype)
            xf = xd.float()
            gf, uf, df = g[e].float(), u[e].float(), d[e].float()
            gx, ux = xf @ gf.T, xf @ uf.T
            if limit is not None:
                gx, ux = gx.clamp(max=limit), ux.clamp(min=-limit, max=limit)
            want = (torch.nn.functional.silu(gx) * ux) @ df.T
            with torch.no_grad():
                if experts_list is None:  # transformers >= 5: forward(x, top_k_index, top_k_weights)
                    ids = torch.full((4, 1), e, dtype=torch.int64)
                    got = module(xd, ids, torch.ones(4, 1, dtype=dtype))
                else:
                    got = experts_list[e](xd)
            got = got.float()
            err = float((got - want).norm() / want.norm().clamp_min(1e-12))
            if not err <= tol:
                what = "silu(gate) * up" if limit is None else f"silu(min(gate, {limit:g})) * clamp(up, ±{limit:g})"
                _refuse(module, f"its forward differs from {what} on expert {e} "
                                f"(relative L2 {err:.3g} at gate pre-activations of RMS "
                                f"{scale:g}; a clamp, an overridden gate or another activation)")


def _hf_weights(module: nn.Module):
    """(gate [E,I,H], up [E,I,H], down [E,H,I], the experts module, swiglu_limit or None) of an HF
    MoE block or experts module: transformers ≥ 5 fused experts (gate_up_proj/down_proj 3-D
    parameters) or the older ModuleList of per-expert MLPs (gate_proj/up_proj/down_proj, or
    Mixtral's w1/w3/w2)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == 3:
        limit = _swiglu_limit(module)
        _check_fused_experts(module, limit)
        g, u, dn = _checkpoint.split_fused(gate_up.detach(), down.detach(), getattr(module, "is_transposed", False),
                             getattr(module, "is_concatenated", True))
        _probe(module, g, u, dn, limit=limit)
        return g, u, dn, module, limit
    experts = getattr(module, "experts", None)
    if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
        return _hf_weights(experts)
    if isinstance(module, nn.ModuleList):
        experts = module
    if isinstance(experts, nn.ModuleList):
        names = None
        for cand in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            if all(hasattr(experts[0], n) for n in cand):
                names = cand
        if names is None or any(e is None for e in experts):
            raise ValueError("module: expected experts with gate_proj/up_proj/down_proj or w1/w3/w2")
        for e in experts:
            if type(e) is not type(experts[0]):
                _refuse(e, f"the experts are of different classes ({type(experts[0]).__name__}, "
                           f"{type(e).__name__})")
            _check_mlp_expert(e, names)
        stacks = [torch.stack([getattr(e, n).weight.detach() for e in experts]) for n in names]
        _probe(experts[0], *stacks, experts_list=experts)
        return stacks[0], stacks[1], stacks[2], experts, None
    raise ValueError(f"module: {type(module).__name__} is neither a Hugging Face MoE block nor its experts "
                     f"(gate_up_proj/down_proj parameters, or a ModuleList of expert MLPs)")


def from_hf_experts(module: nn.Module, spec: MoESpec | None = None, *, name: str = "hf_experts",
                    weights=None, **spec_fields) -> KTMoE:
    """A KTMoE with the base weights of a Hugging Face MoE block's experts (Qwen3-MoE, Mixtral,
    DeepSeek-V2/V3, Qwen2-MoE layouts; `module` is the block or its experts module).

    Without `spec`, the spec is derived from the weights' shapes (expert_num, hidden_size,
    intermediate_size) and the block's top_k (or `num_experts_per_tok=`); `spec_fields` set
    the other MoESpec fields (lora, max_len, quant, tp_count, ...). A given spec must match the
    weights. The returned module takes the experts' forward arguments (hidden_states [T, H],
    top_k_index, top_k_weights), so it can replace `block.experts` of a transformers ≥ 5 block.
    weights: the base weights to use instead of the module's (gate, up, down in any form KTMoE
    takes, or a packed weight file): the module is still checked, and gives top_k and its format;
    its own weights may then be on the meta device (patch_model's checkpoint=).
    """
    gate, up, down, experts, limit = _hf_weights(module)
    if weights is not None and not isinstance(weights, _PackedFile):
        gate, up, down = weights
    E, I, H = gate.shape
    if tuple(up.shape) != (E, I, H) or tuple(down.shape) != (E, H, I):
        raise ValueError(f"module: inconsistent expert shapes gate {tuple(gate.shape)}, "
                         f"up {tuple(up.shape)}, down {tuple(down.shape)}")
    if spec is None:
        fields = dict(spec_fields)
        if "num_experts_per_tok" not in fields:
            k = _top_k_of(module) or _top_k_of(experts)
            if k is None:
                raise ValueError("module: cannot tell top_k from it; pass num_experts_per_tok=")
            fields["num_experts_per_tok"] = k
        if "swiglu_limit" in fields and fields["swiglu_limit"] != limit:
            raise ValueError(f"swiglu_limit: {fields['swiglu_limit']!r} given, but the module's "
                             f"experts clamp at {limit!r}")
        fields["swiglu_limit"] = limit
        spec = MoESpec(name=name, expert_num=E, hidden_size=H, intermediate_size=I, **fields)
    else:
        if spec_fields:
            raise ValueError(f"pass either spec or spec fields, not both ({', '.join(spec_fields)})")
        got = (spec.expert_num, spec.hidden_size, spec.intermediate_size)
        if got != (E, H, I):
            raise ValueError(f"spec: (expert_num, hidden_size, intermediate_size) = {got}, but the "
                             f"module's experts are {(E, H, I)}")
        if spec.swiglu_limit != limit:
            raise ValueError(f"spec: swiglu_limit = {spec.swiglu_limit!r}, but the module's experts "
                             f"clamp at {limit!r}")
    layer = KTMoE(spec, weights if isinstance(weights, _PackedFile) else gate, up, down)
    if not isinstance(experts, nn.ModuleList):
        layer._hf_format = {"dtype": experts.gate_up_proj.dtype,
                            "is_transposed": bool(getattr(experts, "is_transposed", False)),
                            "is_concatenated": bool(getattr(experts, "is_concatenated", True))}
    return layer


# ---- a whole transformers model in one call ----

# PEFT's LoraConfig defaults (peft 0.21: r=8, lora_alpha=8): an adapter saved with them loads
# into a model patched with lora=None, and the other way round.
PEFT_DEFAULT_RANK, PEFT_DEFAULT_ALPHA = 8, 8.0
_LORA_KEYS = {"r": "rank", "rank": "rank", "lora_alpha": "alpha", "alpha": "alpha",
              "use_rslora": "use_rslora", "dtype": "dtype"}


@dataclass
class PatchReport:
    """What patch_model did: the experts modules replaced (their paths in the model), the spec
    of each distinct shape, and the parameter counts after freezing."""
    layers: list[str]
    specs: list[MoESpec]
    trainable_parameters: int
    total_parameters: int
    lora_parameters: int

    def __str__(self) -> str:
        return (f"ktgen: {len(self.layers)} MoE expert layers on ktgen "
                f"({', '.join(sorted({s.quant.mode for s in self.specs}))}); trainable parameters "
                f"{self.trainable_parameters:,} of {self.total_parameters:,} (LoRA on the experts: "
                f"{self.lora_parameters:,})")


def _lora_spec_fields(lora) -> dict | None:
    """patch_model's `lora` argument as MoESpec.lora fields (None: no LoRA)."""
    if lora is False:
        return None
    if lora is None:
        return {"rank": PEFT_DEFAULT_RANK, "alpha": PEFT_DEFAULT_ALPHA}
    if isinstance(lora, Mapping):
        out: dict[str, Any] = {}
        for k, v in lora.items():
            if k not in _LORA_KEYS:
                raise ValueError(f"lora: unknown key {k!r} (allowed: {', '.join(_LORA_KEYS)})")
            out[_LORA_KEYS[k]] = v
        out.setdefault("rank", PEFT_DEFAULT_RANK)
        out.setdefault("alpha", PEFT_DEFAULT_ALPHA)  # PEFT's default, not ktgen's 2 x rank
        if isinstance(out["alpha"], int) and not isinstance(out["alpha"], bool):
            out["alpha"] = float(out["alpha"])
        return out
    if type(lora).__name__ == "LoraConfig":
        bad = adapters.inexact_features(lambda field, default: getattr(lora, field, default))
        if getattr(lora, "init_lora_weights", True) is not True:
            bad.append(f"init_lora_weights = {lora.init_lora_weights!r} (ktgen initialises as PEFT's "
                       f"default, True)")
        if getattr(lora, "rank_pattern", None) or getattr(lora, "alpha_pattern", None):
            bad.append("rank_pattern / alpha_pattern (one rank and alpha for every expert layer)")
        if bad:
            raise ValueError(f"lora: this LoraConfig is not what ktgen's experts compute: {'; '.join(bad)}")
        targets = getattr(lora, "target_modules", None)
        if targets:
            logger.warning("ktgen.torch.patch_model: LoRA goes on the MoE experts only; "
                           "lora.target_modules %s are not adapted (wrap the patched model with "
                           "PEFT for those)", targets)
        return {"rank": int(lora.r), "alpha": float(lora.lora_alpha),
                "use_rslora": bool(getattr(lora, "use_rslora", False))}
    raise TypeError(f"lora: expected None, False, a dict or a peft.LoraConfig, got {type(lora).__name__}")


def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, block) of every module whose `experts` child holds transformers >= 5 fused expert
    weights (3-D gate_up_proj and down_proj): Qwen3-MoE, Mixtral, DeepSeek-V3 and the like."""
    found = []
    for path, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, KTMoE) or not isinstance(experts, nn.Module):
            continue
        gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3:
            found.append((path, module))
    return found


class _ExpertsSource:
    """patch_model's checkpoint=: a Hugging Face checkpoint directory, or a `ktgen pack` output
    directory (its ktgen-pack.json names the checkpoint it came from, checked against it)."""

    def __init__(self, directory):
        directory = Path(directory)
        self.pack = _pack.PackIndex.read(directory)
        self.directory = directory
        self.renames: dict[str, str] = {}   # a model block's path -> its name in the checkpoint
        self.hf = self.pack.source() if self.pack is not None else _checkpoint.Checkpoint(directory)

    def layer(self, module_path: str, quant: dict, experts: nn.Module):
        """(weights for from_hf_experts, the spec's quant fields) of one experts module."""
        layers = self.pack.layers if self.pack is not None else self.hf.layers
        prefix = _checkpoint.match_prefix(module_path, layers, self.directory)
        self.renames[module_path.rsplit(".", 1)[0]] = prefix
        if self.pack is not None:
            f = self.pack.layer_file(prefix)
            q = f.spec.quant.model_dump()
            f.close()
            if quant.get("mode", q["mode"]) != q["mode"]:
                raise ValueError(f"quant: {self.directory} holds {q['mode']} experts, not {quant['mode']}")
            return _PackedFile(f.path), q
        keys = layers[prefix]
        mode = quant.get("mode") or self.hf.layer_format(keys)
        weights = self.hf.load_layer(keys, mode, group_size=quant.get("group_size"),
                                     is_transposed=bool(getattr(experts, "is_transposed", False)),
                                     is_concatenated=bool(getattr(experts, "is_concatenated", True)))
        q = {**quant, "mode": mode}
        if _formats.FORMATS[mode].grouped:
            q["group_size"] = weights[0].group_size
        return weights, q

    def load_rest(self, model: nn.Module) -> None:
        """Every parameter and persistent buffer still on the meta device (a model built under
        accelerate.init_empty_weights()), read from the checkpoint under its own name or under
        the checkpoint's name of its MoE block; tied weights are tied again."""
        meta = _meta_tensors(model)
        if not meta:
            return
        if self.hf is None:
            raise ValueError(f"model: {len(meta)} tensors ({', '.join(list(meta)[:3])}, ...) are on the meta "
                             f"device, and {self.directory}'s ktgen-pack.json names no checkpoint "
                             f"to read them from")
        state = {}
        for key in meta:
            cand = [key] + [prefix + key[len(block):] for block, prefix in self.renames.items()
                            if key.startswith(block + ".")]
            found = next((c for c in cand if c in self.hf.tensors), None)
            if found is not None:
                state[key] = _from_np(self.hf.read(found)).to(meta[key].dtype)
        model.load_state_dict(state, strict=False, assign=True)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        still = list(_meta_tensors(model))
        if still:
            raise ValueError(f"checkpoint: {self.hf.directory} has no tensor for {', '.join(still[:4])}"
                             f"{' ...' if len(still) > 4 else ''} (on the meta device; load the model "
                             f"with from_pretrained when its checkpoint renames them)")


def _meta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers on the meta device, by state-dict name (not through
    state_dict(), whose KTMoE hook would dequantize every expert layer)."""
    found = {}
    for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                   model.named_buffers(remove_duplicate=False)):
        if t.device.type == "meta":
            found[name] = t
    return found


def patch_model(model: nn.Module, *, quant=None, lora=None, max_len: int = 4096, isa: str = "auto",
                checkpoint=None, threads: int | None = None, progress: bool = True) -> PatchReport:
    """Run every MoE experts module of a transformers model on ktgen, in place, and freeze every
    base weight so that only the experts' LoRA parameters train.

    quant: "bf16", "int8", "awq", "k2" or a dict of MoESpec.quant fields (default: bf16, or the
    checkpoint's own int4 format). lora: None (PEFT's
    defaults, r=8 and lora_alpha=8, so a PEFT-default adapter loads), False (no LoRA), a dict
    (r/rank, lora_alpha/alpha — default 8 as PEFT's —, use_rslora, dtype) or a
    peft.LoraConfig. max_len: the most tokens (batch x sequence) one forward takes. isa:
    MoESpec.isa. Each experts module is checked first (from_hf_experts refuses one ktgen does
    not compute exactly, before anything is replaced), then replaced one at a time with a
    progress bar. Returns a PatchReport (print it for a summary).

    checkpoint: a Hugging Face checkpoint directory, or the output directory of `ktgen pack`.
    The experts are then built from its files, one layer at a time, never from the model's own
    weights: bf16/fp16/fp32, AutoAWQ GEMM or compressed-tensors pack-quantized experts, or packed
    files (mapped read-only when this tier packs as they were written). The model may be built
    empty (`with accelerate.init_empty_weights(): model = AutoModelForCausalLM.from_config(cfg)`):
    every parameter still on the meta device after patching is read from the checkpoint. Loading
    a whole model this way holds its packed experts and one layer's source weights at a time.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if quant is None:
        quant = {}
    elif isinstance(quant, str):
        quant = {"mode": quant}
    elif not isinstance(quant, Mapping):
        raise TypeError(f"quant: expected a mode name or a dict of quant fields, got {type(quant).__name__}")
    source = None if checkpoint is None else _ExpertsSource(checkpoint)
    lora_fields = _lora_spec_fields(lora)
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError(f"model: no supported MoE block in {type(model).__name__} (a module with an "
                         f"`experts` child holding 3-D gate_up_proj and down_proj, as transformers >= 5 "
                         f"stores Qwen3-MoE, Mixtral and DeepSeek-V3 experts)")
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", None) or "hf")
    name = "hf_" + re.sub(r"[^a-z0-9_]", "_", model_type.lower())
    fields = {"max_len": max_len, "isa": isa, "quant": dict(quant) or {"mode": "bf16"}, "lora": lora_fields}
    if threads is not None:
        fields["threads"] = threads
    for path, block in blocks:  # refuse before replacing anything
        try:
            _hf_weights(block.experts)
        except UnsupportedExpertsError as err:
            raise UnsupportedExpertsError(f"{path}.experts: {err}") from None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of ktgen[torch]
        tqdm = None
    it = blocks if tqdm is None else tqdm(blocks, desc="ktgen: MoE experts", unit="layer",
                                         disable=not progress)
    specs: list[MoESpec] = []
    patched = []
    for path, block in it:
        if source is None:
            layer = from_hf_experts(block, name=name, **fields)
        else:
            weights, q = source.layer(f"{path}.experts" if path else "experts", dict(quant), block.experts)
            layer = from_hf_experts(block, name=name, weights=weights, **{**fields, "quant": q})
            del weights
            _checkpoint.trim_heap()
        block.experts = layer  # the old experts (and their weights) go
        patched.append(".".join(p for p in (path, "experts") if p))
        if layer.spec not in specs:
            specs.append(layer.spec)
    if source is not None:
        source.load_rest(model)
    for p in model.parameters():
        p.requires_grad_(False)
    lora_count = 0
    for m in model.modules():
        if isinstance(m, KTMoE):
            for p in m._lora_params():
                p.requires_grad_(True)
                lora_count += p.numel()
    params = list(model.parameters())
    report = PatchReport(layers=patched, specs=specs,
                         trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
                         total_parameters=sum(p.numel() for p in params),
                         lora_parameters=lora_count)
    logger.info("%s", report)
    return report



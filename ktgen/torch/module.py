"""The KTMoE module: autograd through the saved forward, state-dict hooks, zero-copy LoRA."""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .. import adapters, checkpoint as _checkpoint, packed as _packed
from ..runtime import LORA_NAMES, LoRAWeights, MoE, SavedForward
from ..spec import MoESpec, load_spec
from .interop import _LORA_TORCH_DTYPES, _ToDevice, _ToHost, _base_weight, _from_np, _is_fsdp, _np_view, _pointer_view

logger = logging.getLogger("ktgen.torch")

# ---- saved forwards, tied to a tiny tensor so that checkpointing can drop and recompute them ----

class _Entry:
    __slots__ = ("saved", "versions", "ptrs")

    def __init__(self, saved: SavedForward, versions: tuple, ptrs: tuple):
        self.saved, self.versions, self.ptrs = saved, versions, ptrs


_LIVE: dict[int, _Entry] = {}
_LIVE_LOCK = threading.Lock()
_IDS = itertools.count(1)


def _drop_entry(uid: int) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(uid, None)  # the SavedForward goes with it: its slot is given back


def _handle_for(entry: _Entry) -> torch.Tensor:
    """A 1-element int64 tensor naming `entry`. Its storage is a NumPy array whose death (when
    the last tensor sharing it, detached aliases included, is gone) drops the entry."""
    import weakref

    uid = next(_IDS)
    box = np.array([uid], np.int64)
    with _LIVE_LOCK:
        _LIVE[uid] = entry
    weakref.finalize(box, _drop_entry, uid)
    return torch.from_numpy(box)



class _KTMoEFunction(torch.autograd.Function):
    """out = MoE(x, ids, w) with the LoRA parameters as inputs; backward = MoE.backward."""

    @staticmethod
    def forward(ctx, layer: "KTMoE", x, ids, w, *params):
        out, saved = layer.moe.forward_train(_np_view(x), _np_view(ids), _np_view(w))
        entry = _Entry(saved, tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        ctx.save_for_backward(_handle_for(entry))
        ctx.layer = layer
        return _from_np(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (handle,) = ctx.saved_tensors
        uid = int(handle[0])
        with _LIVE_LOCK:
            entry = _LIVE.pop(uid, None)
        if entry is None or entry.saved.consumed:
            raise RuntimeError(
                "ktgen.torch.KTMoE: this forward's saved state was already used by a backward; "
                "a KTMoE graph can be backpropagated once (retain_graph=True does not keep it)")
        layer: KTMoE = ctx.layer
        params = layer._lora_params()
        # FSDP2 frees the unsharded LoRA after the forward and gathers it again (same values,
        # maybe elsewhere, a new version) for the backward: point the kernels at it again.
        layer._sync_lora()
        fsdp = _is_fsdp(layer)
        for name, p, v, ptr in zip(LORA_NAMES, params, entry.versions, entry.ptrs):
            if not fsdp and p.data_ptr() == ptr and p._version != v:
                raise RuntimeError(
                    f"ktgen.torch.KTMoE: LoRA parameter {name} was modified in place between the "
                    f"forward and its backward (version {v} -> {p._version}); run backward before "
                    f"optimizer.step()")
        g = grad_out
        if g.dtype != torch.bfloat16:
            g = g.to(torch.bfloat16)
        grads = layer.moe.backward(entry.saved, _np_view(g.contiguous()))
        need = ctx.needs_input_grad
        result: list[Any] = [None,
                             _from_np(grads.input) if need[1] else None,
                             None,
                             torch.from_numpy(grads.routing_weights) if need[3] else None]
        for i, name in enumerate(LORA_NAMES[:len(params)]):
            result.append(_from_np(getattr(grads, name)) if need[4 + i] else None)
        return tuple(result)


def _hf_state_dict_hook(module: "KTMoE", state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the experts in the model's own format (gate_up_proj, down_proj) next
    to the LoRA, so that save_pretrained writes a checkpoint transformers loads back."""
    fmt = module._hf_format
    if fmt is None:
        return
    for key, value in module.hf_weights().items():
        state_dict[prefix + key] = value


def _hf_load_state_dict_pre_hook(module: "KTMoE", state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: take gate_up_proj/down_proj (as the hook above writes them) and
    rebuild the kernels' base weights when they differ from those the kernels hold."""
    fmt = module._hf_format
    keys = [prefix + "gate_up_proj", prefix + "down_proj"]
    if fmt is None or not any(k in state_dict for k in keys):
        return
    if not all(k in state_dict for k in keys):
        error_msgs.append(f"{prefix}: gate_up_proj and down_proj come together; got only one")
        return
    g, u, d = _checkpoint.split_fused(state_dict.pop(keys[0]).detach().cpu(), state_dict.pop(keys[1]).detach().cpu(),
                        fmt["is_transposed"], fmt["is_concatenated"])
    current = [module.dequantized(n) for n in ("gate", "up", "down")]
    given = [_from_np(_base_weight(n, t)).float() if isinstance(t, torch.Tensor) else t
             for n, t in (("gate", g), ("up", u), ("down", d))]
    if module.spec.quant.mode == "bf16" and all(torch.equal(a, b) for a, b in zip(current, given)):
        return
    module._rebuild(module.spec, (g, u, d))


# ---- the module ----

@dataclass(frozen=True)
class _PackedFile:
    """KTMoE's base weights given as a packed weight file (KTMoE.from_packed), or some of its
    experts (ExpertParallelMoE.from_packed)."""
    path: Path
    experts: range | None = None


class KTMoE(nn.Module):
    """One MoE expert layer on ktgen's kernels, with trainable LoRA parameters.

    spec: a ktgen.MoESpec, a bundled spec name or a YAML path. gate, up [E, I, H] and down
    [E, H, I]: torch tensors or NumPy arrays of any float dtype (rounded to bf16, then
    quantized per spec.quant), or pre-quantized objects (docs/design.md#base-weight-formats).
    lora: optional initial values (a
    ktgen.LoRAWeights or a mapping of the six names to tensors/arrays), else PEFT's
    initialisation (A Kaiming-uniform as nn.Linear, B zero: the layer starts as the base).
    """

    def __init__(self, spec, gate, up, down, lora=None, *, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(spec, (str, os.PathLike)):
            spec = load_spec(spec)
        if not isinstance(spec, MoESpec):
            raise TypeError(f"spec: expected a ktgen.MoESpec, a bundled spec name or a path, "
                            f"got {type(spec).__name__}")
        self.spec = spec
        self._lora_key: tuple | None = None
        if spec.lora is not None:
            dtype = _LORA_TORCH_DTYPES[spec.lora.dtype]
            for name, shape in LoRAWeights.shapes(spec).items():
                self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype)))
            self.reset_parameters(generator)
            if lora is not None:
                self.load_lora(lora)
        elif lora is not None:
            raise ValueError(f"lora: spec {spec.name} has no LoRA (lora: null), but LoRA weights were given")
        if isinstance(gate, _PackedFile):
            self.moe = MoE.from_packed(gate.path, spec, lora=self._lora_views() if spec.lora else None,
                                       experts=gate.experts)
        else:
            weights = [_base_weight(n, w) for n, w in (("gate", gate), ("up", up), ("down", down))]
            self.moe = MoE(spec, *weights, self._lora_views() if spec.lora is not None else None)
        self._lora_key = self._current_lora_key()
        # Set by from_hf_experts: how the experts module stored its weights, so that state_dict
        # (and save_pretrained) writes them back in that format.
        self._hf_format: dict | None = None
        self.register_state_dict_post_hook(_hf_state_dict_hook)
        self.register_load_state_dict_pre_hook(_hf_load_state_dict_pre_hook)

    @classmethod
    def from_packed(cls, path, spec=None, lora=None, *, generator: torch.Generator | None = None) -> "KTMoE":
        """A KTMoE whose base weights are a packed weight file (`ktgen pack`, MoE.save_packed),
        mapped read-only when this tier's layout is the file's (ktgen.MoE.from_packed). spec: the
        file's (default) or another for the same weights (its LoRA, max_len, tp_count, ...)."""
        if isinstance(spec, (str, os.PathLike)):
            spec = load_spec(spec)
        spec = _packed.PackedFile(path).check_spec(spec)
        return cls(spec, _PackedFile(Path(path)), None, None, lora, generator=generator)

    # ---- rebuilding the kernels: pickling, deepcopy, a LoRA dtype change ----
    def _rebuild(self, spec: MoESpec, base: tuple) -> None:
        """A new MoE for `spec` (same shapes and quantization) with base weights `base`."""
        weights = [_base_weight(n, w) for n, w in zip(("gate", "up", "down"), base)]
        old = self.__dict__.get("moe")
        self.spec = spec
        self.moe = MoE(spec, *weights, self._lora_views() if spec.lora is not None else None)
        self._lora_key = self._current_lora_key()
        if old is not None:
            old.close()

    def __getstate__(self):
        """Pickle (torch.save, copy.deepcopy): everything but the compiled kernel, plus the base
        weights read back from it exactly (bf16, or the packed base-format form for quantized modes); the
        kernel is compiled again (from ktgen's cache) on unpickling."""
        state = self.__dict__.copy()
        state.pop("moe", None)
        state["_lora_key"] = None
        state["_ktgen_base"] = self.moe.base_weights()
        return state

    def __setstate__(self, state):
        state = dict(state)
        base = state.pop("_ktgen_base")
        super().__setstate__(state)
        self._rebuild(self.spec, base)

    def _apply(self, fn, recurse=True):
        """nn.Module.to/.float/.bfloat16/...: a new LoRA dtype re-specializes the kernel
        (spec.lora.dtype follows the parameters); the base weights are carried over exactly."""
        if self.spec.lora is None:
            return super()._apply(fn, recurse)
        before = self.gate_a.dtype
        probe = fn(torch.zeros(1, dtype=before))
        target = probe.dtype
        if probe.device.type != "cpu":
            # model.to("cuda"): the experts and their LoRA stay on the CPU (GPU hybrid: forward
            # takes CUDA activations); a dtype change that comes with it still applies.
            return self if target == before else self._apply(lambda t: t.to(target), recurse)
        names = {v: k for k, v in _LORA_TORCH_DTYPES.items()}
        if target != before and target not in names:
            raise ValueError(f"dtype: KTMoE's LoRA parameters are float32 or bfloat16 (the kernels "
                             f"are compiled for one of them), not {target}; convert the rest of the "
                             f"model alone, or use torch.bfloat16")
        result = super()._apply(fn, recurse)
        if self.gate_a.dtype != before and self.gate_a.device.type == "cpu":
            lora = self.spec.lora.model_dump()
            lora["dtype"] = names[self.gate_a.dtype]
            self._rebuild(self.spec.replace(lora=lora), self.moe.base_weights())
        return result

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """The base weights as the transformers experts module this layer came from stored them:
        {"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]} (transposed or interleaved as it
        was), in its dtype. Only for a layer made by from_hf_experts / patch_model."""
        fmt = self._hf_format
        if fmt is None:
            raise ValueError("this KTMoE was not made from a Hugging Face experts module")
        with torch.no_grad():
            g, u, d = (self.dequantized(n) for n in ("gate", "up", "down"))
            if fmt["is_concatenated"]:
                gu = torch.cat([g, u], dim=1)
            else:
                gu = torch.stack([g, u], dim=2).reshape(g.shape[0], 2 * g.shape[1], g.shape[2])
            if fmt["is_transposed"]:
                gu, d = gu.transpose(1, 2), d.transpose(1, 2)
            dtype = fmt["dtype"]
            return {"gate_up_proj": gu.to(dtype).contiguous(), "down_proj": d.to(dtype).contiguous()}

    # ---- parameters ----
    def _lora_params(self) -> tuple[torch.Tensor, ...]:
        if self.spec.lora is None:
            return ()
        return tuple(getattr(self, n) for n in LORA_NAMES)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's LoRA initialisation: each expert's A as PEFT's lora_A nn.Linear
        (kaiming_uniform_(a=sqrt(5)) over fan_in = the input dim, i.e. U(-1/sqrt(K), 1/sqrt(K))),
        B zero."""
        if self.spec.lora is None:
            return
        for name in ("gate_a", "up_a", "down_a"):
            p = getattr(self, name)
            E, r, K = p.shape
            nn.init.kaiming_uniform_(p.view(E * r, K), a=math.sqrt(5), generator=generator)
        for name in ("gate_b", "up_b", "down_b"):
            getattr(self, name).zero_()

    @torch.no_grad()
    def load_lora(self, lora) -> None:
        """Copy LoRA values (a ktgen.LoRAWeights or a mapping name -> tensor/array) into the
        parameters, in place: all six are checked (present, floating point, of the parameters'
        shapes) before any is written."""
        if self.spec.lora is None:
            raise ValueError(f"lora: spec {self.spec.name} has no LoRA (lora: null)")
        values = {}
        for name in LORA_NAMES:
            if not isinstance(lora, LoRAWeights) and name not in lora:
                raise ValueError(f"lora: no {name} (expected {', '.join(LORA_NAMES)})")
            src = getattr(lora, name) if isinstance(lora, LoRAWeights) else lora[name]
            if isinstance(src, np.ndarray):
                src = _from_np(np.ascontiguousarray(src))
            if not isinstance(src, torch.Tensor) or not src.is_floating_point():
                raise ValueError(f"lora.{name}: expected a floating-point tensor or array, got "
                                 f"{getattr(src, 'dtype', type(src).__name__)}")
            p = getattr(self, name)
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"lora.{name}: expected shape {tuple(p.shape)}, got {tuple(src.shape)}")
            values[name] = src
        for name, src in values.items():
            getattr(self, name).copy_(src)

    def _current_lora_key(self) -> tuple:
        return tuple((p.data_ptr(), p.dtype, tuple(p.shape), p.stride(), p.device.type)
                     for p in self._lora_params())

    def _lora_views(self) -> LoRAWeights:
        spec = self.spec
        want = _LORA_TORCH_DTYPES[spec.lora.dtype]
        for name, shape in LoRAWeights.shapes(spec).items():
            p = getattr(self, name)
            if p.device.type != "cpu":
                raise ValueError(f"{name}: KTMoE runs on the CPU; the parameter is on {p.device}")
            if p.dtype != want:
                raise ValueError(f"{name}: expected dtype {want} (spec lora.dtype = "
                                 f"{spec.lora.dtype}), got {p.dtype}; KTMoE's LoRA dtype is fixed "
                                 f"by its spec")
            if tuple(p.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(p.shape)}")
            if not p.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous parameter, got strides {p.stride()}")
        return LoRAWeights(**{n: _pointer_view(getattr(self, n)) for n in LORA_NAMES})

    def _sync_lora(self) -> None:
        """Re-point the kernels if a parameter's storage was replaced since the last forward."""
        if self.spec.lora is None:
            return
        key = self._current_lora_key()
        if key != self._lora_key:
            self.moe.set_lora(self._lora_views())
            self._lora_key = key

    # ---- forward ----
    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """out [..., H] bf16 = sum_j topk_weights[..., j] * expert_{topk_ids[..., j]}(hidden_states)."""
        spec = self.spec
        H, k = spec.hidden_size, spec.num_experts_per_tok
        for name, t in (("hidden_states", hidden_states), ("topk_ids", topk_ids),
                        ("topk_weights", topk_weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{name}: KTMoE takes CPU or CUDA tensors; got a tensor on {t.device}")
            if t.device != hidden_states.device:
                raise ValueError(f"{name}: on {t.device}, but hidden_states is on {hidden_states.device}")
        device = hidden_states.device
        if hidden_states.ndim < 1 or hidden_states.shape[-1] != H:
            raise ValueError(f"hidden_states: expected shape [..., {H}], got {tuple(hidden_states.shape)}")
        lead = tuple(hidden_states.shape[:-1])
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if tuple(t.shape) != lead + (k,):
                raise ValueError(f"{name}: expected shape {lead + (k,)} (hidden_states' leading dims, "
                                 f"num_experts_per_tok = {k}), got {tuple(t.shape)}")
        if not hidden_states.is_floating_point():
            raise ValueError(f"hidden_states: expected a floating-point tensor, got {hidden_states.dtype}")
        if not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights: expected a floating-point tensor, got {topk_weights.dtype}")
        if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
            raise ValueError(f"topk_ids: expected an integer tensor, got {topk_ids.dtype}")
        T = math.prod(lead)
        if T > spec.max_len:
            raise ValueError(
                f"hidden_states: {T} tokens (T = batch x sequence, the product of the leading dims "
                f"{lead}) exceeds max_len = {spec.max_len} of spec {spec.name}; use a larger max_len "
                f"(patch_model(..., max_len=...)) or shorter batches")
        x = hidden_states.reshape(-1, H).to(torch.bfloat16).contiguous()
        ids = topk_ids.reshape(-1, k)
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.to(torch.int64)
        ids = ids.detach().contiguous()
        w = topk_weights.reshape(-1, k).to(torch.float32).contiguous()
        if device.type != "cpu":   # GPU hybrid: through pinned host buffers, and back
            x, ids, w = _ToHost.apply(x), _ToHost.apply(ids), _ToHost.apply(w)

        self._sync_lora()
        params = self._lora_params()
        need_grad = torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or any(p.requires_grad for p in params))
        if need_grad:
            out = _KTMoEFunction.apply(self, x, ids, w, *params)
        else:
            out = _from_np(self.moe.forward(_np_view(x), _np_view(ids), _np_view(w)))
        if device.type != "cpu":
            out = _ToDevice.apply(out, device)
        return out.reshape(*lead, H)

    # ---- the rest ----
    @torch.no_grad()
    def dequantized(self, name: str) -> torch.Tensor:
        """The base weights the kernels compute with, float32 (gate/up [E,I,H], down [E,H,I])."""
        return torch.from_numpy(self.moe.dequantized(name))

    def lora_scale(self) -> float:
        """s of docs/design.md#the-math (alpha / rank, or alpha / sqrt(rank) with rsLoRA); 0 without LoRA."""
        return self.spec.lora.scale if self.spec.lora is not None else 0.0

    def peft_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """This layer's LoRA matrices in PEFT's layout, keyed as PEFT saves an adapter for the
        experts module at `prefix` (see ktgen.adapters). New tensors, lora.dtype."""
        if self.spec.lora is None:
            raise ValueError(f"spec {self.spec.name} has no LoRA (lora: null): nothing to save")
        with torch.no_grad():
            arrays = adapters.to_peft({n: _np_view(getattr(self, n)) for n in LORA_NAMES})
        keys = adapters.peft_keys(prefix)
        return {keys[k]: _from_np(a) for k, a in arrays.items()}

    @torch.no_grad()
    def load_peft_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str,
                             config: Mapping | None = None, *, experts: range | None = None,
                             expert_num: int | None = None) -> None:
        """Load this layer's LoRA from a PEFT state dict (keys as `peft_state_dict` writes them,
        or as PEFT itself trains them with a shared A), in place; see peft_lora."""
        self.load_lora(self.peft_lora(state_dict, prefix, config, experts=experts, expert_num=expert_num))

    def peft_lora(self, state_dict: Mapping[str, torch.Tensor], prefix: str, config: Mapping | None = None,
                  *, experts: range | None = None, expert_num: int | None = None) -> dict[str, np.ndarray]:
        """This layer's six LoRA matrices from a PEFT state dict, checked (keys, 2-D floating
        tensors, expert count, ranks, shapes) and nothing written. With `config` (the
        adapter_config dict, adapters.check_config), its ranks and alphas must give this
        spec's scale. experts, expert_num: the state dict is of a layer of expert_num experts,
        of which this one holds `experts` (ExpertParallelMoE)."""
        spec = self.spec
        if spec.lora is None:
            raise ValueError(f"spec {spec.name} has no LoRA (lora: null): nothing to load")
        keys = adapters.peft_keys(prefix)
        missing = [v for v in keys.values() if v not in state_dict]
        if missing:
            raise ValueError(f"adapter has no {', '.join(missing)} (expected for experts at {prefix!r})")
        arrays = {}
        for k, key in keys.items():
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
                raise ValueError(f"{key}: expected a 2-D floating-point tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            arrays[k] = _np_view(t.detach().cpu().contiguous())
        E, r = (spec.expert_num if expert_num is None else expert_num), spec.lora.rank
        for param in (adapters.GATE_UP, adapters.DOWN):
            rows = arrays[f"{param}.lora_A"].shape[0]
            if config is not None:
                # PEFT's tensors are [E' * r', in] and [out, r' * E']: with the adapter's rank r' from
                # its config, a different expert count E' shows as such, not as a rank mismatch.
                key = f"{prefix}.{param}"
                rank = adapters._pattern_value(config.get("rank_pattern"), key, config.get("r", 8))
                if rows % rank == 0 and rows // rank != E:
                    raise ValueError(
                        f"{key}: the adapter was trained for {rows // rank} experts (lora_A has "
                        f"{rows} rows at rank {rank}), this KTMoE has expert_num = {E}: an adapter "
                        f"of another model")
            if rows == 0 or rows % E:
                raise ValueError(f"{prefix}.{param}: lora_A has {rows} rows, not a positive multiple of "
                                 f"expert_num = {E}")
        if config is not None:
            for param in (adapters.GATE_UP, adapters.DOWN):
                rank = arrays[f"{param}.lora_A"].shape[0] // E
                got = adapters.module_scale(config, f"{prefix}.{param}", rank)
                if not math.isclose(got, spec.lora.scale, rel_tol=1e-6):
                    raise ValueError(
                        f"{prefix}.{param}: the adapter's scaling is {got:g} (rank {rank}), this "
                        f"KTMoE's spec has lora scale {spec.lora.scale:g} (rank {r}, alpha "
                        f"{spec.lora.alpha:g}, use_rslora {spec.lora.use_rslora})")
        try:
            lora = adapters.from_peft(arrays, E, r)
        except ValueError as err:
            raise ValueError(f"{prefix}.{err}") from None
        if experts is not None:
            lora = {n: a[experts.start:experts.stop] for n, a in lora.items()}
        for name, shape in LoRAWeights.shapes(spec).items():
            if lora[name].shape != shape:
                raise ValueError(f"{prefix}: the adapter's {name} is {lora[name].shape}, this KTMoE's is "
                                 f"{shape} (hidden_size {spec.hidden_size}, intermediate_size "
                                 f"{spec.intermediate_size})")
        return lora

    def extra_repr(self) -> str:
        s = self.spec
        lora = "none" if s.lora is None else f"rank={s.lora.rank}, alpha={s.lora.alpha:g}, dtype={s.lora.dtype}"
        return (f"spec={s.name!r}, experts={s.expert_num}, top_k={s.num_experts_per_tok}, "
                f"hidden={s.hidden_size}, intermediate={s.intermediate_size}, "
                f"quant={s.quant.mode}, lora=({lora}), tp={s.tp_count}")

    def close(self) -> None:
        self.moe.close()



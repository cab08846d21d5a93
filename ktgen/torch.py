"""PyTorch integration: an autograd-aware MoE module, PEFT-compatible adapters, and
Hugging Face expert import. Needs ``pip install ktgen[torch]`` (``ktgen[hf]`` adds
transformers for `from_hf_experts`); ``import ktgen`` never imports torch.

``KTMoE(spec, gate, up, down)`` is an ``nn.Module`` whose six LoRA matrices are ordinary
``nn.Parameter``\\ s (dtype ``spec.lora.dtype``; shapes of ``ktgen.LoRAWeights``) and whose
frozen base weights live inside the kernels, quantized per ``spec.quant`` (they are not
parameters, buffers or part of ``state_dict``: ``dequantized(name)`` reads them back).

    layer = KTMoE(spec, gate, up, down)              # gate/up [E,I,H], down [E,H,I]: tensors or arrays
    out = layer(hidden_states, topk_ids, topk_weights)
    loss(out).backward()                             # .grad of hidden_states, topk_weights, LoRA params
    optimizer.step()                                 # in place: the kernels read the parameters' storage

Inputs (any leading dims, flattened to T tokens): ``hidden_states`` [..., H] bf16 (float32 or
another float dtype is cast to bf16 first: autograd casts its gradient back); ``topk_ids``
[..., k] int64 or int32 (other integer dtypes are cast to int64); ``topk_weights`` [..., k]
float32 (bf16 and other float dtypes are cast to float32, gradient cast back); -1 in
``topk_ids`` skips a slot. Output: bf16 [..., H]. Everything is on the CPU.

Autograd
--------
When autograd needs the result (grad mode on and hidden_states, topk_weights or a LoRA
parameter requires grad), the forward runs through a ``torch.autograd.Function`` that calls
``MoE.forward_train`` and keeps the saved forward (one of ``spec.max_cache_depth`` slots) for
its backward, which calls ``MoE.backward``. Otherwise (``torch.no_grad()``,
``torch.inference_mode()``, nothing requiring grad) it calls ``MoE.forward``: no slot is taken.
``eval()`` alone does not turn autograd off, as for any PyTorch module; an eval loop runs under
``torch.no_grad()``. A slot is given back by the backward, or as soon as the graph holding it is
dropped (an output never backpropagated).

Zero-copy: the kernels read the parameters' storage directly (a NumPy view, set once with
``MoE.set_lora``), so an optimizer's in-place step is seen by the next forward with no copy.
If a parameter's storage is replaced (``p.data = ...``, ``load_state_dict(..., assign=True)``)
the next forward notices the new address and re-points the kernels. The gradients the kernels
write are handed to autograd without a copy and land in ``.grad`` the way PyTorch
accumulates them (the first one becomes ``.grad``, later ones are added to it). A parameter
changed in place between a forward and its backward raises, as PyTorch does for its own ops.

Activation checkpointing: with ``torch.utils.checkpoint(..., use_reentrant=False)`` the saved
forward is tied to a tiny saved tensor, so the checkpointed forward gives its slot back at once
and the recomputation in backward takes it again; the reentrant variant runs the first pass
without grad (no slot). A graph can be backpropagated once (``retain_graph=True`` and a second
backward raise: the saved forward is consumed).

Adapters
--------
``save_adapter(model, dir)`` writes every KTMoE of ``model`` as a PEFT LoRA adapter for expert
parameters (``adapter_model.safetensors`` and ``adapter_config.json`` with
``target_parameters``), keyed by the KTMoE's path in ``model`` (so a KTMoE that replaces
``model.layers.0.mlp.experts`` of a transformers model is saved under that path, as PEFT would
save an adapter of that model); ``load_adapter(model, dir)`` reads such a file back (also one
PEFT trained). The layout and the exact conversion are documented in ``ktgen.adapters``.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import adapters, checkpoint as _checkpoint, files as _files, formats as _formats, packed as _packed
from .runtime import LORA_NAMES, LoRAWeights, MoE, SavedForward, bfloat16 as _np_bf16
from .spec import MoESpec, load_spec

logger = logging.getLogger("ktgen.torch")

__all__ = ["ExpertParallelMoE", "KTMoE", "PatchReport", "UnsupportedExpertsError", "expert_range",
           "from_hf_experts", "load_adapter", "patch_model", "save_adapter"]

_LORA_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- zero-copy conversions between CPU tensors and NumPy arrays ----

def _np_view(t: torch.Tensor) -> np.ndarray:
    """NumPy view of a contiguous CPU tensor's storage (bf16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_np_bf16)
    return t.numpy()


def _pointer_view(t: torch.Tensor) -> np.ndarray:
    """A NumPy array over a contiguous CPU tensor's memory, made from its address, so that the
    tensor's storage stays resizable (Tensor.numpy() pins it, and FSDP2 frees and regathers its
    unsharded parameters by resizing their storage). The caller keeps `t` alive and re-points
    whatever reads the array when t.data_ptr() changes (KTMoE._sync_lora)."""
    dtype = _np_bf16 if t.dtype == torch.bfloat16 else np.dtype(str(t.dtype).removeprefix("torch."))
    n = t.numel() * t.element_size()
    return np.frombuffer((ctypes.c_char * n).from_address(t.data_ptr()), dtype).reshape(t.shape)


def _from_np(a: np.ndarray) -> torch.Tensor:
    """Tensor sharing `a`'s memory (ml_dtypes.bfloat16 becomes torch.bfloat16)."""
    if a.dtype == _np_bf16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _base_weight(name: str, w):
    """A base weight as ktgen.MoE takes it: bf16 C-contiguous NumPy (tensors of any float
    dtype and float arrays are rounded to bf16); other objects (pre-quantized,
    docs/design.md#base-weight-formats) as given."""
    if isinstance(w, torch.Tensor):
        if w.device.type != "cpu":
            w = w.cpu()
        w = w.detach()
        if not w.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {w.dtype}")
        return _np_view(w.to(torch.bfloat16).contiguous())
    if isinstance(w, np.ndarray) and w.dtype != _np_bf16:
        return np.ascontiguousarray(w.astype(np.float32).astype(_np_bf16))
    if isinstance(w, np.ndarray):
        return np.ascontiguousarray(w)
    return w


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


# ---- GPU hybrid: activations cross to the CPU experts and back through pinned buffers ----

def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """t copied into page-locked host memory (torch's caching host allocator reuses the blocks,
    and keeps one alive until the asynchronous copies that read it are done)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()   # the kernels read it next
    return host


class _ToHost(torch.autograd.Function):
    """A CUDA tensor on the CPU (pinned); its gradient goes back to the CUDA device."""

    @staticmethod
    def forward(ctx, t):
        ctx.device = t.device
        return _pinned_copy(t)

    @staticmethod
    def backward(ctx, grad):
        return _pinned_copy(grad.contiguous()).to(ctx.device, non_blocking=True)


class _ToDevice(torch.autograd.Function):
    """A CPU tensor on a CUDA device (from a pinned copy); its gradient comes back pinned."""

    @staticmethod
    def forward(ctx, t, device):
        return _pinned_copy(t).to(device, non_blocking=True)

    @staticmethod
    def backward(ctx, grad):
        return _pinned_copy(grad.contiguous()), None


def _is_fsdp(module: nn.Module) -> bool:
    """Whether FSDP2 (fully_shard) manages the module's parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


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
        weights read back from it exactly (bf16, or the packed §6 form for quantized modes); the
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


# ---- adapters on disk ----

def _ktmoe_layers(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every KTMoE and ExpertParallelMoE (not the KTMoE inside one)."""
    layers = []
    inner = {id(m.local) for m in model.modules() if isinstance(m, ExpertParallelMoE)}
    for name, module in model.named_modules():
        if isinstance(module, (KTMoE, ExpertParallelMoE)) and id(module) not in inner:
            path = ".".join(p for p in (prefix, name) if p)
            if not path:
                raise ValueError("prefix: a bare KTMoE needs the experts module's path in the base "
                                 "model, e.g. prefix='model.layers.0.mlp.experts'")
            layers.append((path, module))
    if not layers:
        raise ValueError(f"model: no ktgen.torch.KTMoE inside {type(model).__name__}")
    return layers


def save_adapter(model: nn.Module, save_directory, *, prefix: str = "",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA of every KTMoE in `model` as a PEFT adapter: `adapter_model.safetensors`
    and `adapter_config.json` in `save_directory` (created). Each layer is keyed by its path
    in `model` (prefixed by `prefix`), the path of the experts module it stands for."""
    from safetensors.torch import save_file

    layers = _ktmoe_layers(model, prefix)
    specs = {(m.spec.lora.rank, m.spec.lora.alpha, m.spec.lora.use_rslora) if m.spec.lora else None
             for _, m in layers}
    if None in specs:
        raise ValueError("model: a KTMoE without LoRA (lora: null) has no adapter to save")
    if len(specs) != 1:
        raise ValueError(f"model: the KTMoE layers differ in LoRA rank/alpha/rsLoRA ({sorted(specs)}); "
                         f"one adapter_config.json describes them all")
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers:
        tensors.update(layer.peft_state_dict(path))   # an ExpertParallelMoE gathers on its rank 0
    out = Path(save_directory)
    if any(isinstance(m, ExpertParallelMoE) and m.rank != 0 for _, m in layers):
        return out   # rank 0 writes the whole adapter
    with _files.atomic_path(out / adapters.WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = adapters.peft_config(layers[0][1].spec.lora, [p for p, _ in layers], base_model_name_or_path)
    _files.write_atomic(out / adapters.CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_adapter(model: nn.Module, directory, *, prefix: str = "") -> dict[str, list[str]]:
    """Load a PEFT adapter (as `save_adapter` or PEFT writes it for expert target_parameters)
    into every KTMoE of `model`, in place: every layer's LoRA is read and checked (the config,
    keys, shapes, dtypes, expert counts, scales) before any parameter is written, so that a
    refused adapter leaves the model as it was. Returns {"loaded": layer paths, "unexpected":
    keys of the file that no KTMoE took (e.g. attention adapters)}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / adapters.CONFIG_NAME
    config = adapters.check_config(_files.read_json(config_path, ValueError, "adapter config"), str(config_path))
    weights = _files.file_in(directory, adapters.WEIGHTS_NAME, ValueError, "adapter")
    try:
        state = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights}: not a safetensors file ({err})") from None
    used: set[str] = set()
    loaded = []
    ready = []
    for path, layer in _ktmoe_layers(model, prefix):
        ready.append((layer, layer.peft_lora(state, path, config)))
        used.update(adapters.peft_keys(path).values())
        loaded.append(path)
    for layer, lora in ready:   # every layer checked: now write them all
        layer.load_lora(lora)
    unexpected = sorted(set(state) - used)
    for key in unexpected:  # e.g. attention LoRA: not ktgen's to load, and never dropped silently
        logger.warning("ktgen.torch.load_adapter: %s: ignoring %s (no KTMoE of the model takes it)",
                       directory, key)
    return {"loaded": loaded, "unexpected": unexpected}


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
        self.pack = _checkpoint.PackIndex.read(directory)
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


from .torch_parallel import ExpertParallelMoE, expert_range  # noqa: E402 - it builds on KTMoE

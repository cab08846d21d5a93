"""Zero-copy views between CPU tensors and NumPy arrays, and the GPU hybrid's pinned copies."""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import torch
from torch import nn

from ..runtime import bfloat16 as _np_bf16

logger = logging.getLogger("ktgen.torch")

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



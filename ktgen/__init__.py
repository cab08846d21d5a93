"""ktgen: a kernel compiler for LoRA fine-tuning of Mixture-of-Experts layers on CPUs."""

from . import quant, reference
from ._version import __version__
from .checkpoint import CheckpointError
from .compiler import CacheError, CompilerError, Kernel, compile
from .isa import ISAError
from .runtime import CacheFullError, Grads, KernelError, LoRAWeights, MoE, MoEClosedError, SavedForward
from .packed import PackedFileError
from .quant import QuantizedWeights
from .spec import LORA_NAMES, LoRASpec, MoESpec, QuantSpec, SpecError, bundled_spec_names, load_spec
from .target import Target

__all__ = [
    "CacheError", "CacheFullError", "CheckpointError", "CompilerError", "Grads", "ISAError", "Kernel", "KernelError",
    "LORA_NAMES", "LoRASpec", "LoRAWeights", "MoE", "MoEClosedError", "MoESpec", "PackedFileError", "QuantSpec", "QuantizedWeights", "SavedForward",
    "SpecError", "Target", "__version__", "bundled_spec_names", "compile", "load_spec", "quant", "reference",
]

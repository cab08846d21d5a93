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

from .adapter_files import load_adapter, save_adapter
from .hf import PatchReport, UnsupportedExpertsError, from_hf_experts, patch_model
from .module import KTMoE
from .parallel import ExpertParallelMoE, expert_range

__all__ = ["ExpertParallelMoE", "KTMoE", "PatchReport", "UnsupportedExpertsError", "expert_range",
           "from_hf_experts", "load_adapter", "patch_model", "save_adapter"]

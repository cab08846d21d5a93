"""PEFT adapters on disk: save_adapter and load_adapter of every KTMoE of a model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .. import adapters, files as _files
from .module import KTMoE
from .parallel import ExpertParallelMoE

logger = logging.getLogger("ktgen.torch")

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



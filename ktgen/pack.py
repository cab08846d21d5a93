"""Pack directories (`ktgen pack`): every MoE experts layer of a checkpoint packed by the kernels
into OUT_DIR/<prefix>.safetensors, indexed by OUT_DIR/ktgen-pack.json (docs/design.md, "Packed
weight files"), and the index read back with every entry checked (PackIndex). The reading of
checkpoints is ktgen.checkpoint's; the packed files are ktgen.packed's."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import files
from .checkpoint import TOP_K_KEYS, Checkpoint, CheckpointError, _layer_number, config_value, trim_heap
from .formats import FORMATS
from .packed import PackedFile
from .runtime import MoE
from .spec import MoESpec

PACK_INDEX = "ktgen-pack.json"
PACK_FORMAT, PACK_VERSION = "ktgen-pack", "2"
# A layer prefix names its packed file: no path separators, no leading dot.
_FILE_PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def pack(checkpoint_dir, out_dir, *, quant: str | None = None, group_size: int | None = None,
         isa: str | None = None, tp_count: int = 1, progress: bool = True) -> dict:
    """`ktgen pack`: every MoE experts layer of a checkpoint directory, one at a time, packed by
    the kernels of `isa` (default: this machine's auto tier) into OUT_DIR/<prefix>.safetensors,
    with OUT_DIR/ktgen-pack.json indexing them. quant: the checkpoint's own format by default
    (bf16 for float weights), or int8/awq/k2 to quantize float ones. The index and each file
    record the checkpoint's identity (Checkpoint.identity) and each file its layer, which
    PackIndex checks at load. Returns the index."""
    ck = Checkpoint(checkpoint_dir)
    if not ck.layers:
        raise CheckpointError(f"checkpoint: no MoE experts in {ck.directory} (tensors named "
                              f"<prefix>.experts.<e>.gate_proj.weight and the like)")
    bad = [prefix for prefix in ck.layers if not _FILE_PREFIX.fullmatch(prefix)]
    if bad:
        raise CheckpointError(f"checkpoint: layer prefix {bad[0]!r} cannot name a packed file (letters, "
                              f"digits, '_', '.' and '-' only)")
    k = config_value(ck.config, TOP_K_KEYS)
    if not isinstance(k, int):
        raise CheckpointError(f"checkpoint: {ck.directory}/config.json names no top-k "
                              f"({', '.join(TOP_K_KEYS)})")
    limit = config_value(ck.config, ("swiglu_limit",))
    model_type = str(ck.config.get("model_type") or "hf")
    name = "hf_" + re.sub(r"[^a-z0-9_]", "_", model_type.lower())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": PACK_FORMAT, "version": PACK_VERSION, "checkpoint": str(ck.directory.resolve()),
             "checkpoint_id": ck.identity, "layers": {}}
    prefixes = sorted(ck.layers, key=_layer_number)
    try:
        from tqdm.auto import tqdm
        it = tqdm(prefixes, desc="ktgen pack", unit="layer", disable=not progress)
    except ImportError:  # tqdm comes with ktgen[torch]; without it, no bar
        it = prefixes
    for prefix in it:
        keys = ck.layers[prefix]
        mode = quant or ck.layer_format(keys)
        weights = ck.load_layer(keys, mode, group_size=group_size)
        E, I, H = weights[0].shape
        q = {"mode": mode}
        if FORMATS[mode].grouped:
            q["group_size"] = getattr(weights[0], "group_size", None) or group_size
        spec = MoESpec(name=name, expert_num=E, num_experts_per_tok=k, hidden_size=H,
                       intermediate_size=I, quant=q, tp_count=tp_count,
                       swiglu_limit=float(limit) if limit else None)
        moe = MoE(spec, *weights, isa=isa)
        del weights
        file = f"{prefix}.safetensors"
        moe.save_packed(out / file, metadata={"layer": prefix, "checkpoint_id": ck.identity})
        index["layers"][prefix] = {"file": file, "layout": moe.packed_layout, "tier": moe.kernel.isa,
                                   "base_weights": moe.memory()["base_weights"]}
        moe.close()
        del moe
        trim_heap()
    files.write_atomic(out / PACK_INDEX, json.dumps(index, indent=1) + "\n")
    return index


@dataclass
class PackIndex:
    """A `ktgen pack` directory's ktgen-pack.json, checked: its fields and their types, each
    layer's file a regular file inside the directory, and (layer_file) that file's own record
    of its layer and checkpoint."""
    path: Path
    checkpoint: str        # the checkpoint directory it was packed from
    checkpoint_id: str     # that checkpoint's Checkpoint.identity
    layers: dict[str, dict]

    @classmethod
    def read(cls, directory) -> "PackIndex | None":
        """The index of a pack directory; None when the directory has none."""
        path = Path(directory) / PACK_INDEX
        if not os.path.lexists(path):
            return None
        index = files.read_json(path, CheckpointError, "pack index")

        def bad(what: str):
            return CheckpointError(f"checkpoint: {path}: {what}")

        if not isinstance(index, dict):
            raise bad(f"expected a JSON object, got {type(index).__name__}")
        if index.get("format") != PACK_FORMAT:
            raise bad(f"format {index.get('format')!r:.40}: not a ktgen pack index")
        if index.get("version") != PACK_VERSION:
            raise bad(f"version {index.get('version')!r:.40}: this ktgen reads version {PACK_VERSION} (indexes "
                      f"that record their checkpoint's identity); run `ktgen pack` again")
        for key in ("checkpoint", "checkpoint_id"):
            if not isinstance(index.get(key), str):
                raise bad(f"{key}: expected a string, got {index.get(key)!r:.60}")
        layers = index.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise bad(f"layers: expected a JSON object of layer prefix -> entry, got {layers!r:.60}")
        for prefix, entry in layers.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise bad(f"layers.{prefix}: expected an object with a file name, got {entry!r:.80}")
        return cls(path, index["checkpoint"], index["checkpoint_id"], layers)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def layer_file(self, prefix: str):
        """The packed file of a layer (a ktgen.packed.PackedFile), once its file is a regular file
        inside the directory whose metadata names this layer and this index's checkpoint."""
        path = files.file_in(self.directory, self.layers[prefix]["file"], CheckpointError,
                             f"checkpoint: {self.path.name}: layers.{prefix}.file")
        f = PackedFile(path)
        layer, ident = f.metadata.get("layer"), f.metadata.get("checkpoint_id")
        if layer != prefix or ident != self.checkpoint_id:
            f.close()
            raise CheckpointError(
                f"checkpoint: {path} holds layer {layer!r} of checkpoint {str(ident)[:16]!r}, but "
                f"{self.path} names it for layer {prefix!r} of checkpoint {self.checkpoint_id[:16]!r}")
        return f

    def source(self) -> Checkpoint | None:
        """The checkpoint the pack was made from, when its directory is still there; one whose
        identity is not the recorded one is refused, naming both."""
        origin = Path(self.checkpoint)
        if not (origin / "config.json").exists():
            return None
        ck = Checkpoint(origin)
        if ck.identity != self.checkpoint_id:
            raise CheckpointError(
                f"checkpoint: {self.path} was packed from checkpoint {self.checkpoint_id[:16]} at {origin}, but "
                f"{origin} now holds checkpoint {ck.identity[:16]} (another checkpoint, or one changed since "
                f"it was packed): pack it again")
        return ck

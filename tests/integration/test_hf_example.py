"""examples/finetune_hf.py runs end to end: Trainer lowers the loss, and the
adapter reloaded with plain PEFT computes and generates what the patched model does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_hf.py"


def test_finetune_hf_example(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_hf", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quiet", "--steps", "40", "--out", str(tmp_path)])
    losses = result["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert result["report"].layers == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert result["logits_rel_l2"] <= 2e-2
    assert result["generated"] == result["generated_peft"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

"""Experts from disk: patch_model(checkpoint=) builds each layer from a Hugging
Face checkpoint's safetensors (float, AutoAWQ or compressed-tensors experts) or from `ktgen pack`
files, into a model built empty; the peak RSS of a load stays within packed + one layer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import ktgen  # noqa: E402
from ktgen import checkpoint, pack, quant  # noqa: E402
from ktgen.cli import main as cli  # noqa: E402
from ktgen.torch import KTMoE, patch_model  # noqa: E402

from helpers import pack_autoawq, pack_compressed_tensors  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "load_rss.py"


def tiny(kind):
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, max_position_embeddings=64)
    if kind == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, intermediate_size=64, **common), \
            transformers.MixtralForCausalLM
    return transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=64, intermediate_size=64,
                                       norm_topk_prob=True, **common), transformers.Qwen3MoeForCausalLM


def saved_model(kind, directory, seed=0):
    transformers.logging.set_verbosity_error()
    cfg, cls = tiny(kind)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape) * 0.1).bfloat16().float())
    model.save_pretrained(str(directory))
    return model, cfg, cls


def empty(cfg, cls):
    with accelerate.init_empty_weights():
        return cls(cfg)


def same_lora(dst, src):
    """Give dst's experts src's LoRA (nonzero B, so that the LoRA term counts)."""
    g = torch.Generator().manual_seed(3)
    for a, b in zip([m for m in src.modules() if isinstance(m, KTMoE)],
                    [m for m in dst.modules() if isinstance(m, KTMoE)]):
        with torch.no_grad():
            for name in ktgen.LORA_NAMES:
                getattr(a, name).copy_(torch.randn(getattr(a, name).shape, generator=g) * 0.05)
                getattr(b, name).copy_(getattr(a, name))


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_empty_model_patched_from_checkpoint_and_from_packed_files(tmp_path, kind):
    model, cfg, cls = saved_model(kind, tmp_path / "ckpt")
    patch_model(model, progress=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    assert cli(["pack", str(tmp_path / "ckpt"), str(tmp_path / "packed"), "--quiet"]) == 0
    index = json.loads((tmp_path / "packed" / pack.PACK_INDEX).read_text())
    assert len(index["layers"]) == 2
    for source, mapped in ((tmp_path / "ckpt", False), (tmp_path / "packed", True)):
        other = empty(cfg, cls)
        report = patch_model(other, checkpoint=source, progress=False)
        assert len(report.layers) == 2 and report.trainable_parameters == report.lora_parameters
        assert not any(t.device.type == "meta" for t in other.state_dict().values())
        layers = [m for m in other.modules() if isinstance(m, KTMoE)]
        assert all(m.moe.mapped == mapped for m in layers)
        same_lora(other, model)
        with torch.no_grad():
            want, got = model(ids).logits, other(ids).logits
        assert torch.equal(want, got), source   # the same weights, the same kernels: bitwise
        for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
            assert torch.equal(a, b), name


def quantized_checkpoint(directory, fmt, G=32):
    """A tiny Qwen3-MoE checkpoint whose experts are AutoAWQ GEMM or compressed-tensors int4
    tensors (as the Hub's quantized releases store them); returns the model config and class,
    and the weights in their base formats (docs/design.md#base-weight-formats) each layer should come back as."""
    from safetensors.torch import save_file
    model, cfg, cls = saved_model("qwen3_moe", directory)
    state = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    rng = np.random.default_rng(0)
    expect = {}
    for layer in range(cfg.num_hidden_layers):
        parts = {}
        for proj, (rows, K) in (("gate_proj", (64, 64)), ("up_proj", (64, 64)), ("down_proj", (64, 64))):
            per_expert = []
            for e in range(cfg.num_experts):
                key = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                if fmt == "awq":
                    u = rng.integers(0, 16, (rows, K))
                    z = rng.integers(0, 16, (rows, K // G))
                    s = (rng.random((rows, K // G)) * 0.05 + 1e-3).astype(np.float16)
                    qweight, qzeros = pack_autoawq(u.T, z.T)
                    state[key + ".qweight"] = torch.from_numpy(qweight)
                    state[key + ".qzeros"] = torch.from_numpy(qzeros)
                    state[key + ".scales"] = torch.from_numpy(np.ascontiguousarray(s.T))
                    per_expert.append(quant.from_autoawq(qweight, qzeros, np.ascontiguousarray(s.T), G))
                else:
                    q = rng.integers(-8, 8, (rows, K))
                    s = torch.rand(rows, K // G, generator=torch.Generator().manual_seed(e)).bfloat16() * 0.05
                    state[key + ".weight_packed"] = torch.from_numpy(pack_compressed_tensors(q))
                    state[key + ".weight_scale"] = s
                    state[key + ".weight_shape"] = torch.tensor([rows, K])
                    per_expert.append(quant.from_compressed_tensors(
                        pack_compressed_tensors(q), s.view(torch.int16).numpy().view(quant.bfloat16), (rows, K)))
            parts[proj] = quant.stack(per_expert)
        expect[layer] = parts
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return cfg, cls, expect


@pytest.mark.parametrize("fmt, mode", [("awq", "awq"), ("k2", "k2")])
def test_quantized_checkpoint_experts_are_taken_as_they_are(tmp_path, fmt, mode):
    cfg, cls, expect = quantized_checkpoint(tmp_path, fmt)
    model = empty(cfg, cls)
    report = patch_model(model, checkpoint=tmp_path, progress=False)
    assert {s.quant.mode for s in report.specs} == {mode}
    assert {s.quant.group_size for s in report.specs} == {32}
    for layer in range(cfg.num_hidden_layers):
        moe = model.model.layers[layer].mlp.experts.moe
        for name, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            assert np.array_equal(moe.dequantized(name), quant.dequantize(expect[layer][proj])), (layer, name)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()
    with pytest.raises(checkpoint.CheckpointError, match=rf"quant: .* are {mode} int4.*not 'int8'"):
        patch_model(empty(cfg, cls), checkpoint=tmp_path, quant="int8", progress=False)


def test_float_checkpoint_quantized_at_load(tmp_path):
    model, cfg, cls = saved_model("qwen3_moe", tmp_path)
    other = empty(cfg, cls)
    patch_model(other, checkpoint=tmp_path, quant="int8", progress=False)
    patch_model(model, quant="int8", progress=False)
    for a, b in zip([m for m in model.modules() if isinstance(m, KTMoE)],
                    [m for m in other.modules() if isinstance(m, KTMoE)]):
        for name in ("gate", "up", "down"):
            assert np.array_equal(a.moe.dequantized(name), b.moe.dequantized(name))


def test_checkpoint_problems_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    model, cfg, cls = saved_model("qwen3_moe", tmp_path / "ckpt")
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.experts.2.up_proj.weight"},
              str(broken / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"model.layers.1.mlp.experts.2 has no up projection"):
        patch_model(empty(cfg, cls), checkpoint=broken, progress=False)
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has no tensor for model.norm.weight"):
        patch_model(empty(cfg, cls), checkpoint=broken, progress=False)
    save_file({k: v for k, v in state.items() if "layers.1.mlp.experts" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"no experts for model.layers.1.mlp.experts"):
        patch_model(empty(cfg, cls), checkpoint=broken, progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="is not a directory"):
        patch_model(empty(cfg, cls), checkpoint=tmp_path / "nowhere", progress=False)
    assert cli(["pack", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--quiet"]) == 2
    assert cli(["pack", str(tmp_path / "ckpt"), str(tmp_path / "packed"), "--quiet"]) == 0
    index = json.loads((tmp_path / "packed" / pack.PACK_INDEX).read_text())
    # the index and every file record what they were made from; patch_model checks them
    assert index["checkpoint_id"] == checkpoint.Checkpoint(tmp_path / "ckpt").identity
    for prefix, entry in index["layers"].items():
        meta = ktgen.packed.PackedFile(tmp_path / "packed" / entry["file"]).metadata
        assert (meta["layer"], meta["checkpoint_id"]) == (prefix, index["checkpoint_id"])
    swapped = json.loads(json.dumps(index))
    (a, ea), (b, eb) = swapped["layers"].items()
    ea["file"], eb["file"] = eb["file"], ea["file"]
    (tmp_path / "packed" / pack.PACK_INDEX).write_text(json.dumps(swapped))
    with pytest.raises(checkpoint.CheckpointError, match=rf"holds layer '{b}' .* names it for layer '{a}'"):
        patch_model(empty(cfg, cls), checkpoint=tmp_path / "packed", progress=False)
    # packed files whose checkpoint is gone: the empty model's other tensors are named
    index["checkpoint"] = str(tmp_path / "gone")
    (tmp_path / "packed" / pack.PACK_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"tensors \(model.embed_tokens.weight, .* names no checkpoint"):
        patch_model(empty(cfg, cls), checkpoint=tmp_path / "packed", progress=False)


def test_loading_holds_the_packed_experts_and_one_layer(tmp_path):
    """benchmarks/load_rss.py, small: each load in a fresh process; the peak RSS growth of the
    load from the checkpoint exceeds that of the mapped packed files (the fixed cost: the kernel
    library, torch's first operations) by at most the packed experts and one layer in bf16."""
    spec = importlib.util.spec_from_file_location("load_rss", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(["--layers", "2", "--experts", "8", "--hidden", "512", "--inter", "256"])
    ck, pk = r["checkpoint"], r["packed"]
    assert not ck["mapped"] and pk["mapped"]
    assert ck["packed_bytes"] == pk["packed_bytes"] == 2 * r["layer_bf16_bytes"]
    fixed = pk["peak_rss_growth_bytes"]
    assert ck["peak_rss_growth_bytes"] - fixed <= ck["packed_bytes"] + 1.15 * r["layer_bf16_bytes"]
    assert fixed < 0.5 * pk["packed_bytes"] + (16 << 20)   # mapped pages are not read at load

"""Peak memory of loading a MoE model's experts from disk with ktgen.torch.patch_model.

    python benchmarks/load_rss.py [--layers 4] [--experts 16] [--hidden 512] [--inter 256] [--json PATH]

Writes a bf16 Qwen3-MoE checkpoint of that shape (random weights) to a temporary directory,
builds the model empty (accelerate.init_empty_weights), and patches it (without LoRA, whose
parameters are not the experts' weights) with patch_model(model, checkpoint=DIR), then with
checkpoint=<`ktgen pack` output>. For each, it
reports the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs just
before, in a fresh process each) next to the packed size of all layers and the bf16 size of
one layer: the bound ktgen keeps is packed + one layer. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
    return _status("VmRSS")


def _config(args):
    import transformers
    return transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=args.experts, num_experts_per_tok=2,
        moe_intermediate_size=args.inter, intermediate_size=args.inter, max_position_embeddings=64,
        dtype="bfloat16")


def _child(args) -> None:
    """One load in a fresh process: its peak RSS growth, as JSON on stdout."""
    import accelerate
    import transformers

    from ktgen.torch import KTMoE, patch_model

    transformers.logging.set_verbosity_error()
    with accelerate.init_empty_weights():
        model = transformers.Qwen3MoeForCausalLM(_config(args))
    gc.collect()
    before = _reset_peak()
    patch_model(model, checkpoint=args.child, progress=False, lora=False)
    peak = _status("VmHWM") - before
    layers = [m for m in model.modules() if isinstance(m, KTMoE)]
    print(json.dumps({"peak_rss_growth_bytes": peak, "rss_growth_bytes": _status("VmRSS") - before,
                      "packed_bytes": sum(m.moe.memory()["base_weights"] for m in layers),
                      "mapped": all(m.moe.mapped for m in layers)}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    import torch
    import transformers

    from ktgen.pack import pack

    transformers.logging.set_verbosity_error()
    layer_bf16 = 3 * args.experts * args.hidden * args.inter * 2
    result = {"layers": args.layers, "layer_bf16_bytes": layer_bf16}
    shape = ["--layers", str(args.layers), "--experts", str(args.experts), "--hidden", str(args.hidden),
             "--inter", str(args.inter)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint"
        torch.manual_seed(0)
        model = transformers.Qwen3MoeForCausalLM(_config(args)).to(torch.bfloat16)
        model.save_pretrained(str(ckpt))
        del model
        packed_dir = Path(tmp) / "packed"
        pack(ckpt, packed_dir, progress=False)
        # `pack` compiled the kernel the children use (the same spec: no LoRA, default max_len)
        for name, source in (("checkpoint", ckpt), ("packed", packed_dir)):
            run = subprocess.run([sys.executable, __file__, "--child", str(source)] + shape,
                                 capture_output=True, text=True, check=True)
            result[name] = json.loads(run.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    print(f"{args.layers} layers of {args.experts} experts, H={args.hidden}, I={args.inter}: "
          f"one layer is {layer_bf16 / mib:.1f} MiB in bf16")
    for name in ("checkpoint", "packed"):
        r = result[name]
        print(f"  patch_model(checkpoint={name} dir): peak RSS grew {r['peak_rss_growth_bytes'] / mib:.1f} MiB "
              f"(then {r['rss_growth_bytes'] / mib:.1f}); packed experts {r['packed_bytes'] / mib:.1f} MiB "
              f"(mapped: {r['mapped']}); packed + one layer = {(r['packed_bytes'] + layer_bf16) / mib:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

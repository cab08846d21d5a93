"""Data-parallel LoRA fine-tuning of a Hugging Face MoE model's experts, one process per rank.

    torchrun --nproc_per_node 2 examples/train_ddp.py [--steps 30] [--out DIR]

1. Rank 0 builds a tiny Qwen3-MoE checkpoint (a stand-in for a real one) and packs its experts
   with `ktgen pack` for this machine's tier; the other ranks wait for it.
2. Every rank builds the model empty and patches it from the packed directory: the experts are
   mapped read-only from the packed files, so the ranks of this host share one copy of them
   (ktgen's kernels take usable cores / LOCAL_WORLD_SIZE threads each).
3. DistributedDataParallel (gloo, CPU) averages the experts' LoRA gradients; each rank trains
   on its own share of the batches; rank 0 saves the adapter in PEFT's format.

`main()` returns rank 0's figures (None elsewhere).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

VOCAB, STEP, SEQ = 64, 5, 24


def batches(rank: int, world: int, steps: int, batch: int = 8):
    """This rank's batches of sequences counting up by STEP modulo VOCAB (distinct per rank)."""
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        yield (start + STEP * torch.arange(SEQ)) % VOCAB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="shared working directory (default: a temporary one)")
    args = ap.parse_args(argv)

    import accelerate
    import transformers

    from ktgen.pack import pack
    from ktgen.torch import KTMoE, patch_model, save_adapter

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    say = print if rank == 0 else (lambda *a: None)

    tmp = None
    if args.out is None:   # one directory for every rank: rank 0 makes it, then tells the others
        name = [tempfile.mkdtemp(prefix="ktgen-ddp-") if rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        out = Path(name[0])
        tmp = out
    else:
        out = args.out
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=64,
        max_position_embeddings=64, norm_topk_prob=True)
    if rank == 0:
        torch.manual_seed(0)
        base = transformers.Qwen3MoeForCausalLM(cfg)
        with torch.no_grad():
            for p in base.parameters():
                p.copy_((torch.randn(p.shape) * 0.1).bfloat16().float())
        base.save_pretrained(str(out / "base"))
        index = pack(out / "base", out / "packed", progress=False)
        say(f"packed {len(index['layers'])} expert layers into {out / 'packed'}")
    dist.barrier()

    with accelerate.init_empty_weights():
        model = transformers.Qwen3MoeForCausalLM(cfg)
    torch.manual_seed(0)   # the same LoRA initialisation on every rank (DDP checks it from rank 0 anyway)
    report = patch_model(model, checkpoint=out / "packed", max_len=8 * SEQ, progress=False)
    say(report)
    layers = [m for m in model.modules() if isinstance(m, KTMoE)]
    say(f"rank 0: experts mapped from the packed files: {all(m.moe.mapped for m in layers)}; "
        f"kernel threads per rank: {layers[0].moe.threads}")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for step, ids in enumerate(batches(rank, world, args.steps)):
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if step % 10 == 0 or step == args.steps - 1:
            say(f"step {step:3d}: loss {losses[-1]:.3f} (mean over {world} ranks)")
    if rank == 0:
        save_adapter(model, out / "adapter", base_model_name_or_path=str(out / "base"))
        say(f"adapter saved to {out / 'adapter'}")
    dist.barrier()
    dist.destroy_process_group()
    if tmp is not None and rank == 0:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return {"losses": losses, "mapped": all(m.moe.mapped for m in layers)} if rank == 0 else None


if __name__ == "__main__":
    main()

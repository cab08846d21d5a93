"""One rank of a distributed test (tests/integration/test_distributed.py runs it in N processes):

    python tests/dist_worker.py SCENARIO RANK WORLD PORT OUT_DIR

Scenarios: ddp, fsdp (KTMoE under DistributedDataParallel / fully_shard, a share of the batch
each), ep (ExpertParallelMoE) and ep_packed (the same, each rank mapping its experts from
OUT_DIR/layer.safetensors). Each rank saves what it computed to OUT_DIR/rank<R>.pt; the
test compares with one process over the whole batch (dist_case gives both sides the same
layer and data)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import ktgen
from ktgen.torch import ExpertParallelMoE, KTMoE, save_adapter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_case import SPEC, batch, layer_tensors, shares  # noqa: E402


def main(scenario: str, rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gate, up, down, lora = layer_tensors()
    case = "ep" if scenario.startswith("ep") else scenario
    x, ids, w, g = batch(case, world)
    sl = shares(case, world)[rank]
    x, ids, w, g = x[sl].clone().requires_grad_(True), ids[sl], w[sl].clone().requires_grad_(True), g[sl]
    result = {}
    if scenario == "ep":
        layer = ExpertParallelMoE(SPEC, gate, up, down, lora)
        inner = layer.local
    elif scenario == "ep_packed":   # this rank's experts mapped from the whole layer's file
        layer = ExpertParallelMoE.from_packed(os.path.join(out, "layer.safetensors"), SPEC, lora)
        inner = layer.local
        result["mapped"] = inner.moe.mapped
    else:
        layer = inner = KTMoE(SPEC.replace(threads=1), gate, up, down, lora)
        if scenario == "ddp":
            layer = torch.nn.parallel.DistributedDataParallel(layer)
        else:
            from torch.distributed.fsdp import fully_shard
            layer = fully_shard(layer)
    if scenario == "ep":   # a bad input on one rank is refused on every rank, no rank left waiting
        bad = ids.clone()
        if rank == 0:
            bad.view(-1)[:1] = SPEC.expert_num
        try:
            layer(x, bad, w)
        except ValueError as err:
            result["refused"] = str(err)
    out_t = layer(x, ids, w)
    # DDP and FSDP average the ranks' gradients: the loss of each rank is its share of the sum.
    loss = (out_t.float() * g).sum() * (1 if scenario.startswith("ep") else world)
    loss.backward()
    grads = {}
    for n in ktgen.LORA_NAMES:
        grad = getattr(inner, n).grad
        grads[n] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    result.update(out=out_t.detach(), x_grad=x.grad, w_grad=w.grad, lora_grads=grads)
    if scenario.startswith("ep"):
        result["experts"] = (layer.experts.start, layer.experts.stop)
        save_adapter(torch.nn.ModuleDict({"experts": layer}), os.path.join(out, "adapter"), prefix="model.mlp")
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()   # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    # The result is saved. Under FSDP2 the interpreter's teardown after this point sometimes
    # aborts ("terminate called without an active exception", then SIGSEGV; 1 run in 6 to 10,
    # already at 83a6d92), so the worker leaves without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

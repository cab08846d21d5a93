"""The layer and the data of tests/integration/test_distributed.py, shared by the test and its worker ranks
(tests/dist_worker.py): the same seeds give both sides the same tensors."""

from __future__ import annotations

import torch

import ktgen

E, H, I, K = 6, 64, 64, 2
SPEC = ktgen.MoESpec(name="dist_layer", expert_num=E, num_experts_per_tok=K, hidden_size=H,
                     intermediate_size=I, max_len=32, lora={"rank": 4}, threads=1)
T = 24


def layer_tensors():
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(s, generator=g) * 0.3 for s in ((E, I, H), (E, I, H), (E, H, I)))
    shapes = ktgen.LoRAWeights.shapes(SPEC)
    lora = {n: torch.randn(shapes[n], generator=g) * 0.1 for n in ktgen.LORA_NAMES}
    return gate, up, down, lora


def batch(scenario: str, world: int):
    """x, topk_ids, topk_weights and the output gradient of the whole batch. For expert
    parallelism on 3 ranks, rank 0's tokens use only its own experts (it sends nothing away),
    no token uses rank 1's experts (it receives nothing) and rank 2 has no tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.randint(0, E, (T, K), generator=g)
    ids[torch.rand(T, K, generator=g) < 0.1] = -1
    if scenario == "ep" and world == 3:
        ids[:8] = torch.tensor([0, 1])        # rank 0 holds experts 0, 1
        ids[8:] = torch.randint(4, 6, (T - 8, K), generator=g)   # rank 2's experts 4, 5 only
    w = torch.rand(T, K, generator=g)
    grad = torch.randn(T, H, generator=g)
    return x, ids, w, grad


def shares(scenario: str, world: int) -> list[slice]:
    """Each rank's tokens: equal shares, except rank 2 of 3 with none under expert parallelism."""
    if scenario == "ep" and world == 3:
        return [slice(0, 8), slice(8, T), slice(T, T)]
    n = T // world
    return [slice(r * n, (r + 1) * n) for r in range(world)]

"""Train a small MoE model whose expert layers run on ktgen's kernels, with AdamW in PyTorch.

The model: a token embedding, two MoE blocks (RMSNorm, a softmax top-k router, a
ktgen.torch.KTMoE expert layer with frozen random base weights and trainable LoRA adapters,
a residual connection), a final norm and a linear head. The synthetic task: predict a fixed
random relabelling of each input token (label = perm[token]). Everything but the experts'
base weights is trained, the LoRA matrices included: they are ordinary nn.Parameters, the
optimizer updates them in place and the kernels read them from there.

    pip install -e '.[torch]'
    python examples/train_lora.py [--steps 300] [--tokens 256]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import ktgen
from ktgen.torch import KTMoE

try:
    from tqdm import tqdm
except ImportError:  # tqdm comes with ktgen[torch]; run without a bar otherwise
    tqdm = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class MoEBlock(nn.Module):
    """x + experts(norm(x)), the experts routed by a softmax top-k router (Qwen3-MoE style)."""

    def __init__(self, spec: ktgen.MoESpec, generator: torch.Generator, std: float = 0.05):
        super().__init__()
        E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
        self.top_k = spec.num_experts_per_tok
        self.norm = RMSNorm(H)
        self.router = nn.Linear(H, E, bias=False)
        base = [torch.randn(s, generator=generator) * std for s in ((E, I, H), (E, I, H), (E, H, I))]
        self.experts = KTMoE(spec, *base, generator=generator)  # base weights frozen inside

    def forward(self, x):
        h = self.norm(x)
        probs = torch.softmax(self.router(h), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)   # gradients reach the router through these
        return x + self.experts(h, ids, weights).float()    # KTMoE takes float32, returns bf16


class TinyMoEModel(nn.Module):
    def __init__(self, spec: ktgen.MoESpec, vocab: int, layers: int, generator: torch.Generator):
        super().__init__()
        self.embed = nn.Embedding(vocab, spec.hidden_size)
        self.blocks = nn.ModuleList(MoEBlock(spec, generator) for _ in range(layers))
        self.norm = RMSNorm(spec.hidden_size)
        self.head = nn.Linear(spec.hidden_size, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step")
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    spec = ktgen.MoESpec(name="train_lora_demo", expert_num=8, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=128, max_len=args.tokens,
                         lora={"rank": 8, "alpha": 16.0, "dtype": "float32"},
                         threads=1)  # a layer this small gains nothing from more threads
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = TinyMoEModel(spec, args.vocab, args.layers, gen)
    perm = torch.randperm(args.vocab, generator=gen)
    lora = [p for n, p in model.named_parameters() if ".experts." in n]
    other = [p for n, p in model.named_parameters() if ".experts." not in n]
    optimizer = torch.optim.AdamW([{"params": lora, "weight_decay": 0.0},
                                   {"params": other, "weight_decay": 0.01}], lr=args.lr)
    n_lora = sum(p.numel() for p in lora)
    print(f"{spec.expert_num} experts x {args.layers} layers on ktgen ({ktgen.compile(spec).isa}); "
          f"trainable: {n_lora} LoRA + {sum(p.numel() for p in other)} dense parameters; "
          f"chance loss {math.log(args.vocab):.3f}", flush=True)

    losses: list[float] = []
    steps = range(1, args.steps + 1)
    bar = tqdm(steps, desc="train", unit="step", disable=args.quiet) if tqdm is not None else steps
    for step in bar:
        tokens = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits, perm[tokens])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # in place: the next forward's kernels see the new LoRA values
        losses.append(loss.item())
        if tqdm is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step == 1 or step % 50 == 0 or step == args.steps:
            msg = f"step {step:4d}  loss {losses[-1]:.4f}"
            (tqdm.write(msg) if tqdm is not None else print(msg, flush=True))
    return losses


if __name__ == "__main__":
    main()

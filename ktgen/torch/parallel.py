"""Expert parallelism over torch.distributed (docs/design.md#several-processes-and-hosts).

Rank r of a group holds the contiguous experts ``expert_range(E, world_size, r)`` and only their
weights, as a KTMoE of its own (the LoRA parameters of those experts included). A forward takes
each rank's own tokens with global expert ids:

1. every (token, slot) entry is sent, as its bf16 row and its expert's local id, to the rank
   that owns the expert (entry counts first, then ``all_to_all_single``);
2. each rank runs its experts on what it received (one expert per entry, weight 1);
3. the outputs go back the same way, and each rank sums them over its tokens' slots with the
   routing weights, in float32, then rounds to bf16 once.

Autograd runs it backwards: the gradients of the outputs go to the owners, the input gradients
come back; the routing weights' gradients are taken where the weights are, the LoRA gradients
stay with the owner. Collectives are those of torch.distributed, on the group's gloo backend
(a gloo group is made when the default group is NCCL): the activations are CPU tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from .. import adapters
from ..runtime import LORA_NAMES, LoRAWeights
from ..spec import MoESpec, load_spec
from .interop import _from_np, _np_view
from .module import KTMoE, _PackedFile

__all__ = ["ExpertParallelMoE", "expert_range"]


def expert_range(expert_num: int, world_size: int, rank: int) -> range:
    """The experts rank `rank` of `world_size` holds: contiguous, sizes differing by one at most
    (the first expert_num % world_size ranks hold one more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
    base, extra = divmod(expert_num, world_size)
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (rank < extra))


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: rows split by `send` counts out, by `recv` counts in;
    the backward sends the gradients back the other way."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def _cpu_group(group):
    """`group`, or a gloo group over the same ranks when its backend is not gloo."""
    if dist.get_backend(group) == "gloo":
        return group
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    return dist.new_group(ranks=ranks, backend="gloo")


def _local(w, rng: range, E: int, name: str):
    """The slice of a projection (or LoRA matrix) for the local experts: given whole ([E, ...])
    or already local ([len(rng), ...])."""
    n = len(rng)
    lead = w.shape[0]
    if lead == n:
        return w
    if lead == E:
        return w.expert_slice(rng.start, rng.stop) if hasattr(w, "expert_slice") else w[rng.start:rng.stop]
    raise ValueError(f"{name}: expected {n} local experts (of {E}) or all {E}, got a leading dim of {lead}")


class ExpertParallelMoE(nn.Module):
    """A MoE expert layer split by experts over the ranks of a torch.distributed group.

    spec: the whole layer's (expert_num = all experts). gate, up, down (and the six LoRA
    matrices in `lora`): this rank's experts only ([E_local, ...], see expert_range), or the
    whole tensors, sliced here; or from_packed(file). forward(hidden_states, topk_ids,
    topk_weights) takes this rank's tokens with global expert ids, as KTMoE does, and every rank
    of the group must call it (and its backward) together, with any number of tokens, zero
    included. max_entries: the most (token, slot) entries this rank's experts take in one
    forward (default spec.max_len x k x world size: every entry of every rank; the saved
    forwards are sized by it); more raise naming hidden_states.
    """

    def __init__(self, spec, gate, up, down, lora=None, *, group=None, max_entries: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE: torch.distributed is not initialized "
                               "(torch.distributed.init_process_group first)")
        if isinstance(spec, str):
            spec = load_spec(spec)
        if not isinstance(spec, MoESpec):
            raise TypeError(f"spec: expected a ktgen.MoESpec or a spec name, got {type(spec).__name__}")
        self.group = _cpu_group(group)
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        E = spec.expert_num
        if self.world_size > E:
            raise ValueError(f"group: {self.world_size} ranks for {E} experts; every rank needs one")
        self.spec = spec
        self.experts = expert_range(E, self.world_size, self.rank)
        self.starts = [expert_range(E, self.world_size, r).start for r in range(self.world_size)]
        k = spec.num_experts_per_tok
        # One expert per entry; by default room for every entry of every rank.
        if max_entries is None:
            max_entries = spec.max_len * k * self.world_size
        elif not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries: expected a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        local_spec = spec.replace(name=f"{spec.name}_ep", expert_num=len(self.experts), num_experts_per_tok=1,
                                  max_len=max_entries)
        if lora is not None:
            items = lora.arrays() if isinstance(lora, LoRAWeights) else [lora[n] for n in LORA_NAMES]
            lora = {n: _local(a, self.experts, E, f"lora.{n}") for n, a in zip(LORA_NAMES, items)}
        if isinstance(gate, _PackedFile):
            weights = [_PackedFile(gate.path, self.experts), None, None]
        else:
            weights = [_local(w, self.experts, E, n) for n, w in (("gate", gate), ("up", up), ("down", down))]
        self.local = KTMoE(local_spec, *weights, lora, generator=generator)

    @classmethod
    def from_packed(cls, path, spec=None, lora=None, *, group=None, max_entries: int | None = None,
                    generator: torch.Generator | None = None) -> "ExpertParallelMoE":
        """Each rank maps its own experts' part of one packed weight file of the whole layer
        (`ktgen pack`, MoE.save_packed): the ranks of a host share the file's pages, and each
        reads only its experts'. spec: the file's (default) or another for the same weights."""
        from ..packed import PackedFile
        if isinstance(spec, str):
            spec = load_spec(spec)
        spec = PackedFile(path).check_spec(spec)
        return cls(spec, _PackedFile(Path(path)), None, None, lora, group=group, max_entries=max_entries,
                   generator=generator)

    def extra_repr(self) -> str:
        return (f"spec={self.spec.name}, experts {self.experts.start}..{self.experts.stop - 1} of "
                f"{self.spec.expert_num} on rank {self.rank} of {self.world_size}")

    def _check(self, hidden_states, topk_ids, topk_weights) -> str | None:
        """What is wrong with this rank's inputs (None: nothing)."""
        spec = self.spec
        H, k, E = spec.hidden_size, spec.num_experts_per_tok, spec.expert_num
        if hidden_states.shape[-1:] != (H,):
            return f"hidden_states: expected shape [..., {H}], got {tuple(hidden_states.shape)}"
        lead = tuple(hidden_states.shape[:-1])
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if tuple(t.shape) != lead + (k,):
                return f"{name}: expected shape {lead + (k,)}, got {tuple(t.shape)}"
        T = math.prod(lead)
        if T > spec.max_len:
            return f"hidden_states: {T} tokens (T = batch x sequence) exceeds max_len = {spec.max_len}"
        if T and (int(topk_ids.min()) < -1 or int(topk_ids.max()) >= E):
            bad = int(topk_ids.min()) if int(topk_ids.min()) < -1 else int(topk_ids.max())
            return f"topk_ids: id {bad} is outside -1 .. {E - 1} (expert_num = {E}; -1 skips a slot)"
        return None

    def _agree(self, problem: str | None) -> None:
        """Raise on every rank when any rank has a problem: one that raised alone would leave
        the others waiting in the next collective."""
        flag = torch.tensor([problem is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item():
            raise ValueError(problem or "another rank's inputs were refused (its error names them); "
                                        "every rank stops this forward")

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        H, k = spec.hidden_size, spec.num_experts_per_tok
        self._agree(self._check(hidden_states, topk_ids, topk_weights))
        lead = tuple(hidden_states.shape[:-1])
        T = math.prod(lead)
        x = hidden_states.reshape(T, H).to(torch.bfloat16)
        ids = topk_ids.reshape(-1).to(torch.int64)
        w = topk_weights.reshape(-1).to(torch.float32)

        slots = (ids >= 0).nonzero().squeeze(1)
        e = ids[slots]
        owner = torch.bucketize(e, torch.tensor(self.starts[1:], dtype=torch.int64), right=True)
        order = torch.argsort(owner, stable=True)
        slots, e, owner = slots[order], e[order], owner[order]
        send = torch.bincount(owner, minlength=self.world_size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_l, recv_l = send.tolist(), recv.tolist()
        if self.max_entries < spec.max_len * k * self.world_size:   # may be exceeded
            n = sum(recv_l)
            self._agree(None if n <= self.max_entries else
                        f"hidden_states: the ranks' tokens give this rank's experts {n} entries, more "
                        f"than max_entries = {self.max_entries}")

        local_ids = (e - torch.tensor(self.starts, dtype=torch.int64)[owner]).to(torch.int32)
        ids_in = torch.empty(sum(recv_l), dtype=torch.int32)
        dist.all_to_all_single(ids_in, local_ids, recv_l, send_l, group=self.group)
        token = slots // k
        rows = x[token]
        if torch.is_grad_enabled() and not rows.requires_grad:
            # Every rank runs the same collectives in the backward, whichever inputs need grads.
            rows = rows.detach().requires_grad_(True)
        rows_in = _AllToAll.apply(rows, send_l, recv_l, self.group)
        y_in = self.local(rows_in, ids_in[:, None], torch.ones(len(ids_in), 1))
        y = _AllToAll.apply(y_in, recv_l, send_l, self.group)
        out = torch.zeros(T, H, dtype=torch.float32).index_add(0, token, y.float() * w[slots, None])
        return out.to(torch.bfloat16).reshape(*lead, H)

    def full_lora(self) -> dict[str, torch.Tensor] | None:
        """The whole layer's six LoRA matrices ([E, ...]) on rank 0 of the group (None elsewhere);
        a collective: every rank calls it."""
        mine = {n: getattr(self.local, n).detach().clone() for n in LORA_NAMES}
        parts = [None] * self.world_size
        dist.all_gather_object(parts, mine, group=self.group)
        if self.rank != 0:
            return None
        return {n: torch.cat([p[n] for p in parts]) for n in LORA_NAMES}

    def peft_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The whole layer's LoRA in PEFT's layout on rank 0 ({} elsewhere); a collective."""
        full = self.full_lora()
        if full is None:
            return {}
        arrays = adapters.to_peft({n: _np_view(t) for n, t in full.items()})
        keys = adapters.peft_keys(prefix)
        return {keys[k]: _from_np(a) for k, a in arrays.items()}

    def load_peft_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str,
                             config: Mapping | None = None) -> None:
        """This rank's experts' LoRA from a whole layer's PEFT state dict (load_adapter)."""
        self.load_lora(self.peft_lora(state_dict, prefix, config))

    def peft_lora(self, state_dict: Mapping[str, torch.Tensor], prefix: str,
                  config: Mapping | None = None) -> dict:
        """This rank's experts' six LoRA matrices from a whole layer's PEFT state dict, checked,
        nothing written (KTMoE.peft_lora)."""
        return self.local.peft_lora(state_dict, prefix, config, experts=self.experts,
                                    expert_num=self.spec.expert_num)

    def load_lora(self, lora) -> None:
        """This rank's experts' LoRA values, in place (KTMoE.load_lora)."""
        self.local.load_lora(lora)

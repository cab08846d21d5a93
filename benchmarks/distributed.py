"""Several processes on one host: memory of a shared packed file, and expert parallelism.

    python benchmarks/distributed.py rss [--procs 1 2 3] [--experts 32] [--hidden 1024] [--inter 512]
    python benchmarks/distributed.py ep [--tokens 512] [--experts 32] [--hidden 1024] [--inter 512] [--repeat 5]

rss: writes one layer as a packed file, then starts N processes that each map it
(ktgen.MoE.from_packed) and run a forward that reads every expert. Once all have, each reports
from /proc/self/smaps_rollup how much its RSS grew, split into private (pages no other process
maps: with one process, the file's too) and shared (pages other processes map too: the file's),
and its PSS (shared pages divided among the processes); the packed size is printed next to them.

ep: one forward + backward step of ExpertParallelMoE on 2 gloo ranks (each half of the tokens
and half the experts, threads split between them) against one process running KTMoE over all
experts and all tokens, and the bytes the all_to_all calls move per step. Linux only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20


def _rollup() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def _spec(args, **kw):
    import ktgen
    fields = dict(name="dist_bench", expert_num=args.experts, num_experts_per_tok=8, hidden_size=args.hidden,
                  intermediate_size=args.inter, max_len=max(64, getattr(args, "tokens", 64)), lora={"rank": 8})
    fields.update(kw)
    return ktgen.MoESpec(**fields)


def _rss_child(path: str, threads: int, barrier, queue) -> None:
    import ktgen
    before = _rollup()
    moe = ktgen.MoE.from_packed(path, ktgen.packed.PackedFile(path).spec.replace(threads=threads))
    spec = moe.spec
    rng = np.random.default_rng(0)
    T = 64
    x = rng.standard_normal((T, spec.hidden_size), np.float32).astype(ktgen.runtime.bfloat16)
    ids = (np.arange(T * spec.num_experts_per_tok) % spec.expert_num).reshape(T, -1).astype(np.int32)
    moe.forward(x, ids, np.ones(ids.shape, np.float32))   # every expert's weights read
    barrier.wait()   # every process has mapped and read the file
    after = _rollup()
    grow = {k: after[k] - before[k] for k in ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean",
                                               "Private_Dirty")}
    queue.put({"mapped": moe.mapped, "base_weights": moe.memory()["base_weights"], **grow})
    barrier.wait()   # keep the mapping until every process has measured


def cmd_rss(args) -> dict:
    import ktgen
    rng = np.random.default_rng(0)
    spec = _spec(args)
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    w = [(rng.standard_normal(s, np.float32) * 0.02).astype(ktgen.runtime.bfloat16)
         for s in ((E, I, H), (E, I, H), (E, H, I))]
    results = {}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.safetensors")
        ktgen.MoE(spec, *w).save_packed(path)
        del w
        for n in args.procs:
            barrier, queue = ctx.Barrier(n), ctx.Queue()
            threads = max(1, (os.cpu_count() or 1) // n)
            procs = [ctx.Process(target=_rss_child, args=(path, threads, barrier, queue)) for _ in range(n)]
            for p in procs:
                p.start()
            got = [queue.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(600)
            results[n] = got
    packed = results[args.procs[0]][0]["base_weights"]
    print(f"one layer packed: {packed / MIB:.1f} MiB (E={E}, H={H}, I={I}, bf16), mapped by every process")
    for n, got in results.items():
        for i, r in enumerate(got):
            private = r["Private_Clean"] + r["Private_Dirty"]
            shared = r["Shared_Clean"] + r["Shared_Dirty"]
            print(f"  {n} process{'es' if n > 1 else ''}, #{i}: RSS +{r['Rss'] / MIB:.1f} MiB = private "
                  f"+{private / MIB:.1f} + shared +{shared / MIB:.1f}; PSS +{r['Pss'] / MIB:.1f} MiB; "
                  f"mapped: {r['mapped']}")
    return {"packed_bytes": packed, "runs": results}


def _ep_child(rank: int, world: int, port: int, args, queue) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ktgen.torch import ExpertParallelMoE, KTMoE
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)   # the host's cores shared among the ranks, torch's ops too
    spec = _spec(args, threads=threads)
    g = torch.Generator().manual_seed(0)
    E, H, I, k = spec.expert_num, spec.hidden_size, spec.intermediate_size, spec.num_experts_per_tok
    gate, up, down = (torch.randn(s, generator=g) * 0.02 for s in ((E, I, H), (E, I, H), (E, H, I)))
    T = args.tokens // world
    x = torch.randn(args.tokens, H, generator=g).bfloat16()
    scores = torch.rand(args.tokens, E, generator=g)
    ids = scores.topk(k, dim=1).indices
    wts = torch.rand(args.tokens, k, generator=g)
    sl = slice(rank * T, (rank + 1) * T)
    if world == 1:
        layer = KTMoE(spec, gate, up, down)
    else:
        layer = ExpertParallelMoE(spec.replace(max_len=T), gate, up, down)
    times = []
    for i in range(args.repeat + 1):
        xi = x[sl].clone().requires_grad_(True)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out = layer(xi, ids[sl], wts[sl])
        out.float().sum().backward()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    sent = int((ids[sl] >= 0).sum())
    if world > 1:   # entries leaving this rank (rows and their expert ids) and coming back
        mine = range(layer.experts.start, layer.experts.stop)
        remote = int(sum(int(e) not in mine for e in ids[sl].reshape(-1)))
        # each remote entry crosses four times (its bf16 row out, the output back, the output's
        # gradient out, the row's gradient back) and its int32 expert id once; plus the counts
        step_bytes = remote * (H * 2 * 4 + 4) + world * 8
    else:
        remote, step_bytes = 0, 0
    queue.put({"rank": rank, "step_s": float(np.median(times[1:])), "entries": sent,
               "remote_entries": remote, "a2a_bytes_sent": step_bytes})
    if world > 1:
        dist.destroy_process_group()


def cmd_ep(args) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_ep_child, args=(r, world, port, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        out[world] = sorted((queue.get(timeout=900) for _ in procs), key=lambda r: r["rank"])
        for p in procs:
            p.join(900)
    one = out[1][0]["step_s"]
    two = max(r["step_s"] for r in out[2])
    print(f"forward + backward of {args.tokens} tokens, E={args.experts}, H={args.hidden}, I={args.inter}, "
          f"k=8, LoRA rank 8, {os.cpu_count()} cores")
    print(f"  1 process, KTMoE over all experts:        {one * 1e3:8.1f} ms")
    print(f"  2 ranks, ExpertParallelMoE (gloo):         {two * 1e3:8.1f} ms  ({two / one:.2f}x)")
    for r in out[2]:
        print(f"    rank {r['rank']}: {r['remote_entries']} of {r['entries']} entries to the other rank; "
              f"all_to_all moves {r['a2a_bytes_sent'] / MIB:.2f} MiB per step for them")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("rss", "ep"):
        s = sub.add_parser(name)
        s.add_argument("--experts", type=int, default=32)
        s.add_argument("--hidden", type=int, default=1024)
        s.add_argument("--inter", type=int, default=512)
        s.add_argument("--json", metavar="PATH")
    sub.choices["rss"].add_argument("--procs", type=int, nargs="+", default=[1, 2, 3])
    sub.choices["ep"].add_argument("--tokens", type=int, default=512)
    sub.choices["ep"].add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    result = cmd_rss(args) if args.cmd == "rss" else cmd_ep(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

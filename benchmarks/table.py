"""The README's speed table: `ktgen bench` for every quant mode and runnable tier at several T.

    python benchmarks/table.py [--spec qwen3-30b-a3b] [--qlen 64 512 2048] [--repeat 3]

One `ktgen bench --json` run per row (each in its own process, so nothing is shared between
rows), plus a plain memory-bandwidth probe (a NumPy copy of 1 GiB) timed in this process, to
put the weight-streaming rate of small T next to what the memory can do. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ktgen import isa
from ktgen.render import BLOCKING


def copy_bandwidth_gbs(gib: float = 1.0, repeat: int = 3) -> float:
    """Bytes read plus bytes written per second by a large NumPy copy."""
    src = np.ones(int(gib * 2**30) // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def bench(spec: str, tier: str, mode: str, qlen: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "ktgen", "bench", spec, "--qlen", str(qlen), "--mode", mode,
               "--isa", tier, "--repeat", str(repeat), "--no-torch", "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="qwen3-30b-a3b")
    parser.add_argument("--qlen", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--modes", nargs="+", default=["bf16", "int8", "awq", "k2"])
    parser.add_argument("--tiers", nargs="+", default=[t for t in isa.available_tiers() if t in BLOCKING])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(f"memory copy bandwidth (read + write): {copy_bandwidth_gbs():.1f} GB/s\n")
    print("| tier | mode | T | forward ms | forward GFLOP/s | backward ms | backward GFLOP/s | "
          "% of fp32 GEMM | weights streamed GB/s | base weights |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tier in args.tiers:
        for mode in args.modes:
            for qlen in args.qlen:
                r = bench(args.spec, tier, mode, qlen, args.repeat)
                k = r["ktgen"]
                print(f"| {tier} | {mode} | {qlen} | {k['forward_ms']:.0f} | {k['forward_gflops']:.1f} | "
                      f"{k['backward_ms']:.0f} | {k['backward_gflops']:.1f} | "
                      f"{100 * k['forward_vs_roof']:.0f}% | {r['forward_weight_stream_gbs']:.1f} | "
                      f"{r['base_weights_bytes'] / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()

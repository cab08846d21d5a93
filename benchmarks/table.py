"""The README's speed table: `ktgen bench` for every quant mode and runnable tier at several T.

    python benchmarks/table.py [--spec qwen3-30b-a3b] [--qlen 64 512 2048] [--repeat 3]

One `ktgen bench --json --no-torch` run per row, each in its own process, so nothing is shared
between rows. Each row gives its run's fp32 GEMM roof and its C-measured multi-threaded read
bandwidth, next to which the forward's weight stream (the bytes of the experts that have a
token over the forward time) is put. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ktgen import isa
from ktgen.render import BLOCKING


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

    print("| tier | mode | T | forward ms | forward GFLOP/s | backward ms | backward GFLOP/s | "
          "forward / fp32 GEMM | weights streamed GB/s | / read bandwidth | base weights |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tier in args.tiers:
        for mode in args.modes:
            for qlen in args.qlen:
                r = bench(args.spec, tier, mode, qlen, args.repeat)
                k = r["ktgen"]
                share = k.get("forward_stream_vs_bandwidth")
                print(f"| {tier} | {mode} | {qlen} | {k['forward_ms']:.0f} | {k['forward_gflops']:.1f} | "
                      f"{k['backward_ms']:.0f} | {k['backward_gflops']:.1f} | "
                      f"{100 * k['forward_vs_roof']:.0f}% | {r['forward_weight_stream_gbs']:.1f} | "
                      f"{f'{100 * share:.0f}%' if share else '-'} | "
                      f"{r['base_weights_bytes'] / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()

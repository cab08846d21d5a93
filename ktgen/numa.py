"""NUMA layout and where each TP partition runs.

Partition p runs on node p mod nodes: its calls are made from one Python thread pinned to that
node's CPUs, so the OpenMP team it starts inherits the mask, and the weights and buffers that
team touches first land in the node's memory (first touch; no libnuma needed).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

NODE_DIR = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@lru_cache(maxsize=1)
def nodes() -> dict[int, list[int]]:
    """NUMA node -> its CPUs that this process may use; one node holding every usable CPU
    where the kernel reports no NUMA topology."""
    usable = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    found: dict[int, list[int]] = {}
    for d in sorted(NODE_DIR.glob("node[0-9]*")):
        try:
            cpus = [c for c in parse_cpulist((d / "cpulist").read_text()) if c in usable]
        except (OSError, ValueError):
            continue
        if cpus:
            found[int(d.name[4:])] = cpus
    return found or {0: sorted(usable)}


def partition_cpus(partition: int) -> list[int] | None:
    """The CPUs partition p is pinned to, or None on a one-node machine (no pinning)."""
    layout = nodes()
    if len(layout) < 2:
        return None
    node = sorted(layout)[partition % len(layout)]
    return layout[node]


def describe() -> str:
    layout = nodes()
    lines = [f"{len(layout)} NUMA node(s)"]
    for node, cpus in layout.items():
        lines.append(f"  node {node}: {len(cpus)} usable CPU(s) {format_cpulist(cpus)}")
    if len(layout) < 2:
        lines.append("  TP partitions share the node (no pinning)")
    else:
        lines.append(f"  TP partition p runs on node p mod {len(layout)}, its weights first-touched there")
    return "\n".join(lines)


def format_cpulist(cpus: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(out)

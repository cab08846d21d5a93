"""Several processes: KTMoE under DistributedDataParallel and FSDP2, and
ExpertParallelMoE over 2 and 3 ranks, each rank a process of its own on gloo over 127.0.0.1
(tests/dist_worker.py), against one process over the whole batch (tests/dist_case.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch without torch.distributed", allow_module_level=True)

import ktgen  # noqa: E402
from ktgen import adapters  # noqa: E402
from ktgen.torch import KTMoE, expert_range  # noqa: E402

from dist_case import SPEC, batch, layer_tensors, shares  # noqa: E402
from helpers import GRAD_TOL, OUT_TOL  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, world: int, out: Path) -> list[dict]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(r), str(world), str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def single_process(scenario: str, world: int):
    """One KTMoE over every expert and the whole batch: out, and the gradients of x, w and the
    LoRA for the loss sum(out * grad)."""
    gate, up, down, lora = layer_tensors()
    layer = KTMoE(SPEC, gate, up, down, lora)
    x, ids, w, g = batch(scenario, world)
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = layer(x, ids, w)
    (out.float() * g).sum().backward()
    return out.detach(), x.grad, w.grad, {n: getattr(layer, n).grad for n in ktgen.LORA_NAMES}, layer


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_data_parallel_lora_gradients_equal_one_process(tmp_path, scenario):
    ranks = run_ranks(scenario, 2, tmp_path)
    out, gx, gw, lora, _ = single_process(scenario, 2)
    for r, (res, sl) in enumerate(zip(ranks, shares(scenario, 2))):
        assert torch.equal(res["out"], out[sl]), r             # the same kernels on the same rows
        # each rank's loss is scaled by the world size (2: exact) so that the average is the sum
        assert torch.equal(res["x_grad"] / 2, gx[sl]) and torch.equal(res["w_grad"] / 2, gw[sl]), r
        for n in ktgen.LORA_NAMES:   # the ranks' sums, averaged: fp32 reduction order only
            assert rel(res["lora_grads"][n], lora[n]) <= 1e-6, (r, n)


@pytest.mark.parametrize("world", [2, 3])
def test_expert_parallel_equals_one_process_over_all_experts(tmp_path, world):
    ranks = run_ranks("ep", world, tmp_path)
    out, gx, gw, lora, layer = single_process("ep", world)
    for r, (res, sl) in enumerate(zip(ranks, shares("ep", world))):
        # rank 0 passed an expert id out of range first: refused there, and on every other rank
        want = "topk_ids: id 6 is outside" if r == 0 else "another rank's inputs were refused"
        assert res["refused"].startswith(want), res["refused"]
        lo, hi = res["experts"]
        assert (lo, hi) == (expert_range(SPEC.expert_num, world, r).start, expert_range(SPEC.expert_num, world, r).stop)
        n = sl.stop - sl.start
        assert res["out"].shape == (n, SPEC.hidden_size)
        if n:   # each entry's output is rounded to bf16 before the sum: within the bf16 limits
            assert rel(res["out"].float(), out[sl].float()) <= OUT_TOL, r
            assert rel(res["x_grad"].float(), gx[sl].float()) <= GRAD_TOL, r
            assert rel(res["w_grad"], gw[sl]) <= GRAD_TOL, r
        for name in ktgen.LORA_NAMES:   # the owner's experts' LoRA gradients
            want = lora[name][lo:hi]
            got = res["lora_grads"][name]
            assert got.shape == want.shape
            if want.abs().sum() > 0:
                assert rel(got, want) <= GRAD_TOL, (r, name)
            else:   # an expert no token used
                assert got.abs().sum() == 0, (r, name)
    # save_adapter gathered the whole layer's LoRA on rank 0: the one process's adapter
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / adapters.WEIGHTS_NAME))
    want = layer.peft_state_dict("model.mlp.experts")
    assert saved.keys() == want.keys()
    for key in want:
        assert torch.equal(saved[key], want[key]), key


def test_expert_parallel_ranks_map_their_experts_from_one_packed_file(tmp_path):
    gate, up, down, lora = layer_tensors()
    KTMoE(SPEC, gate, up, down, lora).moe.save_packed(tmp_path / "layer.safetensors")
    ranks = run_ranks("ep_packed", 2, tmp_path)
    direct = run_ranks("ep", 2, tmp_path / "direct" if (tmp_path / "direct").mkdir() is None else None)
    for a, b in zip(ranks, direct):
        assert a["mapped"]
        assert torch.equal(a["out"], b["out"]) and torch.equal(a["x_grad"], b["x_grad"])
        for n in ktgen.LORA_NAMES:
            assert torch.equal(a["lora_grads"][n], b["lora_grads"][n]), n


def test_expert_range_is_contiguous_and_even():
    for E in (1, 5, 6, 128):
        for world in range(1, min(E, 7) + 1):
            ranges = [expert_range(E, world, r) for r in range(world)]
            assert [x for rg in ranges for x in rg] == list(range(E))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="rank"):
        expert_range(8, 2, 2)


def test_expert_parallel_needs_an_initialized_group():
    gate, up, down, lora = layer_tensors()
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ktgen.torch.ExpertParallelMoE(SPEC, gate, up, down, lora)


def test_threads_are_shared_among_a_hosts_processes(monkeypatch):
    from ktgen.runtime import default_threads, usable_cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    full = usable_cores() >= (os.cpu_count() or 1)
    assert default_threads(1) == (max(1, usable_cores() // 2) if full else usable_cores())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "junk")
    assert default_threads(1) == usable_cores()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert np.all([default_threads(tp) == max(1, usable_cores() // tp) for tp in (1, 2)])


def test_processes_share_one_copy_of_a_packed_file(tmp_path):
    """benchmarks/distributed.py rss with 2 processes: each maps the file and reads every expert;
    what each holds privately is under 10% of the packed weights (the rest is the shared file)."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"
    out = Path(tmp_path) / "rss.json"
    subprocess.run([sys.executable, str(bench), "rss", "--procs", "2", "--experts", "64", "--hidden", "1024",
                    "--inter", "512", "--json", str(out)], check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    packed = result["packed_bytes"]
    for r in result["runs"]["2"]:
        assert r["mapped"]
        assert r["Private_Clean"] + r["Private_Dirty"] < 0.1 * packed, r
        assert r["Shared_Clean"] + r["Shared_Dirty"] > 0.9 * packed, r


def test_train_ddp_example_runs_under_torchrun(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "train_ddp.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(example), "--steps", "20", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "experts mapped from the packed files: True" in run.stdout
    losses = [float(line.split("loss ")[1].split()[0]) for line in run.stdout.splitlines() if "loss" in line]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.1, losses
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "packed" / "ktgen-pack.json").exists()

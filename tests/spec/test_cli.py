"""The `ktgen` command line (docs/design.md#the-command-line), run in-process through ktgen.cli.main."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ktgen
from ktgen import cli, isa, workload

REPO = Path(__file__).resolve().parents[2]
HAS_AVX512 = not isa.missing_features("avx512")

CUSTOM_SPEC = """\
name: cli_custom
expert_num: 6
num_experts_per_tok: 3
hidden_size: 64
intermediate_size: 96
max_len: 48
lora:
  rank: 4
  alpha: 6.0
  use_rslora: true
  dtype: bfloat16
"""


def run(capsys, *argv):
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def custom_spec(tmp_path):
    path = tmp_path / "cli_custom.yaml"
    path.write_text(CUSTOM_SPEC)
    return path


def test_info_names_the_chosen_tier(capsys):
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    tier, why = isa.choose("auto")
    assert f"auto tier:  {tier}: {why}" in out
    for word in ("CPU:", "compiler:", "cache dir:", "NUMA:", "cores:"):
        assert word in out
    assert os.environ["KTGEN_CACHE_DIR"] in out


def test_info_reports_ktgen_isa(capsys, monkeypatch):
    monkeypatch.setenv("KTGEN_ISA", "generic")
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    assert "KTGEN_ISA:  generic: every spec runs the generic tier" in out


def test_check_tiny_passes(capsys):
    rc, out, err = run(capsys, "check", "tiny", "--qlen", "64")
    assert rc == 0, out + err
    assert "PASS" in out and "FAIL" not in out
    for q in ("out", "grads.input", "grads.routing_weights", "grads.gate_a", "grads.down_b"):
        assert q in out
    assert "whole layer" in out


def test_check_spec_file_with_custom_shape(capsys, custom_spec):
    rc, out, err = run(capsys, "check", str(custom_spec), "--qlen", "1000", "--seed", "3")
    assert rc == 0, out + err
    assert "capped at the spec's max_len 48" in out
    assert "T=48 tokens" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS")


def test_check_subset_of_experts_says_so(capsys, custom_spec):
    rc, out, err = run(capsys, "check", str(custom_spec), "--qlen", "20", "--experts", "2")
    assert rc == 0, out + err
    assert "SUBSET: 2 of 6 experts (top-2 routing)" in out
    assert "PASS" in out and "on 2 of 6 experts" in out


def test_plan_takes_a_subset_of_a_layer_too_big_for_memory():
    spec = ktgen.load_spec("deepseek-v3")      # 256 experts of 7168 x 2048: ~21 GiB of bf16
    plan = workload.plan(spec, None)
    assert plan.subset and plan.spec.expert_num == workload.DEFAULT_SUBSET
    assert plan.spec.hidden_size == spec.hidden_size
    assert plan.spec.intermediate_size == spec.intermediate_size
    assert plan.spec.num_experts_per_tok == spec.num_experts_per_tok
    assert plan.spec.name == spec.name and "SUBSET" in plan.note
    full = workload.plan(ktgen.load_spec("tiny"), None)
    assert not full.subset and full.spec.expert_num == 8


def test_bench_tiny_writes_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    rc, out, err = run(capsys, "bench", "tiny", "--qlen", "32", "--repeat", "1", "--json", str(path))
    assert rc == 0, out + err
    assert "GFLOP/s" in out and "LoRA excluded" in out and "(the roof)" in out and "read bandwidth" in out
    data = json.loads(path.read_text())
    assert data["tokens"] == 32 and data["expert_num"] == 8
    kt = data["ktgen"]
    assert kt["forward_ms"] > 0 and kt["train_ms"] > 0
    assert data["fp32_gemm_roof"]["gflops"] > 0 and data["read_bandwidth_gbs"] > 0
    assert 0 < kt["forward_stream_vs_bandwidth"]
    try:
        import torch  # noqa: F401
    except ImportError:
        assert not data["baselines"].get("measurements")
    else:
        base = data["baselines"]
        assert base["best_forward"]["name"] in out and base["best_train"]["name"] in out
        assert kt["speedup_vs_best_forward"] == base["best_forward"]["ms"] / kt["forward_ms"]
        assert kt["speedup_vs_best_train"] > 0
        assert {"eager_bf16_forward", "grouped_mm_bf16_forward", "eager_fp32_train"} <= set(base["measurements"])


def test_cache_list_and_clear(capsys, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache))
    rc, out, _ = run(capsys, "cache", "list")
    assert rc == 0 and "empty" in out
    entry = cache / "demo-0123456789abcdef0123"
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text(json.dumps(
        {"spec": "demo", "tier": "avx2", "created": "2026-01-02T03:04:05", "module_file": "m.so"}))
    (entry / "m.so").write_bytes(b"\0" * 2048)
    rc, out, _ = run(capsys, "cache", "list")
    assert rc == 0
    assert "demo" in out and "avx2" in out and "2026-01-02T03:04:05" in out and str(entry) in out
    rc, out, _ = run(capsys, "cache", "clear")
    assert rc == 0 and "removed 1 cache entry" in out
    assert not entry.exists()
    rc, out, _ = run(capsys, "cache", "list")
    assert "empty" in out


def test_bad_spec_name_exits_2_naming_it(capsys):
    rc, out, err = run(capsys, "check", "no_such_spec")
    assert rc == 2
    assert "no_such_spec" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_invalid_spec_file_exits_2_naming_the_field(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(CUSTOM_SPEC.replace("hidden_size: 64", "hidden_size: 65"))
    rc, _, err = run(capsys, "build", str(path), "-o", str(tmp_path / "out"))
    assert rc == 2
    assert "hidden_size" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["check", "build"])
def test_isa_the_cpu_lacks_exits_2(capsys, tmp_path, monkeypatch, command):
    if HAS_AVX512:
        pytest.skip("this CPU has avx512")
    monkeypatch.delenv("KTGEN_EMULATE_AVX512", raising=False)  # conftest emulates it otherwise
    extra = ["-o", str(tmp_path / "b")] if command == "build" else []
    rc, out, err = run(capsys, command, "tiny", "--isa", "avx512", *extra)
    assert rc == 2
    assert "avx512" in err and "avx512f" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_isa_exits_2(capsys):
    rc, _, err = run(capsys, "check", "tiny", "--isa", "sse9")
    assert rc == 2 and "sse9" in err


def test_build_emit_only_for_another_machine(capsys, tmp_path):
    out_dir = tmp_path / "emit"
    rc, out, err = run(capsys, "build", "tiny", "-o", str(out_dir), "--isa", "avx512", "--no-make")
    assert rc == 0, err
    for name in ("tiny.h", "tiny.c", "Makefile", "README.txt"):
        assert (out_dir / name).is_file()
    assert "-mavx512f" in (out_dir / "Makefile").read_text()
    assert not (out_dir / "libtiny.so").exists()
    if not HAS_AVX512:
        assert "emit only" in out


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["check"]) == 2
    assert cli.main(["check", "tiny", "--qlen", "-1"]) == 2
    capsys.readouterr()


def test_python_dash_m_smoke():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ktgen", "info"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "auto tier:" in proc.stdout

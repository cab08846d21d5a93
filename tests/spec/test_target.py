"""ktgen.target: one Target chosen once (tier, extensions, emulation, compiler, flags) and passed
down to the renderer, the compiler, the cache key, the emitted Makefile and MoE."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import ktgen
from ktgen import cli, isa, settings, target
from ktgen.target import Target
from helpers import make_inputs, make_weights

SPEC = ktgen.MoESpec(name="target_probe", expert_num=2, num_experts_per_tok=1, hidden_size=32,
                     intermediate_size=32, max_len=4, lora=dict(rank=2))
AVX512 = frozenset(isa.tier("avx512").requires)


def test_a_named_tier_for_another_machine_is_exactly_that():
    plain = target.for_another_machine("avx512")
    assert (plain.tier, plain.extensions, plain.emulate) == ("avx512", frozenset(), False)
    t = target.for_another_machine("avx512+vnni")
    assert t.extensions == {"vnni"} and "-mavx512vnni" in t.cflags
    assert "-mavx512vnni" not in target.for_another_machine("avx512").cflags


def test_for_this_machine_adds_the_extensions_the_cpu_has():
    cfg = settings.settings()
    cfg = type(cfg)(**{**cfg.__dict__, "emulate": frozenset()})
    assert target.for_this_machine("avx512", cfg, cpu=AVX512).extensions == frozenset()
    with_vnni = target.for_this_machine("avx512", cfg, cpu=AVX512 | {"avx512_vnni"})
    assert with_vnni.vnni and "-mavx512vnni" in with_vnni.cflags and "vnni" in with_vnni.reason
    with pytest.raises(ktgen.ISAError, match="avx512_vnni"):
        target.for_this_machine("avx512+vnni", cfg, cpu=AVX512)


def test_emulation_is_listed_once_and_checked_by_the_target():
    for tier in isa.TIERS:
        if tier in isa.EMULATION_VARS:
            t = Target(tier, emulate=True)
            assert t.isa_flags == ("-O1",)
            assert all(tier in isa.EXTENSIONS[e].tiers for e in t.extensions)
            assert ktgen.render.render(SPEC, t).source != ktgen.render.render(SPEC, Target(tier)).source
        else:
            with pytest.raises(ktgen.ISAError, match="emulation"):
                Target(tier, emulate=True)


def test_bad_targets_name_what_is_wrong():
    with pytest.raises(ktgen.ISAError, match="sse9"):
        Target("sse9")
    with pytest.raises(ktgen.ISAError, match="'vnni'.*avx2"):
        Target("avx2", {"vnni"})
    with pytest.raises(ktgen.ISAError, match="'nope'"):
        target.parse("avx512+nope")
    with pytest.raises(TypeError, match="isa"):
        ktgen.compile(SPEC, isa=3)


def test_build_for_another_machine_emits_that_targets_flags(tmp_path, monkeypatch, capsys):
    """`ktgen build --isa avx512 --no-make` on a host with VNNI emits AVX-512 without VNNI."""
    host = isa.cpu_flags() | {"avx512_vnni"} | AVX512
    monkeypatch.setattr(isa, "cpu_flags", lambda: host)
    assert cli.main(["build", "tiny", "-o", str(tmp_path / "plain"), "--isa", "avx512", "--no-make"]) == 0
    makefile = (tmp_path / "plain" / "Makefile").read_text()
    assert "-mavx512f" in makefile and "-mavx512vnni" not in makefile
    assert cli.main(["build", "tiny", "-o", str(tmp_path / "vnni"), "--isa", "avx512+vnni", "--no-make"]) == 0
    assert "-mavx512vnni" in (tmp_path / "vnni" / "Makefile").read_text()
    out = capsys.readouterr().out
    assert "target avx512:" in out and "target avx512+vnni:" in out


def test_moe_takes_the_target():
    rng = np.random.default_rng(0)
    weights = make_weights(SPEC, rng)
    chosen = Target("generic", reason="the test's")
    moe = ktgen.MoE(SPEC, *weights, isa=chosen)
    assert moe.kernel.target is chosen and moe.kernel.isa == "generic"
    assert ktgen.MoE(SPEC, *weights, isa="generic").kernel.isa == "generic"
    with pytest.raises(TypeError, match="isa"):
        ktgen.MoE(SPEC, *weights, isa=object())
    x, ids, rw = make_inputs(SPEC, rng, 3)
    assert moe.forward(x, ids, rw).shape == (3, SPEC.hidden_size)


def test_check_does_not_write_the_tier_into_the_environment(monkeypatch, capsys):
    """The CLI passes its Target down; KTGEN_ISA never appears while a check runs."""
    monkeypatch.delenv("KTGEN_ISA", raising=False)
    rc = {}
    worker = threading.Thread(target=lambda: rc.setdefault(
        "rc", cli.main(["check", "tiny", "--isa", "generic", "--qlen", "8", "--experts", "2"])))
    seen = []
    worker.start()
    while worker.is_alive():
        if "KTGEN_ISA" in os.environ:
            seen.append(os.environ.get("KTGEN_ISA"))
        time.sleep(0.0002)
    worker.join()
    out = capsys.readouterr().out
    assert rc["rc"] == 0, out
    assert "generic tier" in out
    assert not seen

"""The amx tier: tile kernels for every quant mode, run through the tile emulation here
(KTGEN_EMULATE_AMX=1) and natively wherever the CPU has AMX."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ktgen
from ktgen import isa

from helpers import amx_spec, assert_layer_meets_limits, run_layer

NATIVE_AMX = not isa.missing_features("amx") and isa.amx_permission()


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("KTGEN_EMULATE_AMX", "1")
    monkeypatch.setenv("KTGEN_ISA", "amx")


NO_AMX = "this CPU has no AMX (or the OS refuses tile data): benchmarks/amx_device_check.sh runs it natively"


@pytest.fixture(params=["emulated", pytest.param("native", marks=pytest.mark.skipif(not NATIVE_AMX, reason=NO_AMX))])
def amx(request, monkeypatch):
    """The amx tier through the emulation, and natively where the CPU has AMX."""
    monkeypatch.setenv("KTGEN_EMULATE_AMX", "1" if request.param == "emulated" else "0")
    monkeypatch.setenv("KTGEN_ISA", "amx")
    return request.param


# rank 3 runs the LoRA tiles' scalar paths, rank 16 their vector ones (and bf16 LoRA its gathers)
LORAS = {"lora": True, "rank16": {"rank": 16}, "rank16-bf16": {"rank": 16, "dtype": "bfloat16"}, "nolora": False}


@pytest.mark.parametrize("mode", ["bf16", "int8", "awq", "k2"])
@pytest.mark.parametrize("lora", list(LORAS.values()), ids=list(LORAS))
@pytest.mark.parametrize("tp", [1, 2])
def test_amx_meets_section7(amx, mode, lora, tp):
    spec = amx_spec(mode, lora, tp)
    moe, inputs, out, grads = run_layer(spec)
    assert moe.kernel.isa == "amx" and moe.kernel.emulated == (amx == "emulated")
    assert_layer_meets_limits(moe, mode, inputs, out, grads)


def test_amx_is_deterministic_across_threads(amx):
    results = []
    for threads in (1, 2, 2):
        spec = amx_spec("awq", True, 1).replace(threads=threads)
        _, _, out, grads = run_layer(spec, seed=3)
        results.append((out.view(np.uint16), grads.input.view(np.uint16), grads.gate_a, grads.down_b))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_emulated_and_plain_builds_have_different_cache_keys(emulated, monkeypatch):
    spec = amx_spec("bf16", True, 1)
    emulated_key = ktgen.compile(spec).cache_key
    monkeypatch.setenv("KTGEN_EMULATE_AMX", "0")
    if NATIVE_AMX:
        assert ktgen.compile(spec).cache_key != emulated_key
    else:
        with pytest.raises(ktgen.ISAError, match="amx.*KTGEN_EMULATE_AMX"):
            ktgen.compile(spec)


def test_rendered_amx_source_uses_the_tile_instructions():
    spec = amx_spec("bf16", True, 1)
    native = ktgen.render.render(spec, "amx")
    emulated = ktgen.render.render(spec, ktgen.Target("amx", emulate=True))
    assert "_tile_dpbf16ps" in native.source and "ARCH_REQ_XCOMP_PERM" in native.source
    assert "_tile_dpbf16ps" not in emulated.source and "tile_dpbf16ps(" in emulated.source
    # the same kernels: only the tile and vector primitives differ
    assert native.source.count("amx_bf16_block(") == emulated.source.count("amx_bf16_block(") >= 2


@pytest.mark.skipif(not NATIVE_AMX, reason=NO_AMX)
@pytest.mark.parametrize("mode, lora", [(m, True) for m in ("bf16", "int8", "awq", "k2")]
                         + [("bf16", {"rank": 16}), ("int8", {"rank": 16, "dtype": "bfloat16"}),
                            ("k2", {"rank": 16})])
def test_native_amx_agrees_with_the_emulation_to_the_bit(mode, lora):
    """Both runs in fresh processes, so each compiles and loads its own build."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from helpers import amx_spec, run_layer
        _, _, out, grads = run_layer(amx_spec({mode!r}, {lora!r}, 2), seed=5)
        np.savez(sys.argv[1], out=out.view(np.uint16), dx=grads.input.view(np.uint16),
                 dw=grads.routing_weights, ga=grads.gate_a, db=grads.down_b)
    """)
    files = {}
    for emulate in ("0", "1"):
        tag = "r3" if lora is True else f"r{lora['rank']}-{lora.get('dtype', 'float32')}"
        path = os.path.join(os.environ["KTGEN_CACHE_DIR"], f"amx_{mode}_{tag}_{emulate}.npz")
        env = dict(os.environ, KTGEN_ISA="amx", KTGEN_EMULATE_AMX=emulate)
        subprocess.run([sys.executable, "-c", script, path], env=env, check=True)
        files[emulate] = np.load(path)
    for key in files["0"].files:
        np.testing.assert_array_equal(files["0"][key], files["1"][key], err_msg=key)


def test_int8_forward_runs_on_tdpbusd():
    spec = amx_spec("int8", True, 1)
    native = ktgen.render.render(spec, "amx").source
    emulated = ktgen.render.render(spec, ktgen.Target("amx", emulate=True)).source
    assert "_tile_dpbusd" in native and "tile_dpbusd(" in emulated
    assert native.count("amx_i8_block(") == emulated.count("amx_i8_block(") >= 2
    assert "amx_i8_block(" not in ktgen.render.render(amx_spec("bf16", True, 1), "amx").source

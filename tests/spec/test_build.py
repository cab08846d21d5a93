"""The emitted-C round trip: `ktgen build`, `make -C DIR` with only a C compiler, a plain C
program that runs forward and backward, compared with the Python runtime on the same inputs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ktgen
from ktgen import cli, emit, isa, settings, target

bf16 = ml_dtypes.bfloat16

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")

NOLORA_SPEC = """\
name: nolora_t
expert_num: 4
num_experts_per_tok: 2
hidden_size: 64
intermediate_size: 96
max_len: 40
lora: null
"""

# Reads the inputs the test wrote, runs the documented call sequence on partition 0 with 2
# threads, writes the results, then probes the error paths. Shapes come in as -D macros.
C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include KT_HEADER

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define KT(fn) CAT(KT_PREFIX, fn)

static const char *dir;

static void *read_bin(const char *name, size_t bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", path); exit(3); }
    void *p = calloc(1, bytes ? bytes : 1);
    if (fread(p, 1, bytes, f) != bytes) { fprintf(stderr, "short read %s\n", path); exit(3); }
    fclose(f);
    return p;
}

static void write_bin(const char *name, const void *p, size_t bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, bytes, f) != bytes) { fprintf(stderr, "cannot write %s\n", path); exit(3); }
    fclose(f);
}

#define CHECK(call) do { int rc_ = (call); if (rc_) { \
    fprintf(stderr, "%s failed: %d %s\n", #call, rc_, KT(error_string)(rc_)); return 4; } } while (0)

int main(int argc, char **argv) {
    if (argc != 2) return 5;
    dir = argv[1];
    const size_t nw = (size_t)NE * NI * NH;
    uint16_t *gate = read_bin("gate.bin", nw * 2);
    uint16_t *up = read_bin("up.bin", nw * 2);
    uint16_t *down = read_bin("down.bin", nw * 2);
    uint16_t *x = read_bin("x.bin", (size_t)NT * NH * 2);
    int32_t *ids = read_bin("ids.bin", (size_t)NT * NK * 4);
    float *rw = read_bin("rw.bin", (size_t)NT * NK * 4);
    uint16_t *grad_out = read_bin("grad_out.bin", (size_t)NT * NH * 2);

    KT_PREFIX *ctx = NULL;
    CHECK(KT(create)(&ctx, 0, 2));
    CHECK(KT(load_weights)(ctx, gate, up, down));
    free(gate); free(up); free(down);          /* the header says they are copied */

#if HAS_LORA
    static const char *names[6] = {"gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"};
    const size_t sizes[6] = {(size_t)NE * NR * NH, (size_t)NE * NI * NR, (size_t)NE * NR * NH,
                             (size_t)NE * NI * NR, (size_t)NE * NR * NI, (size_t)NE * NH * NR};
    float *lora[6], *dlora[6];
    for (int i = 0; i < 6; i++) {
        char fname[64];
        snprintf(fname, sizeof fname, "%s.bin", names[i]);
        lora[i] = read_bin(fname, sizes[i] * 4);
        dlora[i] = calloc(sizes[i], 4);
    }
    CHECK(KT(set_lora)(ctx, lora[0], lora[1], lora[2], lora[3], lora[4], lora[5]));
#endif

    float *out = calloc((size_t)NT * NH, 4);
    float *grad_input = calloc((size_t)NT * NH, 4);
    float *grad_routing = calloc((size_t)NT * NK, 4);
    CHECK(KT(forward)(ctx, NT, x, ids, rw, out, 0));
#if HAS_LORA
    CHECK(KT(backward)(ctx, 0, grad_out, grad_input, grad_routing,
                       dlora[0], dlora[1], dlora[2], dlora[3], dlora[4], dlora[5]));
#else
    CHECK(KT(backward)(ctx, 0, grad_out, grad_input, grad_routing, NULL, NULL, NULL, NULL, NULL, NULL));
#endif
    write_bin("out.out", out, (size_t)NT * NH * 4);
    write_bin("grad_input.out", grad_input, (size_t)NT * NH * 4);
    write_bin("grad_routing.out", grad_routing, (size_t)NT * NK * 4);
#if HAS_LORA
    for (int i = 0; i < 6; i++) {
        char fname[64];
        snprintf(fname, sizeof fname, "grad_%s.out", names[i]);
        write_bin(fname, dlora[i], sizes[i] * 4);
    }
#endif

    /* Error paths: codes, never aborts. Buffers are large enough for MAXLEN + 1 tokens. */
    uint16_t *bx = calloc((size_t)(MAXLEN + 1) * NH, 2);
    int32_t *bids = calloc((size_t)(MAXLEN + 1) * NK, 4);
    float *brw = calloc((size_t)(MAXLEN + 1) * NK, 4);
    float *bout = calloc((size_t)(MAXLEN + 1) * NH, 4);
    int rc = KT(forward)(ctx, MAXLEN + 1, bx, bids, brw, bout, -1);
    printf("too_long %d %s\n", rc, KT(error_string)(rc));
    rc = KT(forward)(NULL, NT, x, ids, rw, out, -1);
    printf("null_ctx %d %s\n", rc, KT(error_string)(rc));
    rc = KT(backward)(ctx, 0, grad_out, grad_input, grad_routing, NULL, NULL, NULL, NULL, NULL, NULL);
    printf("empty_slot %d %s\n", rc, KT(error_string)(rc));
    KT_PREFIX *none = (KT_PREFIX *)1;
    rc = KT(create)(&none, 0, 0);
    printf("zero_threads %d %s %s\n", rc, KT(error_string)(rc), none == NULL ? "null" : "set");
    KT(destroy)(ctx);
    KT(destroy)(NULL);
    printf("done\n");
    return 0;
}
"""


def _bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


def _round_trip(tmp_path: Path, spec, build_dir: Path, link: str, T: int, seed: int):
    """Write inputs, compile and run the C program, and compare with ktgen.MoE."""
    rng = np.random.default_rng(seed)
    E, H, I, k = spec.expert_num, spec.hidden_size, spec.intermediate_size, spec.num_experts_per_tok
    gate = (rng.standard_normal((E, I, H), np.float32) * 0.05).astype(bf16)
    up = (rng.standard_normal((E, I, H), np.float32) * 0.05).astype(bf16)
    down = (rng.standard_normal((E, H, I), np.float32) * 0.05).astype(bf16)
    x = rng.standard_normal((T, H), np.float32).astype(bf16)
    ids = rng.integers(0, E, (T, k)).astype(np.int32)
    ids[rng.random((T, k)) < 0.15] = -1                 # skipped slots
    rw = rng.random((T, k)).astype(np.float32)
    grad_out = rng.standard_normal((T, H), np.float32).astype(bf16)
    lora = ktgen.LoRAWeights.random(spec, rng, 0.05) if spec.lora else None

    data = tmp_path / "data"
    data.mkdir()
    for name, a in dict(gate=gate, up=up, down=down, x=x, ids=ids, rw=rw, grad_out=grad_out).items():
        np.ascontiguousarray(a).tofile(data / f"{name}.bin")
    if lora is not None:
        for name in ktgen.LORA_NAMES:
            assert getattr(lora, name).dtype == np.float32
            getattr(lora, name).tofile(data / f"{name}.bin")

    R = spec.lora.rank if spec.lora else 0
    defines = [f"-DKT_PREFIX=ktgen_{spec.name}", f'-DKT_HEADER="{spec.name}.h"', f"-DNE={E}", f"-DNK={k}",
               f"-DNH={H}", f"-DNI={I}", f"-DNR={R}", f"-DNT={T}", f"-DMAXLEN={spec.max_len}",
               f"-DHAS_LORA={1 if spec.lora else 0}"]
    src = tmp_path / "prog.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "prog"
    if link == "shared":
        libs = [f"-L{build_dir}", f"-l{spec.name}", f"-Wl,-rpath,{build_dir}"]
    else:
        libs = [str(build_dir / f"lib{spec.name}.a")]
    cmd = ["gcc", "-O1", "-std=c11", "-Wall", "-Werror", *defines, f"-I{build_dir}", str(src), "-o", str(exe),
           *libs, "-fopenmp", "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(exe), str(data)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probes = {line.split()[0]: line.split(None, 2)[1:] for line in proc.stdout.splitlines() if line.strip()}
    assert "done" in probes

    # Error codes: nonzero, each with a non-empty description.
    for probe in ("too_long", "null_ctx", "empty_slot", "zero_threads"):
        code, msg = int(probes[probe][0]), probes[probe][1] if len(probes[probe]) > 1 else ""
        assert code != 0, probe
        assert msg.strip() and msg.strip() != "ok", probe
    assert "max_len" in probes["too_long"][1]
    assert probes["zero_threads"][1].endswith("null")

    # The same inputs through the Python runtime (same spec, same tier, cffi build).
    moe = ktgen.MoE(spec, gate, up, down, lora)
    # what was built and what runs, in one spelling: the target (tier and extensions)
    assert moe.kernel.target.name == emit.built_target(build_dir)
    out, saved = moe.forward_train(x, ids, rw)
    grads = moe.backward(saved, grad_out)

    def load(name, shape, dtype=np.float32):
        return np.fromfile(data / f"{name}.out", dtype).reshape(shape)

    c_out = load("out", (T, H)).astype(bf16)                 # the C API returns float32: round once
    c_gin = load("grad_input", (T, H)).astype(bf16)
    np.testing.assert_array_equal(_bits(c_out), _bits(out))
    np.testing.assert_array_equal(_bits(c_gin), _bits(grads.input))
    np.testing.assert_array_equal(load("grad_routing", (T, k)), grads.routing_weights)
    if lora is not None:
        for name, shape in ktgen.LoRAWeights.shapes(spec).items():
            np.testing.assert_array_equal(load(f"grad_{name}", shape), getattr(grads, name), err_msg=name)
    # and the results are not trivially zero
    assert np.abs(out.astype(np.float32)).max() > 0
    assert np.abs(grads.routing_weights).max() > 0


def test_tiny_round_trip(tmp_path, capsys):
    """build --no-make, then a plain `make -C DIR` with gcc; link the shared library."""
    build_dir = tmp_path / "build"
    assert cli.main(["build", "tiny", "-o", str(build_dir), "--no-make"]) == 0
    capsys.readouterr()
    proc = subprocess.run(["make", "-C", str(build_dir), "CC=gcc"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in ("libtiny.so", "libtiny.a", "tiny.h", "tiny.c", "README.txt"):
        assert (build_dir / f).is_file(), f
    header = (build_dir / "tiny.h").read_text()
    for fn in ("create", "destroy", "load_weights", "set_lora", "forward", "backward", "error_string"):
        assert f"ktgen_tiny_{fn}(" in header
    _round_trip(tmp_path, ktgen.load_spec("tiny"), build_dir, "shared", T=37, seed=1)
    # make clean removes what make built
    proc = subprocess.run(["make", "-C", str(build_dir), "clean"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert not (build_dir / "libtiny.so").exists() and (build_dir / "tiny.c").exists()


def test_lora_less_round_trip(tmp_path, capsys):
    """`ktgen build` runs make itself and reports the library; link the static library."""
    spec_path = tmp_path / "nolora_t.yaml"
    spec_path.write_text(NOLORA_SPEC)
    build_dir = tmp_path / "build"
    assert cli.main(["build", str(spec_path), "-o", str(build_dir)]) == 0
    out = capsys.readouterr().out
    assert "libnolora_t.so" in out and "libnolora_t.a" in out
    _round_trip(tmp_path, ktgen.load_spec(spec_path), build_dir, "static", T=40, seed=2)


# Every spelling of a target: a tier alone, and a tier with the extensions it takes.
SPELLINGS = ["generic", "avx2", "avx512", "avx512+vnni", "avx512bf16", "avx512bf16+vnni", "amx"]


@pytest.mark.parametrize("name", SPELLINGS)
def test_an_emitted_build_names_its_target_as_the_runtime_does(tmp_path, capsys, name):
    """`ktgen build --isa NAME` records NAME (tier and extensions), and reading it back gives the
    same Target that compile() uses: one notion of what was built on both sides."""
    assert cli.main(["build", "tiny", "--isa", name, "-o", str(tmp_path), "--no-make"]) == 0
    assert f"target {name}:" in capsys.readouterr().out
    built = emit.built_target(tmp_path)
    assert built == name
    tier, exts = target.parse(built)
    assert target.Target(tier, exts).name == target.for_another_machine(name).name == name


# The CPUs this project meets, by the flags that choose a target.
BASE = {"avx2", "fma", "f16c"}
AVX512 = BASE | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
CPUS = {
    "zen3 (avx2 only)": (BASE, "avx2"),
    "zen4 (avx512 bf16 + vnni)": (AVX512 | {"avx512_bf16", "avx512_vnni"}, "avx512bf16+vnni"),
    "xeon (avx512 + vnni)": (AVX512 | {"avx512_vnni"}, "avx512+vnni"),
    "xeon (amx)": (AVX512 | {"avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}, "amx"),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_auto_builds_and_runs_the_same_target_on_each_cpu(tmp_path, monkeypatch, cpu):
    """On each CPU, the auto target a kernel compiles for is the one an emitted build records."""
    flags, expected = CPUS[cpu]
    monkeypatch.setattr(isa, "amx_permission", lambda: True)   # the OS grants tile data there
    cfg = settings.settings()
    cfg = type(cfg)(**{**cfg.__dict__, "emulate": frozenset()})
    chosen = target.for_this_machine("auto", cfg, cpu=frozenset(flags))
    assert chosen.name == expected
    emit.emit(ktgen.load_spec("tiny"), chosen, tmp_path)
    assert emit.built_target(tmp_path) == chosen.name


def test_built_target_of_a_directory_without_one_is_a_named_error(tmp_path):
    with pytest.raises(emit.BuildError, match="Makefile"):
        emit.built_target(tmp_path)
    (tmp_path / "Makefile").write_text("all:\n")
    with pytest.raises(emit.BuildError, match="KTGEN_TARGET"):
        emit.built_target(tmp_path)

"""ktgen.compile (docs/design.md: the Python API; targets, compiling and the cache): the Kernel
it returns, the on-disk cache and its integrity checks across processes, the cache key's inputs,
`cache clear` beside a build in flight, the process state a compile leaves alone, the environment
variables, the errors, and every tier's source, native and emulated, compiling whatever the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ktgen
from ktgen import isa as isa_mod
from ktgen.render import render
from ktgen.settings import BUILD_ENV
from helpers import ALL_TIERS, RUN_TIERS, awkward_spec, qwen_spec

REPO = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"

# A small spec of its own, so that no other test file has loaded it into this process.
PROBE = ktgen.MoESpec(name="compile_probe", expert_num=2, num_experts_per_tok=1, hidden_size=32,
                      intermediate_size=32, max_len=4, lora=dict(rank=2))

# Compiles (or finds) a spec in a fresh interpreter and runs one forward with it.
CHILD = r"""
import json, sys
import numpy as np, ml_dtypes
import ktgen
spec = ktgen.MoESpec.model_validate(json.loads(sys.argv[1]))
k = ktgen.compile(spec)
E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
bf = ml_dtypes.bfloat16
w = lambda *s: np.full(s, 0.5, np.float32).astype(bf)
moe = ktgen.MoE(spec, w(E, I, H), w(E, I, H), w(E, H, I))
out = moe.forward(w(1, H), np.zeros((1, spec.num_experts_per_tok), np.int64),
                  np.ones((1, spec.num_experts_per_tok), np.float32))
print("RESULT " + json.dumps(dict(compiled=k.compiled, key=k.cache_key, path=str(k.path),
                                  isa=k.isa, finite=bool(np.isfinite(out.astype(np.float32)).all()))))
"""


def child_env(cache_dir) -> dict[str, str]:
    env = dict(os.environ)
    env["KTGEN_CACHE_DIR"] = str(cache_dir)
    env.pop("KTGEN_ISA", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def child_args(spec):
    return [sys.executable, "-c", CHILD, json.dumps(spec.model_dump())]


def parse_child(proc_stdout: str, stderr: str, rc: int) -> dict:
    assert rc == 0, f"child failed (rc {rc}):\n{stderr[-3000:]}"
    lines = [l for l in proc_stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no result from child:\n{proc_stdout}\n{stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["finite"]
    return result


def run_child(spec, cache_dir) -> dict:
    proc = subprocess.run(child_args(spec), env=child_env(cache_dir), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    return parse_child(proc.stdout, proc.stderr, proc.returncode)


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in Path(cache_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


def set_cache_dir(path):
    old = os.environ.get("KTGEN_CACHE_DIR")
    os.environ["KTGEN_CACHE_DIR"] = str(path)
    return old


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """PROBE compiled in-process into a cache dir of its own: (first Kernel, second Kernel, dir)."""
    cache_dir = tmp_path_factory.mktemp("probe-cache")
    old = set_cache_dir(cache_dir)
    try:
        first = ktgen.compile(PROBE)
        second = ktgen.compile(PROBE)
    finally:
        os.environ["KTGEN_CACHE_DIR"] = old
    return first, second, cache_dir


def test_compile_returns_a_kernel_and_caches_it(probe, kernel_cache):
    first, second, cache_dir = probe
    assert isinstance(first, ktgen.Kernel)
    assert first.compiled is True
    assert first.isa == isa_mod.choose("auto")[0]
    assert re.fullmatch(r"[0-9a-f]{64}", first.cache_key)
    # KTGEN_CACHE_DIR moves the cache: the entry is there, complete, and not in the default one
    path = Path(first.path)
    assert path.is_dir() and path.parent == Path(cache_dir)
    manifest = json.loads((path / MANIFEST).read_text())
    assert (path / manifest["module_file"]).is_file()
    assert entries(cache_dir) == [path]
    assert not any(p.name.startswith(PROBE.name + "-") for p in entries(kernel_cache))
    # the second call in-process is a hit
    assert second.compiled is False
    assert second.cache_key == first.cache_key and Path(second.path) == path
    assert second.isa == first.isa


def test_second_process_compiles_nothing(probe):
    first, _, cache_dir = probe
    result = run_child(PROBE, cache_dir)
    assert result["compiled"] is False
    assert result["key"] == first.cache_key and Path(result["path"]) == Path(first.path)
    assert len(entries(cache_dir)) == 1


def test_tier_changes_the_cache_key(probe, monkeypatch):
    first, _, cache_dir = probe
    other = [t for t in RUN_TIERS if t != first.isa]
    if not other:
        pytest.skip("this CPU runs a single tier")
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("KTGEN_ISA", other[-1])
    k = ktgen.compile(PROBE)
    assert k.isa == other[-1]
    assert k.cache_key != first.cache_key and Path(k.path) != Path(first.path)
    assert k.compiled is True


def test_spec_changes_the_cache_key(probe, monkeypatch):
    first, _, cache_dir = probe
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache_dir))
    k = ktgen.compile(PROBE.replace(max_len=5))
    assert k.cache_key != first.cache_key and Path(k.path) != Path(first.path)
    assert k.compiled is True


@pytest.mark.parametrize("damage", ["truncated_module", "missing_manifest"])
def test_damaged_entry_is_rebuilt(probe, tmp_path, damage):
    first, _, cache_dir = probe
    src = Path(first.path)
    cache = tmp_path / "cache"
    entry = cache / src.name
    shutil.copytree(src, entry)
    manifest = json.loads((entry / MANIFEST).read_text())
    module = entry / manifest["module_file"]
    if damage == "truncated_module":
        size = module.stat().st_size
        with open(module, "r+b") as f:
            f.truncate(size // 2)
    else:
        (entry / MANIFEST).unlink()
    # a fresh process: this one has the module loaded already, which would hide the damage
    result = run_child(PROBE, cache)
    assert result["compiled"] is True, f"{damage}: the damaged entry was not rebuilt"
    assert result["key"] == first.cache_key and Path(result["path"]) == entry
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["key"] == first.cache_key
    rebuilt = (entry / manifest["module_file"]).read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == manifest["sha256"]
    again = run_child(PROBE, cache)
    assert again["compiled"] is False


def test_two_processes_build_the_same_new_spec(tmp_path):
    spec = PROBE.replace(name="compile_race")
    cache = tmp_path / "race-cache"  # does not exist yet: both create it
    env = child_env(cache)
    procs = [subprocess.Popen(child_args(spec), env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(parse_child(out, err, p.returncode))
    assert results[0]["key"] == results[1]["key"]
    assert results[0]["path"] == results[1]["path"]
    assert sum(r["compiled"] for r in results) == 1, "the build must run once, the other process waits"
    (entry,) = entries(cache)
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["key"] == results[0]["key"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".build")], "temporary build dirs left"


def test_unusable_cache_dir_raises_cache_error(tmp_path, monkeypatch):
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: use a path below a regular file instead
            blocker = tmp_path / "a-file"
            blocker.write_text("not a directory")
            bad = blocker / "cache"
        else:
            bad = ro / "cache"
        monkeypatch.setenv("KTGEN_CACHE_DIR", str(bad))
        with pytest.raises(ktgen.CacheError) as info:
            ktgen.compile(PROBE.replace(name="compile_unusable_cache"))
        assert str(bad) in str(info.value)
        assert "KTGEN_CACHE_DIR" in str(info.value)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("cc", ["/nonexistent/bin/no-such-cc", "no-such-compiler-ktgen"])
def test_missing_compiler(monkeypatch, tmp_path, cc):
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KTGEN_CC", cc)
    with pytest.raises(ktgen.CompilerError) as info:
        ktgen.compile(PROBE.replace(name="compile_no_cc"))
    message = str(info.value)
    assert re.search(r"install", message, re.I) and "C compiler" in message, message
    assert cc in message


def test_broken_compiler(monkeypatch, tmp_path):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary")
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KTGEN_CC", false)
    with pytest.raises(ktgen.CompilerError):
        ktgen.compile(PROBE.replace(name="compile_broken_cc"))


@pytest.mark.skipif("avx512" in isa_mod.available_tiers(), reason="this CPU has AVX-512")
def test_forcing_a_missing_tier_raises_isa_error(monkeypatch):
    spec = PROBE.replace(name="compile_isa")
    monkeypatch.delenv("KTGEN_EMULATE_AVX512", raising=False)  # native only, no software emulation
    monkeypatch.setenv("KTGEN_ISA", "avx512")
    with pytest.raises(ktgen.ISAError, match="avx512"):
        ktgen.compile(spec)
    monkeypatch.delenv("KTGEN_ISA")
    with pytest.raises(ktgen.ISAError, match="avx512"):
        ktgen.compile(spec.replace(isa="avx512"))


def test_unknown_tier_raises_isa_error(monkeypatch):
    monkeypatch.setenv("KTGEN_ISA", "sse9")
    with pytest.raises(ktgen.ISAError, match="sse9"):
        ktgen.compile(PROBE.replace(name="compile_isa"))


# The awkward spec's avx512 and amx builds, every mode, are in test_every_tier_and_mode_compiles
# below; this one builds Qwen3's sizes at tp_count 2 with bf16 LoRA and VNNI, at -O2.
def test_avx512_source_compiles_with_gcc(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    spec = qwen_spec("tp2-bf16")
    r = render(spec, ktgen.Target("avx512", {"vnni"}))
    (tmp_path / r.header_name).write_text(r.header)
    src = tmp_path / f"{spec.name}.c"
    src.write_text(r.source)
    cmd = [gcc, "-O2", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx512vnni",
           "-std=gnu11", "-Wall", "-I", str(tmp_path), "-c", str(src), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0
    # the object really holds AVX-512 code (zmm registers)
    objdump = shutil.which("objdump")
    if objdump:
        dis = subprocess.run([objdump, "-d", str(tmp_path / "k.o")], capture_output=True, text=True)
        assert "zmm" in dis.stdout


# Every tier in every quant mode, natively and (where it has one) emulated, compiles whatever
# this CPU runs: a template error in a path this CPU never builds shows here, not on the next
# machine's CI. (The emulated avx512 bf16 backward once called a function that only the native
# avx512 header defines: it failed to load on CPUs without AVX-512 and went unseen on CPUs
# with it.)
COMPILE_TARGETS = ([(t, (), False) for t in isa_mod.TIERS] + [("avx512", ("vnni",), False)]
                   + [(t, (), True) for t in isa_mod.EMULATION_VARS])


@pytest.mark.parametrize("mode", ["bf16", "int8", "awq", "k2"])
@pytest.mark.parametrize("tier,exts,emulate", COMPILE_TARGETS,
                         ids=[f"{t}{'+' + '+'.join(x) if x else ''}{'-emulated' if e else ''}"
                              for t, x, e in COMPILE_TARGETS])
def test_every_tier_and_mode_compiles(tmp_path, tier, exts, emulate, mode):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    quant = {"mode": mode} if mode in ("bf16", "int8") else {"mode": mode, "group_size": 32}
    spec = awkward_spec("float32").replace(quant=quant)
    target = ktgen.Target(tier, frozenset(exts), emulate=emulate)
    r = render(spec, target)
    (tmp_path / r.header_name).write_text(r.header)
    src = tmp_path / f"{spec.name}.c"
    src.write_text(r.source)
    # -O0: the fastest build that still inlines always_inline functions and checks intrinsics' targets
    flags = [f for f in target.cflags if not f.startswith("-O")]
    cmd = [gcc, "-O0", *flags, "-Wall", "-Wno-unused-function", "-Werror=implicit-function-declaration",
           "-I", str(tmp_path), "-c", str(src), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning:" not in proc.stderr, proc.stderr[-4000:]
    objdump = shutil.which("objdump")
    if objdump and not emulate and tier in ("avx512", "avx512bf16", "amx"):
        # the object really holds AVX-512 code (zmm registers)
        dis = subprocess.run([objdump, "-d", str(tmp_path / "k.o")], capture_output=True, text=True)
        assert "zmm" in dis.stdout


def test_rendering_is_pure(monkeypatch):
    spec = awkward_spec("float32")
    once = render(spec, "avx2")
    monkeypatch.setenv("KTGEN_ISA", "generic")  # the environment plays no part
    twice = render(spec, "avx2")
    assert once == twice
    sources = {t: render(spec, t).source for t in ALL_TIERS}
    assert len(set(sources.values())) == len(ALL_TIERS), "each tier renders its own source"
    assert render(awkward_spec("bfloat16"), "avx2").source != once.source
    assert render(awkward_spec(None), "avx2").source != once.source
    assert render(spec.replace(max_len=101), "avx2").source != once.source
    # the header documents the spec it was rendered for
    assert spec.name in once.header


# ---- the cache key covers every input of the build ----

def _key(spec) -> str:
    from ktgen import compiler, target
    t = target.select(spec)
    return compiler.cache_key(render(spec, t), t)


@pytest.mark.parametrize("var, value", [("CFLAGS", "-g"), ("CPPFLAGS", "-DKTGEN_PROBE=1"),
                                        ("LDFLAGS", "-Wl,-O1"), ("LDSHARED", "cc -shared -Wl,-O1")])
def test_build_environment_changes_the_cache_key(monkeypatch, var, value):
    """setuptools adds these to the compile or link line of a cffi build: a change must miss."""
    for name in BUILD_ENV:
        monkeypatch.delenv(name, raising=False)
    plain = _key(PROBE)
    monkeypatch.setenv(var, value)
    assert _key(PROBE) != plain, f"{var} is not in the cache key"
    monkeypatch.setenv(var, value + " ")
    assert len({plain, _key(PROBE)}) == 2


def test_every_word_of_the_compiler_command_is_in_the_cache_key(monkeypatch):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("KTGEN_CC", cc)
    plain = _key(PROBE)
    monkeypatch.setenv("KTGEN_CC", f"{cc} -O0")
    with_flag = _key(PROBE)
    monkeypatch.setenv("KTGEN_CC", f"{cc} -O1")
    assert len({plain, with_flag, _key(PROBE)}) == 3


def test_build_environment_reaches_the_build_and_misses_the_cache(probe, monkeypatch):
    """A real compile: the entry built without CFLAGS is not reused with them, and the build
    really reads them (a flag the compiler rejects fails it)."""
    first, _, cache_dir = probe
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache_dir))
    for name in BUILD_ENV:
        monkeypatch.delenv(name, raising=False)
    assert ktgen.compile(PROBE).cache_key == first.cache_key
    monkeypatch.setenv("CPPFLAGS", "-DKTGEN_PROBE=1")
    k = ktgen.compile(PROBE)
    assert k.compiled is True and k.cache_key != first.cache_key
    monkeypatch.setenv("CFLAGS", "-fktgen-no-such-option")
    with pytest.raises(ktgen.CompilerError, match="ktgen-no-such-option"):
        ktgen.compile(PROBE)


def test_the_compiler_command_reaches_the_build(probe, monkeypatch):
    _, _, cache_dir = probe
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("KTGEN_CC", f"{cc} -fktgen-no-such-option")
    with pytest.raises(ktgen.CompilerError, match="ktgen-no-such-option"):
        ktgen.compile(PROBE)


# ---- `ktgen cache clear` beside a build in flight (item 2) ----

SLOW_CC = """#!/bin/sh
# A C compiler that waits for $KTGEN_TEST_MARK/go before compiling (--version answers at once).
for a in "$@"; do [ "$a" = --version ] && exec {cc} "$@"; done
touch "$KTGEN_TEST_MARK/started"
while [ ! -e "$KTGEN_TEST_MARK/go" ]; do sleep 0.05; done
exec {cc} "$@"
"""


def test_cache_clear_leaves_a_build_in_flight_alone(tmp_path, monkeypatch, capsys):
    from ktgen import cli

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    cache, mark = tmp_path / "cache", tmp_path / "mark"
    mark.mkdir()
    slow_cc = tmp_path / "slow-cc"
    slow_cc.write_text(SLOW_CC.format(cc=cc))
    slow_cc.chmod(0o755)
    spec = PROBE.replace(name="compile_in_flight", isa="generic")
    env = child_env(cache)
    env.update(KTGEN_CC=str(slow_cc), KTGEN_TEST_MARK=str(mark))
    proc = subprocess.Popen(child_args(spec), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (mark / "started").exists():
            assert proc.poll() is None, f"the build ended early:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the build never reached the compiler"
            time.sleep(0.05)
        building = [p for p in cache.iterdir() if p.name.startswith(".build-")]
        locks = [p for p in cache.iterdir() if p.name.endswith(".lock")]
        (entry,) = entries(cache)
        assert building and locks
        # beside it: a finished entry of another spec and the build directory of a dead process
        done = cache / "other-0123456789abcdef0123"
        done.mkdir()
        (done / MANIFEST).write_text("{}")
        dead = cache / ".build-ghost-0123456789abcdef0123-x1y2"
        dead.mkdir()
        monkeypatch.setenv("KTGEN_CACHE_DIR", str(cache))
        assert cli.main(["cache", "clear"]) == 0
        out = capsys.readouterr().out
        assert "removed 1 cache entry" in out and entry.name in out
        assert not done.exists() and not dead.exists()
        assert entry.is_dir() and all(p.is_dir() for p in building) and all(p.exists() for p in locks)
    finally:
        (mark / "go").touch()
    stdout, stderr = proc.communicate(timeout=300)
    result = parse_child(stdout, stderr, proc.returncode)
    assert result["compiled"] is True and Path(result["path"]) == entry
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["key"] == result["key"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]


# ---- compiling leaves process state alone (item 3) ----

def test_compiling_leaves_the_cwd_and_the_environment_alone(tmp_path, monkeypatch):
    """One thread compiles while this one watches os.getcwd() and os.environ: neither changes."""
    monkeypatch.setenv("KTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    spec = PROBE.replace(name="compile_process_state", isa="generic")
    cwd, env = os.getcwd(), dict(os.environ)
    result = {}

    def build():
        try:
            result["kernel"] = ktgen.compile(spec)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    worker = threading.Thread(target=build)
    changes = []
    worker.start()
    while worker.is_alive():
        if os.getcwd() != cwd:
            changes.append(f"cwd {os.getcwd()}")
        now = dict(os.environ)
        if now != env:
            changes.append(f"environment {sorted(set(now.items()) ^ set(env.items()))}")
        time.sleep(0.0005)
    worker.join()
    assert "error" not in result, result.get("error")
    assert result["kernel"].compiled is True
    assert not changes, changes[:3]

"""Compiling and caching: (spec, target) -> rendered source -> compiled module -> loaded Kernel.

The target (ktgen.target) is chosen once, before anything is rendered. The cache key hashes
everything that changes the binary: the rendered source (which already depends on the spec, the
target and every template), the target (tier, extensions, emulation, the whole compiler command,
its identity, the flags, and CFLAGS/CPPFLAGS/LDFLAGS/LDSHARED as setuptools would read them), the
ktgen, cffi and Python versions. An entry is a directory holding the module, its sources and a
manifest written last; the manifest records the module's SHA-256, so a missing, truncated or
corrupt entry reads as a miss and is rebuilt.

cffi's build changes the working directory and reads the compiler from os.environ["CC"], both
process-wide; it runs in a child Python process instead, so that compiling leaves the caller's
working directory and environment alone. Builds of one key are serialized across processes with
a file lock (`<entry>.lock`, never deleted: a lock file removed while held stops excluding), and
inside one process with a thread lock. A hit imports without the lock; one whose entry is removed
(`ktgen cache clear`, which takes each entry's lock) before the import opens it is taken as a
miss, and a miss imports under the lock, so that a clear never makes a compile fail.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cffi
from filelock import FileLock, Timeout

from . import target as target_mod
from ._version import __version__
from .render import Rendered, render
from .files import write_atomic
from .settings import BUILD_ENV, settings
from .spec import MoESpec
from .target import BASE_FLAGS, LINK_FLAGS, SANITIZERS, Target  # noqa: F401 - BASE_FLAGS etc. re-exported

MANIFEST = "manifest.json"
BUILD_PREFIX = ".build-"   # in-progress build directories: .build-<entry name>-<random>
LOCK_SUFFIX = ".lock"

_build_lock = threading.Lock()
_loaded: dict[str, Any] = {}


class CompilerError(RuntimeError):
    """The C compiler is missing or failed."""


class CacheError(RuntimeError):
    """The kernel cache directory cannot be used."""


@dataclass
class Kernel:
    """A compiled kernel for one spec and target: `lib` holds the C functions, `ffi` their types."""

    spec: MoESpec
    target: Target
    cache_key: str
    path: Path
    ffi: Any = field(repr=False)
    lib: Any = field(repr=False)
    compiled: bool          # True when this call ran the compiler, False on a cache hit
    rendered: Rendered = field(repr=False)

    @property
    def isa(self) -> str:
        """The ISA tier (Kernel.isa of docs/design.md#the-python-api)."""
        return self.target.tier

    @property
    def isa_reason(self) -> str:
        return self.target.reason

    @property
    def emulated(self) -> bool:
        """The tier's vector (and tile) instructions run in software."""
        return self.target.emulate

    def fn(self, name: str):
        return getattr(self.lib, f"{self.rendered.prefix}_{name}")

    def error(self, code: int) -> str:
        return self.ffi.string(self.fn("error_string")(code)).decode()


@lru_cache(maxsize=8)
def compiler_identity(cc: str) -> str:
    """The compiler command as given (every word: `gcc -m32` is not `gcc`), the executable it
    resolves to and the first line of its --version."""
    words = shlex.split(cc)
    exe = shutil.which(words[0]) if words else None
    if exe is None:
        raise CompilerError(
            f"no C compiler found: {cc!r} is not on PATH. Install one (Debian/Ubuntu: "
            f"`apt-get install gcc`) or point KTGEN_CC at a C compiler."
        )
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompilerError(f"C compiler {cc!r} does not run: {exc}") from exc
    return f"{cc} -> {exe}: {out.stdout.splitlines()[0] if out.stdout else ''}"


def target_flags(target: Target) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The target's (compile, link) flags; an unknown sanitizer is a CompilerError."""
    try:
        return target.cflags, target.ldflags
    except target_mod.SanitizerError as exc:
        raise CompilerError(str(exc)) from None


def cache_key(rendered: Rendered, target: Target) -> str:
    cflags, ldflags = target_flags(target)
    payload = {
        "source": rendered.source,
        "header": rendered.header,
        "tier": target.tier,
        "extensions": sorted(target.extensions),
        "emulate": target.emulate,
        "flags": cflags,
        "link": ldflags,
        "cc": target.cc,
        "compiler": compiler_identity(target.cc),
        # setuptools reads these while cffi builds: they change the binary as much as our flags
        "build_env": {name: value for name, value in target.build_env},
        "ktgen": __version__,
        "cffi": cffi.__version__,
        "python": sysconfig.get_config_var("EXT_SUFFIX") or sys.version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(entry: Path, key: str) -> dict | None:
    """The entry's manifest when the entry is complete and intact, else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        module = entry / manifest["module_file"]
        if manifest.get("key") != key or _sha256(module) != manifest["sha256"]:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Runs in a child interpreter (python -c): builds one cffi module from a job file. -c rather than
# a script path, so that no directory of ktgen's own modules lands on the child's sys.path.
_BUILD_SCRIPT = """
import json, sys
import cffi
job = json.load(open(sys.argv[1]))
ffi = cffi.FFI()
ffi.cdef(job["cdef"])
ffi.set_source(job["module"], job["source"], include_dirs=job["include_dirs"],
               extra_compile_args=job["cflags"], extra_link_args=job["ldflags"])
print("KTGEN_BUILT " + ffi.compile(tmpdir=job["tmpdir"], verbose=False))
"""


def build_environment(target: Target) -> dict[str, str]:
    """The environment of the build: the caller's, with CC the target's compiler and the
    BUILD_ENV variables exactly as the target recorded them."""
    env = {k: v for k, v in os.environ.items() if k not in BUILD_ENV}
    env.update(target.build_env)
    env["CC"] = target.cc
    return env


def _compile_module(rendered: Rendered, module_name: str, target: Target, workdir: Path) -> Path:
    (workdir / rendered.header_name).write_text(rendered.header)
    cflags, ldflags = target_flags(target)
    return build_cffi_module(module_name, rendered.cdef, rendered.source, target, workdir, cflags, ldflags)


def build_cffi_module(module_name: str, cdef: str, source: str, target: Target, workdir: Path,
                      cflags: tuple[str, ...], ldflags: tuple[str, ...]) -> Path:
    """Build a cffi module in `workdir` with the target's compiler and build environment, in a
    child process (the caller's cwd and os.environ stay as they are); the built file's path."""
    job = workdir / "job.json"
    job.write_text(json.dumps({
        "cdef": cdef, "module": module_name, "source": source,
        "include_dirs": [str(workdir)], "cflags": list(cflags), "ldflags": list(ldflags),
        "tmpdir": str(workdir),
    }))
    try:
        proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(job)], cwd=workdir,
                              env=build_environment(target), capture_output=True, text=True)
    except OSError as exc:
        raise CompilerError(f"compiling {module_name}: cannot start {sys.executable}: {exc}") from exc
    built = [line[len("KTGEN_BUILT "):] for line in proc.stdout.splitlines() if line.startswith("KTGEN_BUILT ")]
    if proc.returncode != 0 or not built:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise CompilerError(f"compiling {module_name} with {target.cc!r} failed "
                            f"(exit {proc.returncode}):\n{tail}")
    return Path(built[-1])


def _import(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensure_cache_dir(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the kernel cache directory {cache_dir} (KTGEN_CACHE_DIR): {exc}") from exc
    if not os.access(cache_dir, os.W_OK):
        raise CacheError(f"the kernel cache directory {cache_dir} (KTGEN_CACHE_DIR) is not writable")


def compile(spec: MoESpec, isa: str | Target | None = None) -> Kernel:  # noqa: A001 - the public name
    """Render, compile (or find in the cache) and load the kernel of `spec`. `isa`: a Target
    (used as it is), or a tier name; default KTGEN_ISA, else the spec's isa (ktgen.target.select)."""
    if not isinstance(spec, MoESpec):
        raise TypeError(f"spec: expected a ktgen.MoESpec, got {type(spec).__name__}")
    target = target_mod.select(spec, isa)
    cfg = settings()
    rendered = render(spec, target)
    key = cache_key(rendered, target)
    module_name = f"_ktgen_{spec.name}_{key[:20]}"
    entry = cfg.cache_dir / f"{spec.name}-{key[:20]}"

    with _build_lock:
        module, compiled = _loaded.get(key), False
        if module is None:
            module, compiled = load_entry(entry, key, module_name, lambda: _build_entry(
                rendered, spec, target, key, module_name, entry))
            _loaded[key] = module
    return Kernel(spec, target, key, entry, module.ffi, module.lib, compiled, rendered)


def load_entry(entry: Path, key: str, module_name: str, build) -> tuple[Any, bool]:
    """(the module of cache entry `entry`, whether build() ran to write it). A complete entry is
    imported without its lock (a cache on a read-only filesystem still loads); a miss, or a hit
    whose entry went (`ktgen cache clear`) before its import opened it, builds the entry if need
    be and imports it under the entry's lock, which clear_cache respects."""
    manifest = _read_manifest(entry, key)
    if manifest is not None:
        try:
            return _import(module_name, entry / manifest["module_file"]), False
        except (ImportError, OSError):
            pass
    _ensure_cache_dir(entry.parent)
    with FileLock(str(_lock_path(entry))):
        manifest = _read_manifest(entry, key)  # another process may have built it
        built = manifest is None
        if built:
            manifest = build()
        return _import(module_name, entry / manifest["module_file"]), built


def _lock_path(entry: Path) -> Path:
    return entry.parent / f"{entry.name}{LOCK_SUFFIX}"


def _build_entry(rendered, spec, target: Target, key, module_name, entry: Path) -> dict:
    entry.mkdir(parents=True, exist_ok=True)
    (entry / MANIFEST).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f"{BUILD_PREFIX}{entry.name}-") as tmp:
        started = time.perf_counter()
        built = _compile_module(rendered, module_name, target, Path(tmp))
        module_file = built.name
        write_atomic(entry / module_file, built.read_bytes(), fsync=True)
    write_atomic(entry / rendered.header_name, rendered.header.encode(), fsync=True)
    write_atomic(entry / f"{spec.name}.c", rendered.source.encode(), fsync=True)
    manifest = {
        "key": key,
        "module": module_name,
        "module_file": module_file,
        "sha256": _sha256(entry / module_file),
        "spec": spec.name,
        "tier": target.tier,
        "target": target.name + (" (emulated)" if target.emulate else ""),
        "flags": list(target_flags(target)[0]),
        "build_env": dict(target.build_env),
        "compiler": compiler_identity(target.cc),
        "ktgen": __version__,
        "build_seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_atomic(entry / MANIFEST, json.dumps(manifest, indent=2).encode(), fsync=True)
    return manifest


def cache_entries() -> list[dict]:
    """Complete entries of the cache directory, with their size in bytes."""
    root = settings().cache_dir
    out = []
    if not root.is_dir():
        return out
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {"spec": entry.name, "tier": "?", "incomplete": True}
        manifest["path"] = str(entry)
        manifest["bytes"] = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        out.append(manifest)
    return out


def _entry_of_build_dir(name: str) -> str:
    """.build-<entry name>-<random> -> <entry name> (tempfile's random part has no '-')."""
    return name[len(BUILD_PREFIX):].rsplit("-", 1)[0]


def clear_cache() -> tuple[int, list[str]]:
    """Remove the cache's entries and leftover build directories, except those of builds in
    flight. Returns (entries removed, names of entries left because a build holds their lock).

    Each entry goes under its lock, taken without waiting: a lock another process (or thread)
    holds means a build is writing that entry or its .build-* directory, so both stay. Lock
    files always stay: a lock file deleted while a build holds or waits on it would let a
    second build of the same entry start beside the first."""
    root = settings().cache_dir
    if not root.is_dir():
        return 0, []
    removed, in_flight = 0, []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        is_build = p.name.startswith(BUILD_PREFIX)
        if p.name.startswith(".") and not is_build:
            continue
        entry = root / (_entry_of_build_dir(p.name) if is_build else p.name)
        lock = FileLock(str(_lock_path(entry)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not is_build:
                in_flight.append(p.name)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            lock.release()
        removed += not is_build
    return removed, in_flight

"""Compiling and caching: spec -> rendered source -> compiled module -> loaded Kernel.

The cache key hashes everything that changes the binary: the rendered source (which already
depends on the spec, the tier and every template), the compiler's identity and flags, the
ktgen, cffi and Python versions. An entry is a directory holding the module, its sources and
a manifest written last; the manifest records the module's SHA-256, so a missing, truncated
or corrupt entry reads as a miss and is rebuilt. Builds of one key are serialized across
processes with a file lock, and inside one process with a thread lock, because cffi changes
the working directory while it compiles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
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
from filelock import FileLock

from . import isa as isa_mod
from ._version import __version__
from .render import Rendered, render
from .settings import settings
from .spec import MoESpec

# -Wno-aggressive-loop-optimizations: GCC warns about vector loops over the fixed-size
# rank-R accumulators that it has already proven never run; the noise hides real warnings.
# -ffp-contract=off: a * b + c in plain C is rounded twice on every tier, so scalar code gives
# the same bits whatever the target ISA (the emulated amx tier relies on it); explicit FMA
# intrinsics stay fused.
BASE_FLAGS = ("-O3", "-std=gnu11", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC",
              "-ffp-contract=off", "-Wno-aggressive-loop-optimizations")
LINK_FLAGS = ("-fopenmp",)
MANIFEST = "manifest.json"

_build_lock = threading.Lock()
_loaded: dict[str, Any] = {}


class CompilerError(RuntimeError):
    """The C compiler is missing or failed."""


class CacheError(RuntimeError):
    """The kernel cache directory cannot be used."""


@dataclass
class Kernel:
    """A compiled kernel for one spec and tier: `lib` holds the C functions, `ffi` their types."""

    spec: MoESpec
    isa: str
    isa_reason: str
    cache_key: str
    path: Path
    ffi: Any = field(repr=False)
    lib: Any = field(repr=False)
    compiled: bool          # True when this call ran the compiler, False on a cache hit
    rendered: Rendered = field(repr=False)
    emulated: bool = False  # the tier's vector (and tile) instructions run in software

    def fn(self, name: str):
        return getattr(self.lib, f"{self.rendered.prefix}_{name}")

    def error(self, code: int) -> str:
        return self.ffi.string(self.fn("error_string")(code)).decode()


@lru_cache(maxsize=8)
def compiler_identity(cc: str) -> str:
    exe = shutil.which(cc.split()[0])
    if exe is None:
        raise CompilerError(
            f"no C compiler found: {cc!r} is not on PATH. Install one (Debian/Ubuntu: "
            f"`apt-get install gcc`) or point KTGEN_CC at a C compiler."
        )
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompilerError(f"C compiler {cc!r} does not run: {exc}") from exc
    return f"{exe}: {out.stdout.splitlines()[0] if out.stdout else ''}"


SANITIZERS = ("address", "undefined")


def sanitize_flags(sanitize: tuple[str, ...]) -> tuple[str, ...]:
    """Compile and link flags of a KTGEN_SANITIZE build. An ASan kernel loads only into a process
    started with the ASan runtime preloaded (LD_PRELOAD=$(gcc -print-file-name=libasan.so))."""
    unknown = [s for s in sanitize if s not in SANITIZERS]
    if unknown:
        raise CompilerError(f"KTGEN_SANITIZE: unknown sanitizer(s) {', '.join(unknown)}; "
                            f"supported: {', '.join(SANITIZERS)}")
    if not sanitize:
        return ()
    # -O1, ASan's usual level: the sanitizers see the same code and it builds several times faster.
    return (f"-fsanitize={','.join(sanitize)}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
            "-g", "-O1")


def build_flags(tier: str, sanitize: tuple[str, ...] = (), emulate: bool = False) -> tuple[str, ...]:
    return BASE_FLAGS + isa_mod.compile_flags(tier, emulate=emulate) + sanitize_flags(sanitize)


def cache_key(rendered: Rendered, tier: str, flags: tuple[str, ...], cc: str) -> str:
    payload = {
        "source": rendered.source,
        "header": rendered.header,
        "tier": tier,
        "flags": flags,
        "link": link_flags(flags),
        "compiler": compiler_identity(cc),
        "ktgen": __version__,
        "cffi": cffi.__version__,
        "python": sysconfig.get_config_var("EXT_SUFFIX") or sys.version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def link_flags(flags: tuple[str, ...]) -> tuple[str, ...]:
    return LINK_FLAGS + tuple(f for f in flags if f.startswith("-fsanitize"))


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


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compile_module(rendered: Rendered, module_name: str, flags: tuple[str, ...], cc: str, workdir: Path) -> Path:
    (workdir / rendered.header_name).write_text(rendered.header)
    ffi = cffi.FFI()
    ffi.cdef(rendered.cdef)
    ffi.set_source(
        module_name,
        rendered.source,
        include_dirs=[str(workdir)],
        extra_compile_args=list(flags),
        extra_link_args=list(link_flags(flags)),
    )
    old_cc = os.environ.get("CC")
    os.environ["CC"] = cc
    try:
        return Path(ffi.compile(tmpdir=str(workdir), verbose=False))
    except Exception as exc:  # distutils raises its own CompileError / LinkError types
        raise CompilerError(f"compiling {module_name} with {cc!r} failed: {exc}") from exc
    finally:
        if old_cc is None:
            os.environ.pop("CC", None)
        else:
            os.environ["CC"] = old_cc


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


def compile(spec: MoESpec, isa: str | None = None) -> Kernel:  # noqa: A001 - the public name (§4)
    """Render, compile (or find in the cache) and load the kernel of `spec`."""
    cfg = settings()
    requested = isa or cfg.isa or spec.isa
    try:
        tier, reason = isa_mod.choose(requested, emulated=cfg.emulate)
    except isa_mod.ISAError as exc:
        source = "isa argument" if isa else "KTGEN_ISA" if cfg.isa else f"spec {spec.name}'s isa"
        raise isa_mod.ISAError(f"{source} {requested!r}: {exc}") from exc
    emulate = tier in cfg.emulate
    rendered = render(spec, tier, vnni=isa_mod.has_vnni(tier), emulate=emulate)
    flags = build_flags(tier, cfg.sanitize, emulate)
    key = cache_key(rendered, tier, flags, cfg.cc)
    module_name = f"_ktgen_{spec.name}_{key[:20]}"
    entry = cfg.cache_dir / f"{spec.name}-{key[:20]}"

    compiled = False
    with _build_lock:
        module = _loaded.get(key)
        if module is None:
            manifest = _read_manifest(entry, key)
            if manifest is None:
                _ensure_cache_dir(cfg.cache_dir)
                with FileLock(str(cfg.cache_dir / f"{entry.name}.lock")):
                    manifest = _read_manifest(entry, key)  # another process may have built it
                    if manifest is None:
                        manifest = _build_entry(rendered, spec, tier, flags, cfg.cc, key, module_name, entry)
                        compiled = True
            module = _import(module_name, entry / manifest["module_file"])
            _loaded[key] = module
    return Kernel(spec, tier, reason, key, entry, module.ffi, module.lib, compiled, rendered, emulate)


def _build_entry(rendered, spec, tier, flags, cc, key, module_name, entry: Path) -> dict:
    entry.mkdir(parents=True, exist_ok=True)
    (entry / MANIFEST).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".build-{entry.name}-") as tmp:
        started = time.perf_counter()
        built = _compile_module(rendered, module_name, flags, cc, Path(tmp))
        module_file = built.name
        _atomic_write(entry / module_file, built.read_bytes())
    _atomic_write(entry / rendered.header_name, rendered.header.encode())
    _atomic_write(entry / f"{spec.name}.c", rendered.source.encode())
    manifest = {
        "key": key,
        "module": module_name,
        "module_file": module_file,
        "sha256": _sha256(entry / module_file),
        "spec": spec.name,
        "tier": tier,
        "flags": list(flags),
        "compiler": compiler_identity(cc),
        "ktgen": __version__,
        "build_seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _atomic_write(entry / MANIFEST, json.dumps(manifest, indent=2).encode())
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


def clear_cache() -> int:
    """Remove every entry of the cache directory; returns how many were removed."""
    root = settings().cache_dir
    if not root.is_dir():
        return 0
    removed = 0
    for p in root.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        else:
            p.unlink(missing_ok=True)
    return removed

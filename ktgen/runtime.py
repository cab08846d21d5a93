"""The Python runtime (docs/design.md#the-python-api): argument checks, saved-forward slots,
TP split and merge.

Every array is checked (dtype, shape, C-contiguity, expert id range, T) before a pointer
reaches C; outputs are allocated here, so the kernel never writes into a buffer of the
caller's choosing except the LoRA gradient arrays it also allocates. Each TP partition is
its own C context with its own thread team; partitions run concurrently from Python
threads (cffi releases the GIL during every kernel call).

A MoE runs one call at a time: each public call that reaches the kernels holds the MoE's call
lock, so that calls from several threads take turns (a set_lora waits for the forward that is
running, which computes with one LoRA throughout), and none is refused as busy by a context.
A saved forward dropped while a call runs is given back by the next call. After close(),
every such call raises MoEClosedError and changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import numa, packed, quant
from .pool import POOL
from .compiler import Kernel, compile as compile_kernel
from .render import load_params
from .spec import LORA_NAMES, MoESpec  # noqa: F401 - LORA_NAMES is part of this module's API
from .target import Target

bfloat16 = np.dtype(ml_dtypes.bfloat16)
logger = logging.getLogger("ktgen")
ERR_BUSY, ERR_PACKED_SIZE = 12, 13   # api.h error codes the runtime acts on


class CacheFullError(RuntimeError):
    """Every saved-forward slot (max_cache_depth) is taken."""


class MoEClosedError(RuntimeError):
    """A call on a MoE after its close()."""


class KernelError(RuntimeError):
    """A kernel returned an error code (`code`)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class LoRAWeights:
    """The six LoRA matrices of a layer (shapes of docs/design.md#the-math, stacked over
    experts, dtype lora.dtype)."""

    gate_a: np.ndarray  # [E, r, H]
    gate_b: np.ndarray  # [E, I, r]
    up_a: np.ndarray    # [E, r, H]
    up_b: np.ndarray    # [E, I, r]
    down_a: np.ndarray  # [E, r, I]
    down_b: np.ndarray  # [E, H, r]

    @staticmethod
    def shapes(spec: MoESpec) -> dict[str, tuple[int, ...]]:
        E, H, I, r = spec.expert_num, spec.hidden_size, spec.intermediate_size, spec.lora.rank
        return {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H),
                "up_b": (E, I, r), "down_a": (E, r, I), "down_b": (E, H, r)}

    @classmethod
    def zeros(cls, spec: MoESpec) -> "LoRAWeights":
        dtype = lora_dtype(spec)
        return cls(**{n: np.zeros(s, dtype) for n, s in cls.shapes(spec).items()})

    @classmethod
    def random(cls, spec: MoESpec, rng: np.random.Generator, std: float = 0.02) -> "LoRAWeights":
        dtype = lora_dtype(spec)
        return cls(**{n: (rng.standard_normal(s, np.float32) * std).astype(dtype)
                      for n, s in cls.shapes(spec).items()})

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, n) for n in LORA_NAMES)


@dataclass
class Grads:
    """Gradients of one backward. LoRA gradients are None when the spec has no LoRA."""

    input: np.ndarray            # bf16 [T, H]
    routing_weights: np.ndarray  # float32 [T, k]
    gate_a: np.ndarray | None = None
    gate_b: np.ndarray | None = None
    up_a: np.ndarray | None = None
    up_b: np.ndarray | None = None
    down_a: np.ndarray | None = None
    down_b: np.ndarray | None = None


def lora_dtype(spec: MoESpec) -> np.dtype:
    return bfloat16 if spec.lora and spec.lora.dtype == "bfloat16" else np.dtype(np.float32)


def check_array(name: str, a, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """`a` itself when it is a C-contiguous ndarray of `dtype` and `shape`, else ValueError."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    dtypes = tuple(np.dtype(d) for d in dtypes)
    want = " or ".join(str(d) for d in dtypes)
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray of dtype {want} and shape {shape}, "
                         f"got {type(a).__name__}")
    if a.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {want}, got {a.dtype} (shape {a.shape})")
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape} (dtype {a.dtype})")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {a.strides} "
                         f"for shape {a.shape}; pass numpy.ascontiguousarray({name})")
    return a


def _copy(w):
    """A copy of a bf16 array or of QuantizedWeights that owns its memory."""
    if isinstance(w, np.ndarray):
        return np.array(w)
    return quant.QuantizedWeights(w.mode, np.array(w.q), np.array(w.scales),
                                  None if w.zeros is None else np.array(w.zeros), w.shape, w.group_size)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """How many processes of one job share this host: LOCAL_WORLD_SIZE, as torchrun and other
    launchers set it (1 when unset or not a positive integer)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_threads(tp_count: int) -> int:
    """Threads per partition when the spec sets none: the usable cores over tp_count, shared
    among the host's processes (local_processes) unless the launcher already gave each process
    cores of its own (an affinity mask narrower than the machine)."""
    cores = usable_cores()
    procs = local_processes()
    if procs > 1 and cores >= (os.cpu_count() or cores):
        cores //= procs
    return max(1, cores // tp_count)


def _pin(cpus: list[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # this thread only; the OpenMP team it starts inherits it


class SavedForward:
    """What forward_train saved for backward: a slot of the MoE, given back by backward or
    when this object is dropped."""

    def __init__(self, moe: "MoE", slot: int, tokens: int):
        self._moe_id = id(moe)
        self.slot = slot
        self.tokens = tokens
        self._finalizer = weakref.finalize(self, moe._drop_slot, slot)

    @property
    def consumed(self) -> bool:
        return not self._finalizer.alive


class MoE:
    """One MoE layer with frozen base weights and (optionally) LoRA adapters."""

    def __init__(self, spec: MoESpec, gate, up, down, lora: LoRAWeights | None = None,
                 isa: str | Target | None = None):
        """isa: the target to compile for, a ktgen.Target or a tier name (default: KTGEN_ISA,
        else spec.isa; see ktgen.target.select)."""
        if not isinstance(spec, MoESpec):
            raise TypeError(f"spec: expected a ktgen.MoESpec, got {type(spec).__name__}")
        E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
        weights = {name: self._base_weights(spec, name, w, (E, H, I) if name == "down" else (E, I, H))
                   for name, w in (("gate", gate), ("up", up), ("down", down))}
        self._start(spec, isa)
        self._load(weights)
        del weights  # the kernels hold their own copy; nothing else is kept
        self._finish(lora)

    @classmethod
    def from_packed(cls, path, spec: MoESpec | None = None, *, lora: LoRAWeights | None = None,
                    isa: str | Target | None = None, experts: range | None = None) -> "MoE":
        """A layer whose base weights come from a packed weight file (MoE.save_packed, `ktgen
        pack`). When this tier's packed layout is the file's, the kernels compute straight from a
        read-only mapping of it: no copy, and the processes of one host share its pages.
        Otherwise the weights are unpacked exactly and packed for this tier, which is logged.
        spec: the file's own (default), or one with other runtime fields (lora, max_len, tp_count,
        threads, ...) for the same weights. experts: a run of the file's experts, the only ones
        this layer holds (expert parallelism: spec.expert_num is then their count)."""
        f = packed.PackedFile(path)
        spec = f.check_spec(spec, experts)
        self = cls.__new__(cls)
        self._start(spec, isa)
        layout = self.packed_layout
        if layout == packed.layout_for(f.layout, spec.expert_num):
            ffi = self.kernel.ffi
            for p, part in enumerate(self._parts):
                views = f.views(p, experts)
                ptrs = [ffi.NULL if v is None else self._ptr(v, "void *") for v in views]
                sizes = [0 if v is None else v.size for v in views]
                try:
                    self._call("attach_packed", part, ptrs, sizes)
                except KernelError as err:
                    if err.code != ERR_PACKED_SIZE:
                        raise
                    raise packed.PackedFileError(f"{f.path}: its buffers are not the sizes the "
                                                 f"{self.kernel.isa} kernels read ({err})") from None
            self._mapped = f   # the kernels read its pages: kept as long as they are
        else:
            logger.warning("ktgen: %s was packed as %r (tier %s); the %s tier packs as %r, so "
                           "its weights are repacked in memory, not mapped", f.path, f.layout,
                           f.tier, self.kernel.isa, layout)
            gate, up, down = f.unpack()
            f.close()
            if experts is not None:
                gate, up, down = (w[experts.start:experts.stop] if isinstance(w, np.ndarray)
                                  else w.expert_slice(experts.start, experts.stop) for w in (gate, up, down))
            self._load({"gate": gate, "up": up, "down": down})
        self._finish(lora)
        return self

    def _start(self, spec: MoESpec, isa) -> None:
        """Compile the kernel and create each partition's context (no weights yet)."""
        if isa is not None and not isinstance(isa, (str, Target)):
            raise TypeError(f"isa: expected a tier name (str) or a ktgen.Target, got {type(isa).__name__}")
        self.spec = spec
        self._mapped = None
        self._call_lock = threading.Lock()   # one call at a time (_running)
        self._closed = False
        self._dropped: list[int] = []        # slots of saved forwards dropped while a call ran
        self.kernel: Kernel = compile_kernel(spec, isa)
        self.threads = spec.threads or default_threads(spec.tp_count)
        # One thread per partition when there are several, pinned to its NUMA node when the
        # machine has more than one: every call of partition p runs there (see ktgen.numa).
        self._runners = [ThreadPoolExecutor(1, initializer=_pin, initargs=(numa.partition_cpus(p),))
                         for p in range(spec.tp_count)] if spec.tp_count > 1 else None
        k = self.kernel
        self._parts = []
        for p in range(spec.tp_count):
            out = k.ffi.new(f"{k.rendered.prefix} **")
            self._call("create", out, p, self.threads)
            self._parts.append(k.ffi.gc(out[0], k.fn("destroy")))

    def _load(self, weights: dict) -> None:
        """Pack the weights (bf16 arrays or QuantizedWeights by projection name) into every
        partition's context."""
        args = []
        for ctype, name in load_params(self.spec.quant.mode):
            matrix, _, field = name.partition("_")
            w = weights[matrix]
            a = w if not field else {"q": w.q, "s": w.scales, "z": w.zeros}[field]
            args.append(self._ptr(a, ctype))
        self._each_partition(lambda p, part: self._call("load_weights", part, *args))

    def _finish(self, lora) -> None:
        spec = self.spec
        self._slot_lock = threading.Lock()
        self._free_slots = list(range(spec.max_cache_depth))
        self.lora: LoRAWeights | None = None
        if spec.lora is None:
            if lora is not None:
                raise ValueError(f"lora: spec {spec.name} has no LoRA (lora: null), but LoRA weights were given")
        else:
            self.set_lora(lora if lora is not None else LoRAWeights.zeros(spec))

    @staticmethod
    def _base_weights(spec: MoESpec, name: str, w, shape: tuple[int, int, int]):
        """The array load_weights reads for one projection: bf16 as given, or quantized
        (docs/design.md#base-weight-formats)."""
        q = spec.quant
        if isinstance(w, quant.QuantizedWeights):
            if w.mode != q.mode:
                raise ValueError(f"{name}: pre-quantized {w.mode} weights given to a spec with "
                                 f"quant.mode {q.mode!r}")
            if w.group_size != q.group_size:
                raise ValueError(f"{name}: group_size {w.group_size} does not match the spec's "
                                 f"quant.group_size {q.group_size}")
            if w.shape != shape:
                raise ValueError(f"{name}: expected quantized weights of shape {shape}, got {w.shape}")
            return w
        w = check_array(name, w, bfloat16, shape)
        return w if q.mode == "bf16" else quant.quantize(w, q.mode, q.group_size)

    # ---- plumbing ----
    @contextlib.contextmanager
    def _running(self):
        """Hold the call lock for one public call: refused once closed; the slots of saved
        forwards dropped meanwhile are given back first."""
        with self._call_lock:
            if self._closed:
                raise MoEClosedError(f"MoE of spec {self.spec.name} is closed (close() was called): "
                                     f"build a new one")
            self._release_dropped()
            yield

    def _release_dropped(self) -> None:
        with self._slot_lock:
            dropped, self._dropped = self._dropped, []
        for slot in dropped:
            try:
                self._release_slot(slot)
            except KernelError as exc:
                warnings.warn(str(exc), RuntimeWarning, stacklevel=3)

    def _ptr(self, a: np.ndarray, ctype: str):
        return self.kernel.ffi.cast(ctype, a.ctypes.data)

    def _call(self, name: str, *args) -> None:
        rc = self.kernel.fn(name)(*args)
        if rc != 0:
            raise KernelError(f"{self.kernel.rendered.prefix}_{name}: {self.kernel.error(rc)} (code {rc})", rc)

    def _each_partition(self, fn) -> list:
        """fn(p, part) for every partition, each on its own thread when there are several."""
        if self._runners is None:
            return [fn(0, self._parts[0])]
        futures = [r.submit(fn, p, part) for p, (r, part) in enumerate(zip(self._runners, self._parts))]
        wait(futures)  # every partition finishes before a failure of one is raised
        return [f.result() for f in futures]

    def _lora_ctype(self) -> str:
        return "uint16_t *" if lora_dtype(self.spec) == bfloat16 else "float *"

    # ---- public API ----
    def set_lora(self, lora: LoRAWeights) -> None:
        """Use the caller's LoRA arrays in place (zero-copy): an in-place update is seen by the
        next forward with no other call. Waits for a call that is running."""
        with self._running():
            self._set_lora(lora)

    def _set_lora(self, lora: LoRAWeights) -> None:
        spec = self.spec
        if spec.lora is None:
            raise ValueError(f"lora: spec {spec.name} has no LoRA (lora: null)")
        if not isinstance(lora, LoRAWeights):
            raise TypeError(f"lora: expected a ktgen.LoRAWeights, got {type(lora).__name__}")
        dtype = lora_dtype(spec)
        for name, shape in LoRAWeights.shapes(spec).items():
            check_array(f"lora.{name}", getattr(lora, name), dtype, shape)
        ptrs = [self._ptr(a, self._lora_ctype()) for a in lora.arrays()]
        for part in self._parts:
            self._call("set_lora", part, *ptrs)
        self.lora = lora  # keeps the arrays alive while the kernel points at them

    def _check_inputs(self, x, expert_ids, routing_weights):
        spec = self.spec
        if not isinstance(x, np.ndarray) or x.ndim != 2:
            raise ValueError(f"x: expected a 2-D bf16 array [T, {spec.hidden_size}], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        T = x.shape[0]
        if T > spec.max_len:
            raise ValueError(f"x: T = {T} tokens exceeds the spec's max_len = {spec.max_len}")
        check_array("x", x, bfloat16, (T, spec.hidden_size))
        k = spec.num_experts_per_tok
        check_array("expert_ids", expert_ids, (np.int32, np.int64), (T, k))
        check_array("routing_weights", routing_weights, np.float32, (T, k))
        if T:
            lo, hi = int(expert_ids.min()), int(expert_ids.max())
            if lo < -1 or hi >= spec.expert_num:
                bad = lo if lo < -1 else hi
                raise ValueError(f"expert_ids: id {bad} is outside -1 .. {spec.expert_num - 1} "
                                 f"(expert_num = {spec.expert_num}; -1 skips a slot)")
        return T, np.ascontiguousarray(expert_ids, dtype=np.int32)

    def _forward(self, x, expert_ids, routing_weights, slot: int) -> np.ndarray:
        T, ids = self._check_inputs(x, expert_ids, routing_weights)
        H = self.spec.hidden_size
        partials = [POOL.empty((T, H), np.float32) for _ in self._parts]
        xp, idp = self._ptr(x, "uint16_t *"), self._ptr(ids, "int32_t *")
        rwp = self._ptr(routing_weights, "float *")

        def run(p, part):
            self._call("forward", part, T, xp, idp, rwp, self._ptr(partials[p], "float *"), slot)

        self._each_partition(run)
        return self._to_bf16(self._merge(partials))

    @staticmethod
    def _merge(partials: list[np.ndarray]) -> np.ndarray:
        total = partials[0]
        for extra in partials[1:]:
            total += extra  # fp32, in partition order: deterministic
        return total

    def _to_bf16(self, a: np.ndarray) -> np.ndarray:
        out = POOL.empty(a.shape, bfloat16)
        self._call("to_bf16", self._parts[0], a.size, self._ptr(a, "float *"), self._ptr(out, "uint16_t *"))
        return out

    def forward(self, x, expert_ids, routing_weights) -> np.ndarray:
        """out bf16 [T, H] (docs/design.md#the-math); nothing is saved."""
        with self._running():
            return self._forward(x, expert_ids, routing_weights, -1)

    def forward_train(self, x, expert_ids, routing_weights) -> tuple[np.ndarray, SavedForward]:
        """out, and the saved forward that backward needs (takes one of max_cache_depth slots)."""
        with self._running():
            return self._forward_train(x, expert_ids, routing_weights)

    def _forward_train(self, x, expert_ids, routing_weights) -> tuple[np.ndarray, SavedForward]:
        with self._slot_lock:
            if not self._free_slots:
                raise CacheFullError(
                    f"all max_cache_depth = {self.spec.max_cache_depth} saved-forward slots of "
                    f"{self.spec.name} are taken: run backward (or drop a saved forward) first, "
                    f"or raise max_cache_depth")
            slot = self._free_slots.pop(0)
        try:
            out = self._forward(x, expert_ids, routing_weights, slot)
        except BaseException:
            self._release_slot(slot)
            raise
        return out, SavedForward(self, slot, x.shape[0])

    def _release_slot(self, slot: int, kernel_released: bool = False) -> None:
        """Give a slot back: the kernel's release on every partition, then the free list.
        kernel_released: a backward that succeeded on every partition released it already (api.h).
        A release that fails raises KernelError and keeps the slot out of use, since the kernel
        may still hold it."""
        if not kernel_released:
            errors = []
            for p, part in enumerate(self._parts):
                rc = self.kernel.fn("release")(part, slot)
                if rc != 0:
                    errors.append(f"partition {p}: {self.kernel.error(rc)} (code {rc})")
            if errors:
                raise KernelError(f"{self.kernel.rendered.prefix}_release of saved-forward slot {slot} "
                                  f"failed ({'; '.join(errors)}); the slot stays out of use")
        with self._slot_lock:
            if slot not in self._free_slots:
                self._free_slots.append(slot)
                self._free_slots.sort()

    def _drop_slot(self, slot: int) -> None:
        """The finalizer of a SavedForward dropped without a backward (nobody to raise to): its
        slot is given back now, or by the next call when one is running (maybe in this very
        thread: a finalizer never waits for the call lock)."""
        with self._slot_lock:
            self._dropped.append(slot)
        if self._call_lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._release_dropped()
            finally:
                self._call_lock.release()

    def backward(self, saved: SavedForward, grad_out) -> Grads:
        """Gradients of the input, the routing weights and the LoRA matrices (docs/design.md,
        "The math"). An argument rejected here, before any kernel runs, leaves `saved` usable,
        and so does a backward every partition refused as busy (ERR_BUSY: nothing ran); once the
        kernels run, its slot is given back whether they succeed or fail (api.h: backward
        releases the slot), and a failure raises KernelError."""
        if not isinstance(saved, SavedForward) or saved._moe_id != id(self):
            raise ValueError("saved: expected the SavedForward returned by this MoE's forward_train")
        with self._running():
            if saved.consumed:
                raise ValueError("saved: this saved forward was already used by a backward (or released)")
            return self._backward(saved, grad_out)

    def _backward(self, saved: SavedForward, grad_out) -> Grads:
        spec = self.spec
        T, H, k = saved.tokens, spec.hidden_size, spec.num_experts_per_tok
        check_array("grad_out", grad_out, bfloat16, (T, H))
        tp = len(self._parts)
        grad_inputs = [POOL.empty((T, H), np.float32) for _ in range(tp)]
        grad_routing = [np.empty((T, k), np.float32) for _ in range(tp)]
        lora_grads: dict[str, np.ndarray] = {}
        summed: dict[str, list[np.ndarray]] = {}
        ffi = self.kernel.ffi
        null = ffi.NULL
        if spec.lora is not None:
            dtype = lora_dtype(spec)
            for name, shape in LoRAWeights.shapes(spec).items():
                if name in ("gate_a", "up_a", "down_b") and tp > 1:
                    # Each partition contributes to all of it: float32 partials, merged below.
                    summed[name] = [POOL.empty(shape, np.float32) for _ in range(tp)]
                else:
                    # Each partition writes its own slice (or tp == 1 writes it all).
                    lora_grads[name] = POOL.empty(shape, dtype)
        gop = self._ptr(grad_out, "uint16_t *")

        def run(p, part):
            ptrs = []
            for name in LORA_NAMES:
                if spec.lora is None:
                    ptrs.append(null)
                elif name in summed:
                    ptrs.append(self._ptr(summed[name][p], "float *"))
                else:
                    ptrs.append(self._ptr(lora_grads[name], self._lora_ctype()))
            return self.kernel.fn("backward")(part, saved.slot, gop, self._ptr(grad_inputs[p], "float *"),
                                              self._ptr(grad_routing[p], "float *"), *ptrs)

        # A failed kernel keeps the slot (on its partition): it is released everywhere (releasing
        # a free slot is not an error), so that the kernel and the free list agree.
        try:
            codes = self._each_partition(run)   # once every partition is done
        except BaseException:
            saved._finalizer.detach()
            self._release_slot(saved.slot)
            raise
        failed = next((c for c in codes if c), 0)
        if failed:
            message = f"{self.kernel.rendered.prefix}_backward: {self.kernel.error(failed)} (code {failed})"
            if all(c == ERR_BUSY for c in codes):   # refused before anything ran
                raise KernelError(message + "; nothing ran and the saved forward is kept: retry", failed)
            saved._finalizer.detach()
            try:
                raise KernelError(message, failed)
            finally:   # a release that fails too raises its error, with this one as its context
                self._release_slot(saved.slot)
        saved._finalizer.detach()  # consumed: this backward gave the slot back
        self._release_slot(saved.slot, kernel_released=True)
        for name, parts in summed.items():
            lora_grads[name] = self._merge(parts).astype(lora_dtype(spec))
        return Grads(
            input=self._to_bf16(self._merge(grad_inputs)),
            routing_weights=self._merge(grad_routing),
            **lora_grads,
        )

    @property
    def packed_layout(self) -> str:
        """The layout of the packed weights of this layer's kernels (files with the same one
        are mapped by from_packed)."""
        return self.kernel.ffi.string(self.kernel.fn("packed_layout")()).decode()

    @property
    def mapped(self) -> bool:
        """Whether the base weights are a read-only mapping of a packed file (from_packed)."""
        return self._mapped is not None

    def _packed_views(self) -> list[list[tuple[object, int, int]]]:
        """Per partition, the 12 (pointer, bytes, bytes per expert) buffers of the packed weights."""
        ffi = self.kernel.ffi
        out = []
        for part in self._parts:
            ptrs, sizes, per = ffi.new("const void *[12]"), ffi.new("int64_t[12]"), ffi.new("int64_t[12]")
            self._call("packed_buffers", part, ptrs, sizes, per)
            out.append([(ptrs[i], int(sizes[i]), int(per[i])) for i in range(12)])
        return out

    def save_packed(self, path, metadata: dict[str, str] | None = None) -> None:
        """Write the base weights, as the kernels hold them, to a packed weight file
        (docs/design.md#packed-weight-files) that MoE.from_packed maps. metadata: more string
        entries for the file's metadata (`ktgen pack` records the layer and its checkpoint)."""
        with self._running():
            self._save_packed(path, metadata)

    def _save_packed(self, path, metadata: dict[str, str] | None) -> None:
        views = self._packed_views()
        buffers = [(packed.buffer_name(p, i), ptr, n)
                   for p, bufs in enumerate(views) for i, (ptr, n, _) in enumerate(bufs) if n]
        per_expert = [[pe for _, _, pe in bufs] for bufs in views]
        meta = packed.metadata(self.spec, self.packed_layout, self.kernel.isa, per_expert)
        extra = dict(metadata or {})
        clash = sorted(set(extra) & (set(meta) | {packed.DIGEST}))
        if clash or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise ValueError(f"metadata: expected str -> str entries other than ktgen's own "
                             f"({', '.join(sorted(meta))}), got {clash or extra}")
        packed.write(path, buffers, {**meta, **extra})

    def base_weights(self) -> tuple:
        """gate, up [E, I, H] and down [E, H, I] exactly as the kernels compute with them, in
        docs/design.md#base-weight-formats: bf16 arrays, or QuantizedWeights (a copy; what
        MoE(spec, *moe.base_weights()) rebuilds the same layer from, on any tier)."""
        ffi = self.kernel.ffi
        with self._running():
            parts = [[None if n == 0 else np.frombuffer(ffi.buffer(ptr, n), np.uint8) for ptr, n, _ in bufs]
                     for bufs in self._packed_views()]
            return tuple(_copy(w) for w in packed.unpack(parts, packed.layout_params(self.packed_layout)))

    def dequantized(self, name: str) -> np.ndarray:
        """The base weights the kernels compute with, as float32 (gate/up [E,I,H], down [E,H,I])."""
        which = {"gate": 0, "up": 1, "down": 2}
        if name not in which:
            raise ValueError(f"name: expected one of gate, up, down, got {name!r}")
        E, H, I = self.spec.expert_num, self.spec.hidden_size, self.spec.intermediate_size
        out = np.empty((E, H, I) if name == "down" else (E, I, H), np.float32)
        with self._running():
            for part in self._parts:
                self._call("dequantize", part, which[name], self._ptr(out, "float *"))
        return out

    def memory(self) -> dict[str, int]:
        """Bytes: base_weights held by the kernels, cache (the reserved saved-forward slots),
        workspace (each context's buffers for a call at max_len, allocated once and reused),
        and their total. Slots and workspace are address space until a call touches them."""
        spec = self.spec
        tp = spec.tp_count
        fn = self.kernel.fn
        weights = int(fn("weight_bytes")()) * tp
        cache = int(fn("slot_bytes")()) * spec.max_cache_depth * tp
        workspace = int(fn("workspace_bytes")(self.threads)) * tp
        return {"base_weights": weights, "workspace": workspace, "cache": cache,
                "total": weights + workspace + cache}

    def close(self) -> None:
        """Free the kernels' contexts (weights, slots, workspace) and threads, once a running
        call is done; every later call raises MoEClosedError. Closing twice does nothing."""
        with self._call_lock:
            if self._closed:
                return
            self._closed = True
            for runner in self._runners or ():
                runner.shutdown()
            for part in self._parts:
                self.kernel.ffi.release(part)   # its destroy runs now
            self._parts = []
            self._mapped = None

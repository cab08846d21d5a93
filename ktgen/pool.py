"""Recycled output arrays.

Every forward returns a fresh `out`, and every backward fresh gradients: at T = 512 on
qwen3-30b-a3b about 70 MB a step. Memory the allocator has just mapped is zeroed by the
kernel page by page on first write, and that costs more than the kernels take to fill it
(about 4,000 page faults and 10-15 ms a backward on a 2-core Xeon). Training drops these arrays
a step later, so ktgen keeps their memory and hands it out again.

An array from `empty` is a view of a ctypes object that exports a pooled buffer. Its memory
goes back to the pool only when that object dies, i.e. when no array, view or tensor made
from it (torch.from_numpy included) is left: numpy and torch keep the exporter alive through
every view. So a recycled buffer is never one that something still reads.

The pool keeps at most `KTGEN_POOL_MIB` MiB (default 1024; 0 turns recycling off) of idle
buffers, the oldest dropped first, so a run whose shapes change (variable T) does not grow
without bound. Arrays under 1 MiB come from numpy as usual.
"""
from __future__ import annotations

import collections
import ctypes
import math
import os
import threading
import weakref

import numpy as np

MIN_BYTES = 1 << 20


def _cap_bytes() -> int:
    raw = os.environ.get("KTGEN_POOL_MIB", "1024")
    try:
        mib = int(raw)
    except ValueError:
        raise ValueError(f"KTGEN_POOL_MIB: expected a whole number of MiB, got {raw!r}") from None
    if mib < 0:
        raise ValueError(f"KTGEN_POOL_MIB: expected >= 0, got {mib}")
    return mib << 20


class ArrayPool:
    """Uninitialized arrays (as numpy.empty) whose memory is reused once they are unreferenced."""

    def __init__(self, cap_bytes: int | None = None):
        self.cap_bytes = _cap_bytes() if cap_bytes is None else cap_bytes
        self._lock = threading.Lock()
        self._idle: list[tuple[int, np.ndarray]] = []   # (bytes, buffer), oldest first
        self._idle_bytes = 0
        # Buffers come back from finalizers, which may run inside a garbage collection that
        # interrupts this pool's own code: they only append here (atomic), `empty` sorts them.
        self._returned: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self.reused = 0

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            self._take_returned()
            return self._idle_bytes

    def _take_returned(self) -> None:
        while self._returned:
            nbytes, buf = self._returned.popleft()
            self._idle.append((nbytes, buf))
            self._idle_bytes += nbytes
        while self._idle_bytes > self.cap_bytes:
            nbytes, _ = self._idle.pop(0)
            self._idle_bytes -= nbytes

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in (shape if isinstance(shape, tuple) else (shape,)))
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes < MIN_BYTES or self.cap_bytes == 0:
            return np.empty(shape, dtype)
        buf = None
        with self._lock:
            self._take_returned()
            for i in range(len(self._idle) - 1, -1, -1):   # the newest of this size: warmest
                if self._idle[i][0] == nbytes:
                    buf = self._idle.pop(i)[1]
                    self._idle_bytes -= nbytes
                    self.reused += 1
                    break
        if buf is None:
            buf = np.empty(nbytes, np.uint8)
        lease = (ctypes.c_char * nbytes).from_buffer(buf)
        weakref.finalize(lease, self._returned.append, (nbytes, buf)).atexit = False
        return np.frombuffer(lease, dtype, count).reshape(shape)


POOL = ArrayPool()

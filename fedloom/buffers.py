"""Reusing large buffers, so that moving a model does not keep touching fresh memory.

Memory a process touches for the first time costs a page fault and zeroing
per page. On the 2-vCPU VM of docs/benchmarks.md a copy into fresh memory ran
at 0.8 GB/s against 12 GB/s into memory already in use, and the allocator
hands big buffers back to the OS on free, so every round paid it again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

import numpy as np

_FREE_REFS = sys.getrefcount(object()) + 1  # the holder's list entry and getrefcount's own argument


class Recycler:
    """Hands out uint8 buffers of a requested size, reusing one that nothing references any more.

    A buffer is reused only when the recycler holds the last reference to it:
    any array, view or memoryview still made from it (a trainer that kept its
    weights, a torch tensor from ``torch.from_numpy``) keeps it out of reuse.
    ``next_round()`` drops the buffers not taken in the last ``generations``
    rounds, so what is held between rounds is what those rounds used (a
    coordinator's accumulator is free again two rounds after it was taken: it
    serves as the next round's global weights first).
    """

    def __init__(self, generations: int = 1) -> None:
        if generations < 1:
            raise ValueError(f"generations must be at least 1, got {generations}")
        self._held: list[np.ndarray] = []
        self._used: list[set[int]] = [set() for _ in range(generations)]  # ids taken, newest round first
        self._lock = threading.Lock()

    def __reduce__(self):  # a copy (another process, a deepcopy) starts with nothing held
        return (Recycler, (len(self._used),))

    def take(self, nbytes: int) -> np.ndarray:
        if not _REUSE_IS_SAFE:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            for buffer in self._held:
                if (buffer.nbytes == nbytes and id(buffer) not in self._used[0]
                        and sys.getrefcount(buffer) <= _FREE_REFS + 1):  # + the loop variable
                    self._used[0].add(id(buffer))
                    return buffer
            buffer = np.empty(nbytes, np.uint8)
            self._held.append(buffer)
            self._used[0].add(id(buffer))
            return buffer

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized array of ``shape`` and ``dtype`` on a taken buffer."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        return self.take(count * dtype.itemsize).view(dtype).reshape(shape)

    def next_round(self) -> None:
        with self._lock:
            recent = set().union(*self._used)
            self._held = [b for b in self._held if id(b) in recent]
            self._used = [set(), *self._used[:-1]]

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._held)


def _reuse_is_safe() -> bool:
    """Whether this interpreter's reference counts tell a buffer in use from a free one (CPython's do; a
    build whose ``sys.getrefcount`` reports otherwise gets fresh buffers every time instead)."""
    global _REUSE_IS_SAFE
    _REUSE_IS_SAFE = True
    recycler = Recycler()
    first = recycler.take(8)
    view = first[:4]  # first is in use through a view
    recycler.next_round()
    second = recycler.take(8)
    busy_seen, second_id = second is not first, id(second)
    del second  # now only the recycler holds it
    recycler.next_round()
    free_seen = id(recycler.take(8)) == second_id
    del view
    return busy_seen and free_seen


_REUSE_IS_SAFE = _reuse_is_safe()

BLOCK = 1 << 18  # elements per block: block temporaries stay small, cache-sized and reused by malloc


def all_finite(array: np.ndarray) -> bool:
    """No NaN or Inf in ``array``, without a temporary as large as it (min and max propagate NaN)."""
    if array.size == 0:
        return True
    flat = array.reshape(-1)
    with np.errstate(invalid="ignore"):  # a NaN is the answer sought, not a warning
        return all(np.isfinite(flat[i : i + BLOCK].min()) and np.isfinite(flat[i : i + BLOCK].max())
                   for i in range(0, flat.size, BLOCK))


def add_scaled(out: np.ndarray, array: np.ndarray, w: int) -> None:
    """``out += array.astype(out.dtype) * w``, block by block (same result, no model-sized temporary)."""
    if w == 1 and array.dtype == out.dtype:
        out += array
        return
    flat_out, flat = out.reshape(-1), array.reshape(-1)
    for i in range(0, flat.size, BLOCK):
        part = flat[i : i + BLOCK].astype(out.dtype, copy=False)
        flat_out[i : i + BLOCK] += part * w if w != 1 else part


def tune_allocator(*, mmap_threshold: int = 9 << 20, trim_threshold: int = 64 << 20, arenas: int = 2) -> bool:
    """Make glibc keep freed message-sized buffers for reuse instead of handing them back and faulting them in
    again: allocations up to ``mmap_threshold`` (above the 4 MiB messages) come from the heaps, of which
    ``trim_threshold`` bytes may stay free at the top; ``arenas`` bounds the per-thread heaps that would each keep
    their own. Larger allocations are mmapped and leave the process when freed. Fixing the thresholds also turns
    off glibc's own adjustment of them, which is why both are always set. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all([bool(libc.mallopt(-3, mmap_threshold)),  # M_MMAP_THRESHOLD
                    bool(libc.mallopt(-1, trim_threshold)),  # M_TRIM_THRESHOLD
                    bool(libc.mallopt(-8, arenas))])  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False

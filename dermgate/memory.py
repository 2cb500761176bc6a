"""Giving freed heap back to the operating system between batches.

glibc keeps memory that Python and the native libraries (ONNX Runtime, OpenCV, numpy) have
freed in its arenas, one per thread that allocated: a long-running service's RSS then wanders
with whichever batch was largest on each thread, though nothing leaks. ``malloc_trim(0)``
returns the free pages at the top of every arena; it costs well under a millisecond on an idle
heap. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

TRIM_EVERY_S = 1.0          # at most this often, whatever the batch rate

_lock = threading.Lock()
_last = 0.0


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):           # not glibc
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn                                   # type: ignore[no-any-return]


_TRIM = _load_trim()


def release_free_memory(*, now: Callable[[], float] = time.monotonic) -> bool:
    """Trim the C heap unless it was trimmed less than ``TRIM_EVERY_S`` ago; returns whether it did."""
    global _last
    if _TRIM is None:
        return False
    with _lock:
        t = now()
        if t - _last < TRIM_EVERY_S:
            return False
        _last = t
    _TRIM(0)
    return True

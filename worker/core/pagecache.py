"""Is a range of a file in the page cache right now? Asked before hashing it through a mapping.

Hashing a mapped template skips the copy out of the page cache that every read makes (~15% of a SHA-256
with SHA-NI on one core), but a mapping turns a read error into SIGBUS, which kills the worker where a read
would have raised EIO. Pages already in the page cache need no disk read, so the hasher maps only ranges
that are wholly resident and reads the others. The question is the `cachestat` system call (Linux 6.5):
one call per range, no mapping needed. Python has no binding for it, so it goes through libc's `syscall`.

Where the answer is unknown (an older kernel, no libc, the call failing) the answer is "not resident": the
range is read, never mapped.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Callable

#: cachestat's number in the unified system call table (the same on every architecture since 5.x's 424+).
_NR_CACHESTAT = 451
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Range(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Stat(ctypes.Structure):
    _fields_ = (
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    )


@functools.cache
def _syscall() -> Callable[..., int] | None:
    """libc's `syscall`, or None where there is no Linux libc to call it through."""
    if platform.system() != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    call: Callable[..., int] = fn
    return call


def resident(fd: int, offset: int, length: int) -> bool:
    """True when every page of `length` bytes from `offset` of the file behind `fd` is in the page cache."""
    call = _syscall()
    if call is None or length <= 0:
        return False
    first = offset - offset % _PAGE
    pages = (offset + length - first + _PAGE - 1) // _PAGE
    stat = _Stat()
    rng = _Range(first, pages * _PAGE)
    if call(ctypes.c_long(_NR_CACHESTAT), ctypes.c_int(fd), ctypes.byref(rng), ctypes.byref(stat), ctypes.c_uint(0)):
        return False  # ENOSYS (before 6.5), EBADF, EFAULT, or a fault injected by the sweep: read it instead
    cached: int = stat.nr_cache
    return cached >= pages

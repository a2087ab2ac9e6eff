"""A window of a file mapped for reading, but only when every page of it is already read into memory.

Hashing a mapped template skips the copy out of the page cache that every read makes (~15% of a SHA-256
with SHA-NI on one core), but a mapping turns a read error into SIGBUS, which kills the worker where a read
would have raised EIO. A page that is in the page cache *and up to date* (its read from disk completed
successfully) needs no disk read when it is touched, so the hasher maps only windows whose pages all are,
and reads the others. `mincore` answers exactly that question (a page still being read in, by readahead
say, counts as absent; `cachestat` would count it), for a mapping: so the window is mapped first (which
reads nothing), asked, and hashed or unmapped unread. Python's mmap module hides the mapping's address, so
the mapping is made through libc with ctypes.

Where anything fails (no libc, the mmap or mincore call) the window is simply not offered: the caller reads
it. What remains is a page evicted between the question and the hash (microseconds to milliseconds later)
whose read back then fails on the disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
from collections.abc import Iterator
from typing import Any

_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value


def _load_libc() -> Any | None:
    """libc's mmap, munmap and mincore with their signatures, or None where they cannot be called."""
    try:
        libc = ctypes.CDLL(None)  # errno is not read: a failure only means "read it instead"
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.mincore.restype = ctypes.c_int
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    except (OSError, AttributeError):
        return None
    return libc


#: Loaded once per process.
_libc = functools.cache(_load_libc)


def _map(libc: Any, fd: int, base: int, length: int) -> int | None:
    """The address of a fresh read-only shared mapping of `length` bytes from `base`, or None. Maps, reads
    nothing."""
    address: int | None = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, base)
    return None if address is None or address == _MAP_FAILED else address


def _up_to_date(libc: Any, address: int, length: int) -> bool:
    """Whether every page of the mapping is in the page cache and up to date (mincore), False if unknown."""
    pages = (length + _PAGE - 1) // _PAGE
    vector = ctypes.create_string_buffer(pages)
    return libc.mincore(address, length, vector) == 0 and b"\x00" not in vector.raw[:pages]


@contextlib.contextmanager
def resident_view(fd: int, start: int, end: int) -> Iterator[memoryview | None]:
    """Bytes [start, end) of the file behind `fd` as a read-only view of a shared mapping when every page of
    them is in the page cache and up to date; None (nothing mapped) when not, or when that cannot be known.

    The view is valid only inside the `with`; the caller must also keep the file from shrinking meanwhile
    (the hasher holds a read lease), since touching a mapped page past the end of the file is SIGBUS.
    """
    libc = _libc()
    if libc is None or end <= start:
        yield None
        return
    base = start - start % _PAGE
    length = end - base
    address = _map(libc, fd, base, length)
    if address is None:
        yield None
        return
    try:
        if not _up_to_date(libc, address, length):
            yield None
            return
        window = (ctypes.c_char * length).from_address(address)
        with memoryview(window) as whole, whole[start - base :] as view:
            yield view
    finally:
        libc.munmap(address, length)


def resident(fd: int, offset: int, length: int) -> bool:
    """True when every page of `length` bytes from `offset` is in the page cache and up to date."""
    with resident_view(fd, offset, offset + length) as view:
        return view is not None

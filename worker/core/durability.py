"""Flushing a group of files in one disk round trip instead of one each.

A clone needs its data and its stamp on disk before its name appears, and the two directories on disk
before it is reported. Neither pair is ordered within itself, so each pair needs one wait for the disk,
not two. On a journaling filesystem (XFS, ext4 with its journal, btrfs) one fsync commits the journal up
to its file's latest change, which takes every earlier metadata change of every file with it; so a pair
flushed in the right order, the most recently changed file first, costs one commit: the second fsync finds
its changes committed already and returns at once (the stamp before the clone, the VM's directory before
the clones dir). Measured on an XFS loop mount of a 2-vCPU host (docs/crash-safety.md): the second fsync of
each pair 0.002-0.04 ms against 0.1-0.3 ms for the first.

The other way, issuing both fsyncs at once from two threads, is kept (`concurrent=True`) and measured
beside it by bench/fsync_order.py: on that host it was 1.5-5x slower, because the helper thread waits for a
core (and the two log forces do not merge better than the ordered pair); it would only pay where each flush
has its own data to write and cores are free (a filesystem without a journal, large copies).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from concurrent.futures.thread import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from worker.errors import FilesystemError

#: statfs f_type of XFS (linux/magic.h): the one filesystem whose log order the one-round-trip clone relies on.
XFS_MAGIC = 0x58465342
#: Filesystems that write every metadata change to one log in the order the changes were made, so that after a
#: power cut the log holds a prefix of them (docs/crash-safety.md, "One round trip on XFS").
_ORDERED_METADATA = frozenset({XFS_MAGIC})

#: At most four things are flushed at once (adopting an existing clone: file, stamp, two directories).
_HELPERS = 3

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
    """Made lazily per process (a Celery prefork child does not inherit its parent's threads), reused."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=_HELPERS, thread_name_prefix="fsync")
            _pool_pid = os.getpid()
        return _pool


def _fsync(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


def fsync_together(targets: Sequence[tuple[int, Path]], *, op: str, concurrent: bool = False) -> None:
    """fsync every fd in `targets` ((fd, path for errors)) as one group: in order (put first the file whose
    change came last), or all at once from helper threads with `concurrent`.

    Every flush is attempted even when one fails, and this returns only once all have finished, so the
    caller may close or clean up right after; the first failure (in `targets` order) is raised as a
    FilesystemError.
    """
    if not targets:
        return
    errors: list[OSError | None]
    futures: list[Future[OSError | None]] = []
    if concurrent and len(targets) > 1:
        try:
            pool = _helpers()
            futures = [pool.submit(_fsync, fd) for fd, _ in targets[1:]]
        except RuntimeError:  # interpreter shutting down: no new threads
            futures = []
    if futures:
        try:
            errors = [_fsync(targets[0][0])] + [f.result() for f in futures]
        finally:
            # Interrupted (a soft time limit): still never return while a helper may use the caller's fds.
            wait(futures)
    else:
        errors = [_fsync(fd) for fd, _ in targets]
    for (_, path), error in zip(targets, errors, strict=True):
        if error is not None:
            raise FilesystemError.from_os(error, op=op, path=path) from error


def orders_metadata(fd: int) -> bool:
    """Whether the file behind `fd` lives on a filesystem that persists metadata changes in order (XFS);
    False where that is not known (another filesystem, or fstatfs not callable).

    Asked once per filesystem (device number) and process, like worker.core.space's reflink probe: on XFS a
    statfs also kicks the background deletion of released clones onto this CPU (0.2 ms after a release).
    """
    try:
        dev = os.fstat(fd).st_dev
    except OSError:
        return False
    with _types_mutex:
        known = _types.get(dev)
    if known is None:
        known = filesystem_type(fd)
        if known is None:
            return False  # not remembered: asked again next time
        with _types_mutex:
            _types[dev] = known
    return known in _ORDERED_METADATA


_types: dict[int, int] = {}
_types_mutex = threading.Lock()


def filesystem_type(fd: int) -> int | None:
    """The statfs f_type (magic number) of the filesystem behind `fd`, None when it cannot be asked."""
    fstatfs = _fstatfs()
    if fstatfs is None:
        return None
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if fstatfs(fd, buf) != 0:
        return None
    # f_type is the first member of struct statfs on Linux, a C long (__fsword_t) on every 64-bit ABI.
    return ctypes.c_long.from_buffer(buf).value


#: Bigger than struct statfs on any Linux ABI (120 bytes on x86-64).
_STATFS_SIZE = 256


@functools.cache
def _fstatfs() -> Callable[[int, ctypes.Array[ctypes.c_char]], int] | None:
    """libc's fstatfs (Python's os module has statvfs, which lacks the filesystem type), loaded once."""
    try:
        func = ctypes.CDLL(None).fstatfs
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_void_p)
    func.restype = ctypes.c_int
    return cast(Callable[[int, ctypes.Array[ctypes.c_char]], int], func)

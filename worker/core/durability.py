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

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, wait
from concurrent.futures.thread import ThreadPoolExecutor
from pathlib import Path

from worker.errors import FilesystemError

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

"""Flushes in flight together: one disk round trip for several fsyncs that do not depend on each other.

A clone needs its data and its stamp on disk before its name appears, and the two directories on disk
before it is reported. Neither pair is ordered within itself, so each pair is one wait for the disk, not
two: the first fsync runs in the calling thread, the others in helper threads, all at once; on a journaling
filesystem the concurrent requests usually share one journal commit or log force, and on a plain disk
their writes share one queue flush. Both syscalls release the GIL.

The helper threads are made lazily, per process (a Celery prefork child does not inherit its parent's
threads), and reused: starting a thread per flush would cost more than the overlap saves on fast disks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, wait
from concurrent.futures.thread import ThreadPoolExecutor
from pathlib import Path

from worker.errors import FilesystemError

#: A clone flushes at most four things at once (adopting an existing clone: file, stamp, two directories).
_HELPERS = 3

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
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


def fsync_together(targets: Sequence[tuple[int, Path]], *, op: str) -> None:
    """fsync every fd in `targets` ((fd, path for errors)), all in flight at once.

    Returns only once every flush has finished, failed or not, so the caller may close or clean up right
    after; the first failure (in `targets` order) is raised as a FilesystemError.
    """
    if not targets:
        return
    futures: list[Future[OSError | None]] = []
    try:
        pool = _helpers()
        futures = [pool.submit(_fsync, fd) for fd, _ in targets[1:]]
    except RuntimeError:  # interpreter shutting down: no new threads; flush one after the other
        futures = []
        errors = [_fsync(fd) for fd, _ in targets]
    else:
        try:
            errors = [_fsync(targets[0][0])] + [f.result() for f in futures]
        finally:
            # Interrupted (a soft time limit): still never return while a helper may use the caller's fds.
            wait(futures)
    for (_, path), error in zip(targets, errors, strict=True):
        if error is not None:
            raise FilesystemError.from_os(error, op=op, path=path) from error

"""Cross-process exclusive locks on lock files, safe against the lock file being removed.

`flock` dies with its process, so a worker killed mid-clone never leaves a VM locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from worker.errors import FilesystemError


@contextlib.contextmanager
def exclusive(path: Path, *, remove_if: Callable[[], bool] | None = None, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path`; when `remove_if()` says so at the end, delete the lock file first.

    A waiter may have opened the old file before it was removed, so after locking we check that the path
    still names the inode we hold, and start again if not: two holders at once are impossible. Yields True;
    with `blocking=False` yields False at once (holding nothing, removing nothing) when someone else holds it.
    """
    fd = _acquire(path, blocking=blocking)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        try:
            if remove_if is not None and remove_if():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            os.close(fd)


def _acquire(path: Path, *, blocking: bool = True) -> int | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return None
                held = os.fstat(fd)
                try:
                    current = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="lock", path=path) from exc


@contextlib.contextmanager
def try_exclusive(path: Path) -> Iterator[bool]:
    """Like `exclusive`, but yields False at once instead of waiting when someone else holds the lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="lock", path=path) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)

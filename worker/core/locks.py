"""Cross-process exclusive locks on lock files, safe against the lock file being removed.

`flock` dies with its process, so a worker killed mid-clone never leaves a VM locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from worker.core.fsops import close
from worker.errors import FilesystemError

log = logging.getLogger(__name__)


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
                _remove(path)
        finally:
            close(fd)


def _remove(path: Path) -> None:
    """Best effort: a lock file left behind is harmless (the next holder that finds it unneeded removes
    it), and failing here would turn a finished clone or release into an error."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove lock file %s: %s", path, exc)


def _acquire(path: Path, *, blocking: bool = True) -> int | None:
    try:
        made_dir = False
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                if made_dir:
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)  # only before the first lock of all
                made_dir = True
                continue
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
                close(fd)
                raise
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return fd
            close(fd)
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
        except OSError as exc:
            raise FilesystemError.from_os(exc, op="lock", path=path) from exc
        yield True
    finally:
        close(fd)

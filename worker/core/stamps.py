"""Stamp sources: one file per template hash, so that on XFS a clone's stamp is a reflink, not a write.

A clone on XFS is a reflink: metadata only. Its stamp, written as 64 bytes of data, is what made the clone
wait for the disk twice (the stamp's bytes had to be on disk before its name, its name before the clone is
reported). A stamp reflinked from a file that already holds those 64 bytes on disk is metadata only too,
and XFS writes metadata changes to its log in the order they were made: one flush after the renames then
covers everything (the argument: docs/crash-safety.md, "One round trip on XFS").

    <clones_dir>/.cache/stamps/<sha256>    the 64 hex digits of its own name, no newline

A source is trusted only when it is a small regular file holding exactly its name; anything else there (a
symlink, a FIFO, a damaged file) is replaced. It is made as an unnamed file (O_TMPFILE), written, flushed
and only then linked under its name, so a crash never leaves a partial one. Nothing here raises: without a
usable source the clone writes its stamp the ordinary way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
from pathlib import Path

from worker.core.fsops import OPEN_DIR, close, open_small_file

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_STAMP_SIZE = 64
#: Sources kept open per process: a host has a few templates, each with a current and maybe an older hash.
_KEEP_OPEN = 16


class StampSources:
    """The stamp sources of one clones filesystem; safe to share between threads and processes.

    The sources of the last few hashes stay open (a clone then pays one read to check the bytes, instead of
    opening and checking the file by name); every caller gets its own duplicate to close.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._open: dict[str, int] = {}
        self._mutex = threading.Lock()

    @property
    def directory(self) -> Path:
        return self._dir

    def open(self, digest: str) -> int | None:
        """An fd (the caller's to close) of a source holding `digest`, made (and flushed) first when missing or
        damaged; None when there cannot be one here (no O_TMPFILE, read-only, a directory in the way)."""
        if not _HEX64.fullmatch(digest):
            return None
        with self._mutex:
            fd = self._open.pop(digest, None)
            if fd is not None:
                if _holds(fd, digest):
                    self._open[digest] = fd  # now the most recent
                    return _dup(fd)
                close(fd)  # changed in place since: look again
        fd = self._open_by_name(digest)
        if fd is None:
            return None
        with self._mutex:
            old = self._open.pop(digest, None)
            if old is not None:
                close(old)
            self._open[digest] = fd
            while len(self._open) > _KEEP_OPEN:
                close(self._open.pop(next(iter(self._open))))
            return _dup(fd)

    def _open_by_name(self, digest: str) -> int | None:
        try:
            dir_fd = os.open(self._dir, OPEN_DIR)
        except FileNotFoundError:
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                dir_fd = os.open(self._dir, OPEN_DIR)
            except OSError as exc:
                log.warning("no stamp sources at %s: %s", self._dir, exc)
                return None
        except OSError as exc:
            log.warning("no stamp sources at %s: %s", self._dir, exc)
            return None
        try:
            fd = _open_valid(dir_fd, digest)
            return fd if fd is not None else self._make(dir_fd, digest)
        finally:
            close(dir_fd)

    def prune(self, keep: set[str]) -> None:
        """Delete the sources of hashes no template has any more (clones that shared their blocks keep them)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self._dir):
                if name not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(self._dir / name)

    def _make(self, dir_fd: int, digest: str) -> int | None:
        try:
            os.unlink(digest, dir_fd=dir_fd)  # a damaged one (a valid one was looked for first)
        except FileNotFoundError:
            pass
        except OSError as exc:  # a directory in the way, say: the clone writes its stamp instead
            log.warning("cannot replace %s in %s: %s", digest, self._dir, exc)
            return None
        try:
            fd = os.open(self._dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o444)
        except OSError as exc:
            log.info("cannot make a stamp source in %s: %s", self._dir, exc)
            return None
        try:
            if os.write(fd, digest.encode("ascii")) != _STAMP_SIZE:
                raise OSError(errno.EIO, "short write")
            # On disk before any clone shares its blocks: a power cut must not leave stamps of nothing.
            os.fsync(fd)
        except OSError as exc:
            log.warning("could not make the stamp source %s in %s: %s", digest, self._dir, exc)
            close(fd)
            return None
        try:
            os.link(f"/proc/self/fd/{fd}", digest, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:  # another process made it meanwhile: the same bytes
            pass
        except OSError as exc:  # no /proc, say: this process keeps it open, unnamed, and uses it all the same
            log.warning("could not name the stamp source %s in %s: %s", digest, self._dir, exc)
        return fd


def _holds(fd: int, digest: str) -> bool:
    """Whether the file behind `fd` is exactly the 64 bytes of `digest`."""
    try:
        return os.pread(fd, _STAMP_SIZE + 1, 0) == digest.encode("ascii")
    except OSError:
        return False


def _dup(fd: int) -> int | None:
    try:
        return os.dup(fd)
    except OSError:
        return None


def _open_valid(dir_fd: int, digest: str) -> int | None:
    """The existing source as an fd if it is a regular file holding exactly `digest`, else None (missing, a
    symlink, a FIFO or device, another size or other bytes): opened as fsops.open_small_file opens."""
    fd = open_small_file(dir_fd, digest, limit=_STAMP_SIZE)
    if fd is not None and _holds(fd, digest):  # exactly the 64 bytes: a shorter file reads short
        return fd
    if fd is not None:
        close(fd)
    return None

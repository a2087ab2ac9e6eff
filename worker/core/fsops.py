"""File primitives relative to an open directory fd: a path swapped under us cannot redirect a write.

Every OSError becomes a FilesystemError naming the operation and the path, so callers see one error root.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from pathlib import Path

from worker.core.layout import PARTIAL_SUFFIX
from worker.errors import FilesystemError

log = logging.getLogger(__name__)

#: A directory, never through a symlink.
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def delete_quietly(path: Path) -> None:
    def ignore_vanished(_: object, name: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            log.warning("could not delete released clone %s: %s", name, exc_info[1])

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, onerror=ignore_vanished)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not delete released clone %s: %s", path, exc)


def is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def close(fd: int) -> None:
    """Release a descriptor; a failing close() (EIO, EINTR) has released it all the same on Linux, and every
    write that matters here was fsynced (or is validated on read) before, so the error carries no news."""
    with contextlib.suppress(OSError):
        os.close(fd)


def open_dir(path: Path, *, op: str) -> int:
    """A directory as an fd, never through a symlink."""
    try:
        return os.open(path, OPEN_DIR)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op=op, path=path) from exc


def read_text(dir_fd: int, name: str, vm_dir: Path, *, strip: bool = True) -> str | None:
    """A small file's text, trimmed unless not `strip` (as the seed reads stamps), None when it does not exist."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read", path=vm_dir / name) from exc
    try:
        raw = os.read(fd, 4096)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read", path=vm_dir / name) from exc
    finally:
        close(fd)
    text = raw.decode("utf-8", "surrogatepass")
    return text.strip() if strip else text


def open_small_file(dir_fd: int, name: str, *, limit: int) -> int | None:
    """`name` opened for reading (the caller's to close) if it is a regular file of at most `limit` bytes, else
    None (missing, a FIFO, a device, a symlink, a directory, too big): opened without blocking or following
    links, for files whose content is only a hint, where anything odd must read as "not there"."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        close(fd)
        return None
    return fd


def read_small_file(dir_fd: int, name: str, *, limit: int) -> bytes | None:
    """The bytes of `name` if it is a regular file of at most `limit` bytes (open_small_file), else None; read
    with that bound too, so a file that grew past its stat never fills memory."""
    fd = open_small_file(dir_fd, name, limit=limit)
    if fd is None:
        return None
    try:
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        close(fd)
    return data if len(data) <= limit else None


#: One page: a write() of at most this much into a new, empty file is all or nothing. The kernel copies a
#: write into the page cache a page at a time and stops early, for a kill, only between pages; a full disk
#: fails the allocation of the one block before anything is copied.
ONE_PAGE = 4096


def write_partial(dir_fd: int, name: str, data: bytes, vm_dir: Path) -> int:
    """`name`.partial holding `data`, not flushed; returns its open fd (the caller flushes, closes, renames)."""
    return write_file(dir_fd, name + PARTIAL_SUFFIX, data, vm_dir, name=name)


def write_file(dir_fd: int, file: str, data: bytes, vm_dir: Path, *, name: str | None = None) -> int:
    """`file` (created or emptied) holding `data`, not flushed; returns its open fd, the caller's to close.
    Errors name `name` (default: `file`)."""
    named = vm_dir / (name or file)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="write", path=named) from exc
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException as exc:
        close(fd)
        if isinstance(exc, OSError):
            raise FilesystemError.from_os(exc, op="write", path=named) from exc
        raise
    return fd


def rename(dir_fd: int, src: str, dst: str, vm_dir: Path, *, op: str) -> None:
    try:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op=op, path=vm_dir / dst) from exc


def write_new(dir_fd: int, name: str, data: bytes, vm_dir: Path) -> None:
    """Create `name` holding `data` in one write, not flushed, where it cannot exist yet (a directory this
    call made). Readers, a kill or a full disk see it empty or whole when `data` fits in ONE_PAGE; larger
    data is written as write_atomic does."""
    if len(data) > ONE_PAGE:
        write_atomic(dir_fd, name, data, vm_dir, durable=False)
        return
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="write", path=vm_dir / name) from exc
    try:
        written = os.write(fd, data)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="write", path=vm_dir / name) from exc
    finally:
        close(fd)
    if written != len(data):  # cannot happen for one page (see ONE_PAGE): never leave a torn record
        unlink(dir_fd, name, vm_dir)
        raise FilesystemError("write", str(vm_dir / name), errno.EIO, "short write")


def write_atomic(dir_fd: int, name: str, data: bytes, vm_dir: Path, *, durable: bool = True) -> None:
    """Write, flush, rename: readers see the old file or the whole new one, also after a power cut
    (unless not `durable`: then only while the machine stays up)."""
    fd = write_partial(dir_fd, name, data, vm_dir)
    try:
        if durable:
            os.fsync(fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="write", path=vm_dir / name) from exc
    finally:
        close(fd)
    rename(dir_fd, name + PARTIAL_SUFFIX, name, vm_dir, op="write")


def unlink(dir_fd: int, name: str, vm_dir: Path) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(vm_dir / name, ignore_errors=True)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="remove", path=vm_dir / name) from exc


def fsync_dir(path: Path) -> None:
    fd = open_dir(path, op="flush dir")
    try:
        os.fsync(fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="flush dir", path=path) from exc
    finally:
        close(fd)

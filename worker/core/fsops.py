"""File primitives relative to an open directory fd: a path swapped under us cannot redirect a write.

Every OSError becomes a FilesystemError naming the operation and the path, so callers see one error root.
"""

from __future__ import annotations

import logging
import os
import shutil
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
        os.close(fd)
    text = raw.decode("utf-8", "surrogatepass")
    return text.strip() if strip else text


def write_atomic(dir_fd: int, name: str, data: bytes, vm_dir: Path, *, durable: bool = True) -> None:
    """Write, flush, rename: readers see the old file or the whole new one, also after a power cut
    (unless not `durable`: then only while the machine stays up)."""
    partial = name + PARTIAL_SUFFIX
    try:
        fd = os.open(
            partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="write", path=vm_dir / name) from exc


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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Which template files to trust, and how to hold one: opened once, read only through that fd.

A stack is a directory `<template_dir>/<name>` (a symlink to another stack inside the template dir is an
alias) holding a regular file `rootfs.ext4`. A template whose real path leads outside the template dir, a
FIFO or device, or a name no caller could send is not a stack.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from worker.core import lease
from worker.core.fsops import close, is_dir
from worker.core.hashcache import FileKey
from worker.core.layout import TEMPLATE_ROOTFS_FILE
from worker.core.names import is_valid_stack_name
from worker.errors import FilesystemError, TemplateChanged

log = logging.getLogger(__name__)


class Template:
    """An open template: every later read, hash and copy goes through this one fd, so a path swapped
    underneath cannot make us hash one file and copy another. Held under a read lease where the kernel
    grants one (worker.core.lease), so a writer that opens it meanwhile is noticed."""

    def __init__(self, name: str, path: Path, fd: int) -> None:
        self.name = name
        self.path = path
        self.fd = fd
        st = _fstat(fd, path)
        self.mode = st.st_mode
        self.key = FileKey.of(st)
        self.leased = lease.take(fd, str(path))

    def guard(self) -> None:
        """Raise TemplateBusy once a writer wants the file; what the hasher calls between windows (only for
        a leased template: without the lease nothing stops a truncation, so nothing may map it)."""
        lease.check(self.fd, str(self.path))

    def check_unchanged(self) -> None:
        """Raise (transient) unless what was read since opening is one version of the file, written by no one."""
        if self.leased:
            lease.check(self.fd, str(self.path))
        now = FileKey.of(_fstat(self.fd, self.path))
        if now != self.key:
            raise TemplateChanged(str(self.path), f"size {self.key.size} -> {now.size}, stat changed")

    def stat(self) -> os.stat_result:
        """The template's stat now, as a FilesystemError when even that fails."""
        return _fstat(self.fd, self.path)

    def refresh_key(self) -> None:
        """Take the key anew (after our own unlink of a hard link to it moved its ctime)."""
        self.key = FileKey.of(_fstat(self.fd, self.path))


def _fstat(fd: int, path: Path) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="stat template", path=path) from exc


def stack_names(template_dir: Path) -> list[str]:
    tdir = template_dir
    try:
        entries = list(os.scandir(tdir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read template dir", path=tdir) from exc
    names = []
    for entry in entries:
        # Names that are not UTF-8 are skipped, as the seed skips them: no caller could send them.
        if is_valid_stack_name(entry.name) and is_dir(entry):
            names.append(entry.name)
    return sorted(names)


def resolve_template(template_dir: Path, name: str) -> tuple[Path, str] | None:
    """The template path of `name` and its real path, or None when there is none inside the template
    dir. Symlinks inside the template dir (a stack alias) are followed; one that leads outside is not."""
    path = template_dir / name / TEMPLATE_ROOTFS_FILE
    try:
        real = os.path.realpath(path, strict=True)
        root = os.path.realpath(template_dir, strict=True)
    except OSError as exc:
        _no_template_unless_failed(exc, path)
        return None
    return (path, real) if _inside(real, root, path, template_dir) else None


def _no_template_unless_failed(exc: OSError, path: Path) -> None:
    """Return when `exc` only means there is no template (missing, a file on the way, a symlink loop); raise
    FilesystemError("stat template") for a real failure (EIO, EACCES, ...)."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno == errno.ELOOP:
        return
    raise FilesystemError.from_os(exc, op="stat template", path=path) from exc


def _inside(real: str, root: str, path: Path, template_dir: Path) -> bool:
    """Whether the real path lies inside the template dir's real path; a warning names both ends when not."""
    if real.startswith(root.rstrip("/") + "/"):
        return True
    log.warning("template %s resolves outside %s (%s); ignored", path, template_dir, real)
    return False


@contextlib.contextmanager
def open_template(template_dir: Path, name: str) -> Iterator[Template | None]:
    """The template of `name`, opened, or None when it has none."""
    fd = _open_checked(template_dir, name)
    if fd is None:
        yield None
        return
    path = template_dir / name / TEMPLATE_ROOTFS_FILE
    try:
        if not stat.S_ISREG(_fstat(fd, path).st_mode):
            yield None
            return
        yield Template(name, path, fd)
    finally:
        close(fd)


#: Read-only, and O_NONBLOCK: a FIFO planted as a template must not hang the worker (regular files ignore it).
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


def _open_checked(template_dir: Path, name: str) -> int | None:
    """The template of `name` opened for reading, once its real path is known to be inside the template dir;
    None when it has none there.

    The path is resolved by the kernel into an O_PATH descriptor (which opens nothing: no device or FIFO is
    ever opened before the check), whose real path /proc then names; the file is opened through that same
    descriptor, so the file checked is the file read. Without /proc, as resolve_template does.
    """
    path = template_dir / name / TEMPLATE_ROOTFS_FILE
    try:
        anchor = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        _no_template_unless_failed(exc, path)
        return None
    try:
        real, root = _real_path(anchor), _real_dir(template_dir)
        if real is None or root is None:
            return _open_resolved(template_dir, name)
        if not _inside(real, root, path, template_dir):
            return None
        try:
            return os.open(f"/proc/self/fd/{anchor}", _READ_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FilesystemError.from_os(exc, op="open template", path=path) from exc
    finally:
        close(anchor)


def _real_path(fd: int) -> str | None:
    """The real path of what `fd` holds, None without /proc (or for a file unlinked since it was opened)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return real if real.startswith("/") and not real.endswith(" (deleted)") else None


def _real_dir(directory: Path) -> str | None:
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _real_path(fd)
    finally:
        close(fd)


def _open_resolved(template_dir: Path, name: str) -> int | None:
    """Without /proc: resolve the path first (os.path.realpath), then open what it names."""
    resolved = resolve_template(template_dir, name)
    if resolved is None:
        return None
    path, real = resolved
    try:
        return os.open(real, _READ_FLAGS | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="open template", path=path) from exc

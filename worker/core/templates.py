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
    tdir = template_dir
    path = tdir / name / TEMPLATE_ROOTFS_FILE
    try:
        real = os.path.realpath(path, strict=True)
        root = os.path.realpath(tdir, strict=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise FilesystemError.from_os(exc, op="stat template", path=path) from exc
    if not real.startswith(root.rstrip("/") + "/"):
        log.warning("template %s resolves outside %s (%s); ignored", path, tdir, real)
        return None
    return path, real


@contextlib.contextmanager
def open_template(template_dir: Path, name: str) -> Iterator[Template | None]:
    """The template of `name`, opened, or None when it has none."""
    resolved = resolve_template(template_dir, name)
    if resolved is None:
        yield None
        return
    path, real = resolved
    try:
        # O_NONBLOCK: a FIFO planted as a template must not hang the worker; regular files ignore it.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="open template", path=path) from exc
    try:
        if not stat.S_ISREG(_fstat(fd, path).st_mode):
            yield None
            return
        yield Template(name, path, fd)
    finally:
        close(fd)

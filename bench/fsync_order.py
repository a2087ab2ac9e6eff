"""Diagnostic for the clone sections: the registry's durability steps as bare syscalls, in two orders.

`current` repeats what RootfsRegistry._build_clone and friends do today (five fsyncs: clones dir after
mkdir, owner file, clone, stamp, VM directory). `proposed` keeps every guarantee that matters when the clone
is reported: the clone and its stamp are on disk before the clone's name appears, and both directories are
synced before returning. It only drops the owner file's own fsync (a crash may then leave `.vm-id` empty)
and moves the clones-dir fsync last, where a journal that commits in order has usually committed it already.
Timing both, without the registry's Python around them, shows what reordering alone would save.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from worker.core import cloning

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def current(template_fd: int, vm_dir: Path) -> None:
    os.mkdir(vm_dir)
    _fsync_path(vm_dir.parent)
    _in_dir(vm_dir, lambda dfd: _steps(template_fd, dfd, sync_owner=True))


def proposed(template_fd: int, vm_dir: Path) -> None:
    os.mkdir(vm_dir)
    _in_dir(vm_dir, lambda dfd: _steps(template_fd, dfd, sync_owner=False))
    _fsync_path(vm_dir.parent)


ORDERS: dict[str, Callable[[int, Path], None]] = {"current": current, "proposed": proposed}


def _steps(template_fd: int, dfd: int, *, sync_owner: bool) -> None:
    """Owner file, clone, stamp, renames, directory fsync: the registry's sequence inside the VM directory."""
    _write(dfd, ".vm-id", b"bench-vm", sync=sync_owner)
    out = os.open("rootfs.ext4.partial", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        cloning.clone_fd(template_fd, out, src_path="template", dst_path="rootfs.ext4.partial")
        os.fsync(out)
    finally:
        os.close(out)
    _write(dfd, "rootfs.ext4.sha256", b"0" * 64, sync=True)
    os.rename("rootfs.ext4.partial", "rootfs.ext4", src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)


def _write(dfd: int, name: str, data: bytes, *, sync: bool) -> None:
    partial = name + ".partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, name, src_dir_fd=dfd, dst_dir_fd=dfd)


def _in_dir(path: Path, body: Callable[[int], None]) -> None:
    dfd = os.open(path, _DIR)
    try:
        body(dfd)
    finally:
        os.close(dfd)


def _fsync_path(path: Path) -> None:
    _in_dir(path, os.fsync)

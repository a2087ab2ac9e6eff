"""Diagnostic for the clone sections: the registry's durability steps as bare syscalls, two ways.

`sequential` is the protocol before issue 10: four flushes one after another (the clone's data, the stamp,
the VM directory after the renames, the clones dir). `paired` is today's (RootfsRegistry._build_clone):
the same four flushes in two pairs, each pair in flight at once (data and stamp, then the two directories:
worker.core.durability). Both keep every guarantee that matters when a clone is reported (the clone and its
stamp on disk before the clone's name appears, both directories on disk before returning). Timing both
without the registry's Python around them shows what the pairing alone saves: one disk round trip each.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from worker.core import cloning, durability

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def sequential(template_fd: int, vm_dir: Path) -> None:
    _steps(template_fd, vm_dir, paired=False)


def paired(template_fd: int, vm_dir: Path) -> None:
    _steps(template_fd, vm_dir, paired=True)


ORDERS: dict[str, Callable[[int, Path], None]] = {"sequential": sequential, "paired": paired}


def _steps(template_fd: int, vm_dir: Path, *, paired: bool) -> None:
    """mkdir, owner file (not flushed), clone, stamp, flushes, renames, directory flushes."""
    os.mkdir(vm_dir)
    clones = os.open(vm_dir.parent, _DIR)
    dfd = os.open(vm_dir, _DIR)
    try:
        _write(dfd, ".vm-id", b"bench-vm")
        os.rename(".vm-id.partial", ".vm-id", src_dir_fd=dfd, dst_dir_fd=dfd)
        out = os.open("rootfs.ext4.partial", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        stamp = -1
        try:
            cloning.clone_fd(template_fd, out, src_path="template", dst_path="rootfs.ext4.partial")
            stamp = _write(dfd, "rootfs.ext4.sha256", b"0" * 64, keep_open=True)
            _flush([out, stamp], paired=paired)
        finally:
            os.close(out)
            if stamp >= 0:
                os.close(stamp)
        os.rename("rootfs.ext4.sha256.partial", "rootfs.ext4.sha256", src_dir_fd=dfd, dst_dir_fd=dfd)
        os.rename("rootfs.ext4.partial", "rootfs.ext4", src_dir_fd=dfd, dst_dir_fd=dfd)
        _flush([dfd, clones], paired=paired)
    finally:
        os.close(dfd)
        os.close(clones)


def _flush(fds: list[int], *, paired: bool) -> None:
    if paired:
        durability.fsync_together([(fd, Path(str(fd))) for fd in fds], op="flush")
    else:
        for fd in fds:
            os.fsync(fd)


def _write(dfd: int, name: str, data: bytes, *, keep_open: bool = False) -> int:
    fd = os.open(name + ".partial", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    os.write(fd, data)
    if keep_open:
        return fd
    os.close(fd)
    return -1

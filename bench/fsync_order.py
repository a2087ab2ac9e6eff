"""Diagnostic for the clone sections: the registry's durability steps as bare syscalls, three or four ways.

`sequential` is the protocol before issue 10: the clone's data, the stamp, the VM directory after the
renames, the clones dir, one after another. `ordered` is today's (RootfsRegistry._build_clone): the same
four flushes as two groups, each ordered so that its first flush's journal commit covers the second (the
stamp before the data, the VM directory before the clones dir: worker.core.durability). `paired` issues
each group's two flushes at once from two threads instead. All three keep every guarantee that matters
when a clone is reported (the clone and its stamp on disk before the clone's name appears, both
directories on disk before returning); timing them without the registry's Python shows what each saves.
`one-trip` is today's protocol on XFS after a reflink (the stamp reflinked too, one log force).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from worker.core import cloning, durability

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def sequential(template_fd: int, vm_dir: Path) -> None:
    _steps(template_fd, vm_dir, mode="sequential")


def ordered(template_fd: int, vm_dir: Path) -> None:
    _steps(template_fd, vm_dir, mode="ordered")


def paired(template_fd: int, vm_dir: Path) -> None:
    _steps(template_fd, vm_dir, mode="paired")


def one_trip(template_fd: int, vm_dir: Path) -> None:
    """Today's protocol on XFS after a reflink: the stamp a reflink of a flushed stamp source, no flush before
    the rename, the two directories after it (one log force: docs/crash-safety.md, "One round trip on XFS")."""
    _steps(template_fd, vm_dir, mode="one-trip")


ORDERS: dict[str, Callable[[int, Path], None]] = {
    "sequential": sequential,
    "ordered": ordered,
    "paired": paired,
    "one-trip": one_trip,
}
#: Only where clones are reflinks (XFS): the stamp's reflink needs one.
REFLINK_ONLY = frozenset({"one-trip"})


def _steps(template_fd: int, vm_dir: Path, *, mode: str) -> None:
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
            if mode == "one-trip":
                stamp = os.open("rootfs.ext4.sha256", _NEW, 0o644, dir_fd=dfd)
                source = _stamp_source(vm_dir.parent)
                try:
                    cloning.reflink(source, stamp, dst_path="rootfs.ext4.sha256")
                finally:
                    os.close(source)
            else:
                stamp = _write(dfd, "rootfs.ext4.sha256", b"0" * 64, keep_open=True)
                _flush([out, stamp] if mode == "sequential" else [stamp, out], mode=mode)
        finally:
            os.close(out)
            if stamp >= 0:
                os.close(stamp)
        if mode != "one-trip":
            os.rename("rootfs.ext4.sha256.partial", "rootfs.ext4.sha256", src_dir_fd=dfd, dst_dir_fd=dfd)
        os.rename("rootfs.ext4.partial", "rootfs.ext4", src_dir_fd=dfd, dst_dir_fd=dfd)
        _flush([dfd, clones], mode=mode)
    finally:
        os.close(dfd)
        os.close(clones)


_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _stamp_source(scratch: Path) -> int:
    """A flushed 64-byte file in `scratch` to reflink stamps from, made on first use (as worker.core.stamps)."""
    path = scratch / "stamp-source"
    if not path.exists():
        fd = os.open(path, _NEW, 0o444)
        try:
            os.write(fd, b"0" * 64)
            os.fsync(fd)
        finally:
            os.close(fd)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _flush(fds: list[int], *, mode: str) -> None:
    if mode in ("sequential", "one-trip"):
        for fd in fds:
            os.fsync(fd)
    else:
        durability.fsync_together([(fd, Path(str(fd))) for fd in fds], op="flush", concurrent=mode == "paired")


def _write(dfd: int, name: str, data: bytes, *, keep_open: bool = False) -> int:
    fd = os.open(name + ".partial", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    os.write(fd, data)
    if keep_open:
        return fd
    os.close(fd)
    return -1

"""Real filesystems beyond tmp_path's ext4, for the tests and the benchmarks: XFS with reflink, a tiny tmpfs.

When the machine cannot mount, MountUnavailable says why: the tests turn it into a skip with that reason,
the benchmarks into a "skipped: ..." row. Always unmounts and releases the loop device on the way out,
whatever happened inside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MountUnavailable(Exception):
    """This machine cannot provide the filesystem; the message says why."""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def _require_root_and(*tools: str) -> None:
    if os.geteuid() != 0:
        raise MountUnavailable("mounting a loop device needs root")
    missing = [tool for tool in ("mount", "umount", "losetup", *tools) if shutil.which(tool) is None]
    if missing:
        raise MountUnavailable(f"{', '.join(missing)} not installed")


def _loop_devices_of(image: Path) -> list[str]:
    out = _run("losetup", "-j", str(image)).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def _release(image: Path, mountpoint: Path | None) -> None:
    """Unmount (lazily if something still holds it), detach any loop device left, delete the image."""
    if mountpoint is not None and _run("umount", str(mountpoint)).returncode != 0:
        _run("umount", "--lazy", str(mountpoint))
    for device in _loop_devices_of(image):
        _run("losetup", "-d", device)
    image.unlink(missing_ok=True)


@contextmanager
def xfs_reflink(parent: Path, *, size: int) -> Iterator[Path]:
    """A fresh XFS with reflink=1 of `size` bytes (sparse image) mounted under `parent`; yields the mount."""
    _require_root_and("mkfs.xfs")
    image = parent / "xfs-reflink.img"
    mountpoint = parent / "xfs-reflink"
    mountpoint.mkdir(parents=True)
    with image.open("wb") as f:
        f.truncate(size)
    made = _run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    if made.returncode != 0:
        _release(image, None)
        raise MountUnavailable(f"mkfs.xfs -m reflink=1 failed: {made.stderr.strip()}")
    mounted = _run("mount", "-o", "loop", str(image), str(mountpoint))
    if mounted.returncode != 0:
        _release(image, None)
        raise MountUnavailable(f"mount -o loop of an XFS image failed: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _release(image, mountpoint)


@contextmanager
def tmpfs(parent: Path, *, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted under `parent`: a filesystem that fills up on demand."""
    _require_root_and()
    mountpoint = parent / f"tmpfs-{size >> 20}m"
    mountpoint.mkdir(parents=True)
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint))
    if mounted.returncode != 0:
        raise MountUnavailable(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if _run("umount", str(mountpoint)).returncode != 0:
            _run("umount", "--lazy", str(mountpoint))

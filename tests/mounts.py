"""Real filesystems for tests that need more than tmp_path's ext4: XFS with reflink, a tiny tmpfs.

Context managers, not fixtures, so any test module can wrap them in a fixture of its own. They call
pytest.skip (with the reason) when the machine cannot provide the mount, and always unmount and release
the loop device on the way out, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _require_root_and(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    missing = [tool for tool in ("mount", "umount", *tools) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def _unmount(mountpoint: Path) -> None:
    """Unmount, lazily if something still holds it: a test's leftover fd must not leak the mount."""
    if _run("umount", str(mountpoint)).returncode != 0:
        _run("umount", "--lazy", str(mountpoint))


def _loop_devices_of(image: Path) -> list[str]:
    """Loop devices backed by `image` (`losetup -j` prints "/dev/loopN: [...]:ino (path)" per device)."""
    out = _run("losetup", "-j", str(image)).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


@contextmanager
def xfs_reflink_mount(tmp_path: Path, *, size_mib: int = 300) -> Iterator[Path]:
    """A fresh XFS with reflink=1 on a loop device, mounted under tmp_path; yields the mount point.

    300 MiB is the smallest XFS that current mkfs.xfs accepts; the image is sparse, so it costs a few MiB.
    """
    _require_root_and("losetup", "mkfs.xfs")
    image = tmp_path / "xfs-reflink.img"
    mountpoint = tmp_path / "xfs-reflink"
    mountpoint.mkdir()
    with image.open("wb") as f:
        f.truncate(size_mib << 20)
    made = _run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    if made.returncode != 0:
        image.unlink()
        pytest.skip(f"mkfs.xfs -m reflink=1 failed: {made.stderr.strip()}")
    mounted = _run("mount", "-o", "loop", str(image), str(mountpoint))
    if mounted.returncode != 0:
        for device in _loop_devices_of(image):
            _run("losetup", "-d", device)
        image.unlink()
        pytest.skip(f"mount -o loop of an XFS image failed: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _unmount(mountpoint)
        # mount -o loop sets autoclear, so this normally finds nothing; a lazy unmount may leave it to us.
        for device in _loop_devices_of(image):
            _run("losetup", "-d", device)
        image.unlink()


@contextmanager
def tmpfs_mount(tmp_path: Path, *, size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted under tmp_path: a filesystem that fills up on demand."""
    _require_root_and()
    mountpoint = tmp_path / f"tmpfs-{size_mib}m"
    mountpoint.mkdir()
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _unmount(mountpoint)

"""Small helpers shared by the test modules (not fixtures: those live in conftest.py and tests/workers.py)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from worker.dev import mounts
from worker.dev.templates import MIB, write_sparse_template, write_template

__all__ = [
    "MIB",
    "sha256_of",
    "tmpfs_mount",
    "tree",
    "wait_until",
    "write_sparse_template",
    "write_template",
    "xfs_reflink_mount",
]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def tree(root: Path) -> set[str]:
    """Every path below root, relative, for before/after comparisons."""
    return {os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs}


def wait_until(predicate: Callable[[], object], *, what: str, timeout: float = 60.0, poll: float = 0.02) -> None:
    """Poll until `predicate()` is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


@contextmanager
def xfs_reflink_mount(tmp_path: Path, *, size_mib: int = 300) -> Iterator[Path]:
    """worker.dev.mounts.xfs_reflink, skipping the test (with the reason) where the machine cannot mount."""
    try:
        cm = mounts.xfs_reflink(tmp_path, size=size_mib << 20)
        mountpoint = cm.__enter__()
    except mounts.MountUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield mountpoint
    finally:
        cm.__exit__(None, None, None)


@contextmanager
def tmpfs_mount(tmp_path: Path, *, size_mib: int) -> Iterator[Path]:
    """worker.dev.mounts.tmpfs, skipping the test (with the reason) where the machine cannot mount."""
    try:
        cm = mounts.tmpfs(tmp_path, size=size_mib << 20)
        mountpoint = cm.__enter__()
    except mounts.MountUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield mountpoint
    finally:
        cm.__exit__(None, None, None)

"""Small helpers shared by the test modules (not fixtures: those live in conftest.py and tests/workers.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from worker.dev import mounts
from worker.dev.templates import MIB, write_sparse_template, write_template

__all__ = [
    "MIB",
    "evict",
    "hold_open",
    "record_fsyncs",
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
def _or_skip(cm: AbstractContextManager[Path]) -> Iterator[Path]:
    """Enter a worker.dev.mounts context, skipping the test (with the reason) where the machine cannot mount."""
    try:
        mountpoint = cm.__enter__()
    except mounts.MountUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield mountpoint
    finally:
        cm.__exit__(None, None, None)


def xfs_reflink_mount(tmp_path: Path, *, size_mib: int = 300) -> AbstractContextManager[Path]:
    """A fresh XFS with reflink=1 under tmp_path (worker.dev.mounts.xfs_reflink), or a skip."""
    return _or_skip(mounts.xfs_reflink(tmp_path, size=size_mib << 20))


def tmpfs_mount(tmp_path: Path, *, size_mib: int) -> AbstractContextManager[Path]:
    """A tmpfs of size_mib under tmp_path (worker.dev.mounts.tmpfs), or a skip."""
    return _or_skip(mounts.tmpfs(tmp_path, size=size_mib << 20))


#: A child that holds a file the way a VM process would, says "ready", then waits to be killed.
_HOLDER = {
    "rw": "fd = os.open(path, os.O_RDWR)",
    "ro": "fd = os.open(path, os.O_RDONLY)",
    # Mapped, then the fd closed: only the mapping keeps the file open (as a VMM that mmaps its disk).
    # ctypes, because Python's mmap module keeps a dup of the fd open.
    "mmap": (
        "libc = ctypes.CDLL(None, use_errno=True); libc.mmap.restype = ctypes.c_void_p;"
        " libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,"
        " ctypes.c_long]; fd = os.open(path, os.O_RDWR); addr = libc.mmap(None, 4096, 3, 1, fd, 0);"
        " assert addr not in (None, 2**64 - 1); os.close(fd);"
        " assert not any(os.path.realpath(f'/proc/self/fd/{n}') == os.path.realpath(path)"
        " for n in os.listdir('/proc/self/fd') if os.path.exists(f'/proc/self/fd/{n}'))"
    ),
}


@contextmanager
def hold_open(path: Path, how: str) -> Iterator[subprocess.Popen[str]]:
    """A real child process holding `path` open read-write ("rw"), read-only ("ro") or mapped with its fd
    closed ("mmap") until the block ends (or the test kills it earlier: `.kill()` then `.wait()`)."""
    code = f"import ctypes, os, sys, time\npath = {str(path)!r}\n{_HOLDER[how]}\nprint('ready', flush=True)\n"
    code += "time.sleep(600)\n"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == "ready", f"holder ({how}) did not start: {line!r}"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (written back first), so that the next hash must read
    them: a template in the page cache is hashed through a mapping, without a read to fail or to count."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the path of every file or directory fsynced, in order (each fsync still runs)."""
    flushed: list[str] = []
    real = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return flushed

"""Read leases on templates: granted while no process writes the file, broken (and noticed) once one opens it."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from signal import SIGIO, SIGURG

import pytest

from tests.helpers import wait_until
from worker.core import lease
from worker.errors import FilesystemError, TemplateBusy


@contextmanager
def read_only(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def test_a_writer_opening_the_file_breaks_the_lease(tmp_path: Path) -> None:
    """A leased file passes the check until a process opens it for writing; then the check raises a transient
    TemplateBusy naming it, and the writer gets in once we let go. The break is announced with SIGURG, which a
    worker ignores, not with SIGIO, which would kill it."""
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(b"v1")
    opened = threading.Event()
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number)) for sig in (SIGIO, SIGURG)}

    def write() -> None:
        os.close(os.open(path, os.O_WRONLY))
        opened.set()

    writer = threading.Thread(target=write, daemon=True)
    try:
        with read_only(path) as fd:
            assert lease.take(fd, str(path)) is True
            lease.check(fd, str(path))
            writer.start()  # blocks in open() until the lease is gone
            wait_until(lambda: fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK, what="the lease to start breaking")
            with pytest.raises(TemplateBusy) as info:
                lease.check(fd, str(path))
            assert not opened.is_set()
        writer.join(timeout=10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert opened.is_set()
    assert (info.value.path, info.value.detail) == (str(path), "a process opened it for writing while it was read")
    assert info.value.transient
    assert received == [SIGURG]


def test_a_file_open_for_writing_cannot_be_leased(tmp_path: Path) -> None:
    """While some process has the file open for writing, taking the lease is a transient TemplateBusy naming it;
    once that writer closed it, the lease is granted."""
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(b"half written")
    with read_only(path) as fd:
        writer = os.open(path, os.O_WRONLY)
        try:
            with pytest.raises(TemplateBusy) as info:
                lease.take(fd, str(path))
        finally:
            os.close(writer)
        assert lease.take(fd, str(path)) is True
    assert (info.value.path, info.value.detail) == (str(path), "a process has it open for writing")
    assert str(info.value) == (
        f"template {path} is open for writing (a process has it open for writing); retry once the writer has closed it"
    )
    assert info.value.transient


@pytest.mark.parametrize("refusal", [errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_where_leases_are_refused_the_file_goes_unleased_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, refusal: int
) -> None:
    """A kernel or filesystem that refuses leases (not the owner, no support) is not an error: take says False,
    and the process logs that once, naming the file and the reason, however many files follow."""
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(b"x")
    real_fcntl = fcntl.fcntl

    def no_leases(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETLEASE:
            raise OSError(refusal, os.strerror(refusal))
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(lease, "_warned", False)  # as in a fresh process
    caplog.set_level(logging.WARNING, logger=lease.__name__)
    with read_only(path) as fd:
        with monkeypatch.context() as patched:
            patched.setattr(fcntl, "fcntl", no_leases)
            assert lease.take(fd, str(path)) is False
            assert lease.take(fd, "second") is False
        assert real_fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
        assert lease.take(fd, str(path)) is True
    assert caplog.messages == [
        f"no read lease on {path} ([Errno {refusal}] {os.strerror(refusal)}): a writer is detected only once it"
        " moves the mtime"
    ]


def test_a_bad_descriptor_is_a_filesystem_error(tmp_path: Path) -> None:
    """Taking or checking a lease on a descriptor that is not open is FilesystemError("lease template") naming
    the file, not a silent lease-less read."""
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(b"x")
    with read_only(path) as fd:
        pass
    for call in (lease.take, lease.check):
        with pytest.raises(FilesystemError) as info:
            call(fd, str(path))
        assert (info.value.op, info.value.path, info.value.errno) == ("lease template", str(path), errno.EBADF)

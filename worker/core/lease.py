"""Read leases on templates: proof that no process holds a template open for writing while we read it.

The stat checks around a hash or a copy (size, mtime, ctime) see a writer only once it has moved the
mtime. An operator's in-place `cp new.img rootfs.ext4` truncates the template and then writes it for
seconds; a clone opened inside that window would copy the bytes written so far and stamp them with their
hash. A read lease (`fcntl(F_SETLEASE, F_RDLCK)`) closes the gap: the kernel refuses it (EAGAIN) exactly
while some process has the file open for writing, and once granted, any later open for writing (or a
truncate) first breaks it: the writer's open() waits until we let go (at most /proc/sys/fs/lease-break-time
seconds) and `F_GETLEASE` then no longer reports our read lease. So: take the lease after opening the
template, check that it still holds after every read, and give up with the transient TemplateBusy if not.

A lease break is announced by a signal to the holder, SIGIO by default, whose default action kills the
process. We ask for SIGURG instead (`F_SETSIG`), whose default action is to ignore it: we poll the lease
state rather than wait for the signal.

Leases need the file to be owned by the process's uid, or CAP_LEASE (root has it), and a local filesystem
that supports them; where they are refused (EACCES, EPERM, EINVAL) the template is read without one and
only the stat checks guard it (logged once per process).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import signal

from worker.errors import FilesystemError, TemplateBusy

log = logging.getLogger(__name__)

#: Delivered on a lease break instead of SIGIO; its default action is to ignore it.
BREAK_SIGNAL = signal.SIGURG

#: The kernel will not give us a lease here: not the file's owner without CAP_LEASE, or no lease support.
_UNSUPPORTED = frozenset({errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

_warned = False


def take(fd: int, path: str) -> bool:
    """Put a read lease on `fd` (opened read-only): True when held, False where leases are unavailable.

    Raises TemplateBusy when some process has the file open for writing right now.
    """
    global _warned
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, BREAK_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            raise TemplateBusy(path, "a process has it open for writing") from exc
        if exc.errno in _UNSUPPORTED:
            if not _warned:
                _warned = True
                log.warning("no read lease on %s (%s): a writer is detected only once it moves the mtime", path, exc)
            return False
        raise FilesystemError.from_os(exc, op="lease template", path=path) from exc
    return True


def check(fd: int, path: str) -> None:
    """Raise TemplateBusy when a writer opened (or truncated) the file since `take`: the lease is breaking."""
    try:
        held = fcntl.fcntl(fd, fcntl.F_GETLEASE)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="lease template", path=path) from exc
    if held != fcntl.F_RDLCK:
        raise TemplateBusy(path, "a process opened it for writing while it was read")

"""Is a VM's disk held open by some process, and by which?

Two ways to know, measured in docs/benchmarks.md (bench/lifecycle_bench.py):

- a write lease, `fcntl(F_SETLEASE, F_WRLCK)`, is refused (EAGAIN) while any other open file description of
  the file exists: a read-write or read-only open, and also a mapping whose fd was closed (the mapping keeps
  its file description). It answers in O(1), a few microseconds, whatever the number of processes; it does
  not say who.
- a scan of /proc (every process's fds and maps) names the pids, in O(processes): milliseconds on a host
  with a thousand processes.

So the lease is the gate and the scan runs only when the gate says "held" (to name the holders), or when
leases cannot be taken here (a file we do not own without CAP_LEASE, leases disabled, a filesystem without
them): then the scan is the gate.

A lease held by us is broken by anyone opening the file, and the kernel then signals the holder (SIGIO by
default, which terminates a process): the probe asks for SIGURG instead (ignored by default) and holds the
lease for two syscalls only. The check is a moment's truth: a process may open the disk just after it.
Release runs it under the VM's lock, right before the rename into the trash, to keep that window at
microseconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from worker.errors import FilesystemError


def _close(fd: int) -> None:
    """A failing close() has released the fd all the same (Linux); nothing here was written through it."""
    with contextlib.suppress(OSError):
        os.close(fd)


#: (st_dev, st_ino): a file, whatever names it has (a jailer may hard-link the disk into its chroot).
FileId = tuple[int, int]

PROC = Path("/proc")


@dataclass(frozen=True)
class Usage:
    """A file's state: held open by another open file description, and by which pids when they are known."""

    in_use: bool
    pids: tuple[int, ...] = ()


FREE = Usage(False)


def lease_probe(fd: int, *, release: bool = True) -> bool | None:
    """True when `fd`'s file has no other open file description (in any process, ours included), False
    when it has one, None when no lease can be taken here (the caller must scan /proc instead).

    `release=False` leaves the lease to die with `fd` (closing it removes it): one syscall less for a
    caller that closes `fd` right away."""
    try:
        # Before the lease exists, so a break can never deliver SIGIO (default action: terminate).
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        return None  # EACCES (not our file, no CAP_LEASE), EINVAL (leases off, odd filesystem), ENOLCK
    if release:
        with contextlib.suppress(OSError):  # the lease dies with the fd anyway, closed by the caller
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def usage(dir_fd: int, name: str, path: Path, *, pids: bool = True) -> Usage:
    """Whether `name` in `dir_fd` is held open by another process, with the holders' pids when `pids`.

    Never follows a symlink; a missing or non-regular file is not in use (there is no disk to pull).
    """
    fid, verdict = probe(dir_fd, name, path)
    if fid is None or verdict is True:
        return FREE
    if verdict is False and not pids:
        return Usage(True)
    found = find_holders({fid}).get(fid, set())
    if verdict is None and not found:
        return FREE  # no lease possible and nobody found: as good as this host can tell
    return Usage(True, tuple(sorted(found)))


def probe(dir_fd: int, name: str, path: Path) -> tuple[FileId | None, bool | None]:
    """The file's id and its lease verdict (see `lease_probe`); (None, None) when there is no regular file.
    The probe's fd is closed before this returns, so a /proc scan that follows does not find us."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink where the disk belongs: nothing of ours to hold
            return None, None
        raise FilesystemError.from_os(exc, op="check clone in use", path=path / name) from exc
    try:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise FilesystemError.from_os(exc, op="check clone in use", path=path / name) from exc
        if not stat.S_ISREG(st.st_mode):
            return None, None
        return (st.st_dev, st.st_ino), lease_probe(fd)
    finally:
        _close(fd)


def find_holders(targets: Collection[FileId], *, proc: Path = PROC) -> dict[FileId, set[int]]:
    """The pids holding each of `targets` open or mapped, from one scan of /proc. O(processes x fds).

    Processes that vanish or that we may not inspect are skipped: the answer is what this host lets us see.
    """
    wanted = set(targets)
    found: dict[FileId, set[int]] = {}
    if not wanted:
        return found
    inodes = {ino for _, ino in wanted}
    needles = [f" {ino} ".encode() for ino in inodes]
    for entry in _pids(proc):
        pid = int(entry)
        base = f"{proc}/{entry}"
        for fid in _open_files(base, wanted):
            found.setdefault(fid, set()).add(pid)
        for fid in _mapped_files(base, wanted, needles):
            found.setdefault(fid, set()).add(pid)
    return found


def _pids(proc: Path) -> list[str]:
    try:
        return [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return []


def _open_files(base: str, wanted: set[FileId]) -> set[FileId]:
    hits: set[FileId] = set()
    fd_dir = f"{base}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return hits
    for fd in fds:
        link = f"{fd_dir}/{fd}"
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if not target.startswith("/") or target.startswith(("/dev/", "/proc/")):
            continue  # sockets, pipes, anon inodes, devices: never a clone
        try:
            st = os.stat(link)
        except OSError:
            continue
        fid = (st.st_dev, st.st_ino)
        if fid in wanted:
            hits.add(fid)
    return hits


def _mapped_files(base: str, wanted: set[FileId], needles: list[bytes]) -> set[FileId]:
    """Files mapped by the process, from /proc/<pid>/maps ("addr perms offset MAJ:MIN inode path")."""
    hits: set[FileId] = set()
    try:
        with open(f"{base}/maps", "rb") as f:
            data = f.read()
    except OSError:
        return hits
    if not any(needle in data for needle in needles):
        return hits
    for line in data.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        try:
            major, minor = (int(x, 16) for x in parts[3].split(b":"))
            fid = (os.makedev(major, minor), int(parts[4]))
        except ValueError:
            continue
        if fid in wanted:
            hits.add(fid)
    return hits

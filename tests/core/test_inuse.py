"""A disk in use is never deleted: release refuses a clone another process holds open, unless forced."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.helpers import hold_open, wait_until
from worker import CloneInUse
from worker.core import fsops, inuse
from worker.errors import FilesystemError


@pytest.mark.parametrize("how", ["rw", "ro", "mmap"])
def test_release_refuses_a_disk_held_open_and_goes_through_once_the_holder_exits(env: Env, how: str) -> None:
    """A clone held open (read-write, read-only, or only mapped) is refused with its holder's pid; once the
    holder exits, the same release deletes it."""
    env.template("base", b"B" * 8192)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with hold_open(rootfs.path, how) as holder:
        with pytest.raises(CloneInUse) as refused:
            env.registry.release("vm-1")
        assert refused.value.vm_id == "vm-1"
        assert refused.value.pids == [holder.pid]
        assert not refused.value.transient
        assert rootfs.path.read_bytes() == b"B" * 8192, "the refused release touched the disk"
        holder.kill()
        holder.wait()
        assert env.registry.release("vm-1") is True
    assert not (env.clones_dir / "vm-1").exists()


def test_force_deletes_a_disk_in_use(env: Env) -> None:
    """With force, a disk held open is released anyway (the holder keeps its own open inode)."""
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with hold_open(rootfs.path, "rw") as holder:
        assert env.registry.release("vm-1", force=True) is True
        assert not (env.clones_dir / "vm-1").exists()
        assert holder.poll() is None


def test_proc_scan_is_the_gate_where_no_lease_can_be_taken(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without leases (not our file, leases off) the /proc scan decides: a holder is found, none means free."""
    monkeypatch.setattr(inuse, "lease_probe", lambda fd, release=True: None)
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with hold_open(rootfs.path, "ro") as holder:
        with pytest.raises(CloneInUse) as refused:
            env.registry.release("vm-1")
        assert refused.value.pids == [holder.pid]
    assert env.registry.release("vm-1") is True


def test_a_closed_disk_is_free_and_a_lease_probe_leaves_no_lease(env: Env) -> None:
    """An idle clone reads as free, twice in a row (the probe's lease is gone), and its bytes are untouched."""
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    dir_fd = os.open(rootfs.path.parent, fsops.OPEN_DIR)
    try:
        assert inuse.usage(dir_fd, "rootfs.ext4", rootfs.path.parent) == inuse.FREE
        assert inuse.usage(dir_fd, "rootfs.ext4", rootfs.path.parent) == inuse.FREE
        assert inuse.usage(dir_fd, "missing", rootfs.path.parent) == inuse.FREE
    finally:
        os.close(dir_fd)
    with open(rootfs.path, "rb"):  # a plain open must not block on a lease left behind
        pass
    assert rootfs.path.read_bytes() == b"abc"


# ------------------------------------------------------------------------------------------ the lease probe


def test_lease_probe_says_free_or_held_and_leaves_the_file_open_to_others(tmp_path: Path) -> None:
    """The probe answers True for a file nobody else has open, False while another process holds it; once it
    has answered, the prober's own fd may stay open and anyone can still open the file for writing."""
    disk = tmp_path / "disk"
    disk.write_bytes(b"d" * 4096)
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert inuse.lease_probe(fd) is True
        other = os.open(disk, os.O_RDWR | os.O_NONBLOCK)  # no lease left on fd: no EWOULDBLOCK
        os.close(other)
        with hold_open(disk, "ro"):
            assert inuse.lease_probe(fd) is False
        assert inuse.lease_probe(fd) is True
    finally:
        os.close(fd)


#: The signal a lease break sends: ours (SIGURG, ignored by default) or the kernel's default (SIGIO, fatal).
_LEASE_SIGNALS = (signal.SIGURG, signal.SIGIO)


def test_a_lease_broken_while_it_is_held_signals_sigurg_never_sigio(tmp_path: Path) -> None:
    """An open that breaks the probe's lease sends SIGURG (ignored by default), not SIGIO (which would
    terminate the worker): a probe that keeps its lease until its fd closes is safe to race with."""
    disk = tmp_path / "disk"
    disk.write_bytes(b"d")
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _LEASE_SIGNALS}
    try:
        fd = os.open(disk, os.O_RDONLY)
        try:
            assert inuse.lease_probe(fd, release=False) is True
            with pytest.raises(BlockingIOError):  # our lease is still there: the open breaks it
                os.close(os.open(disk, os.O_RDWR | os.O_NONBLOCK))
            wait_until(lambda: received, what="the lease-break signal")
        finally:
            os.close(fd)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert received == [signal.SIGURG]


def test_a_failing_lease_unlock_does_not_change_the_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping the probe's lease may fail (the lease dies with the fd anyway): the answer is still given."""
    disk = tmp_path / "disk"
    disk.write_bytes(b"d")
    real_fcntl = fcntl.fcntl

    def failing_unlock(fd: int, cmd: int, arg: int = 0) -> int:
        result = real_fcntl(fd, cmd, arg)
        if cmd == fcntl.F_SETLEASE and arg == fcntl.F_UNLCK:
            raise OSError(errno.EIO, "injected")
        return result

    fd = os.open(disk, os.O_RDONLY)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(fcntl, "fcntl", failing_unlock)
            assert inuse.lease_probe(fd) is True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- usage()


def test_usage_without_pids_says_held_and_names_nobody(tmp_path: Path) -> None:
    """pids=False answers from the lease alone: held with no pids (no /proc scan), free when let go."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"d")
    dir_fd = os.open(tmp_path, fsops.OPEN_DIR)
    try:
        with hold_open(disk, "rw") as holder:
            assert inuse.usage(dir_fd, disk.name, tmp_path, pids=False) == inuse.Usage(True, ())
            assert inuse.usage(dir_fd, disk.name, tmp_path) == inuse.Usage(True, (holder.pid,))
        assert inuse.usage(dir_fd, disk.name, tmp_path, pids=False) == inuse.FREE
    finally:
        os.close(dir_fd)


def test_a_disk_held_where_no_process_shows_it_is_in_use_with_no_pids(tmp_path: Path) -> None:
    """A disk whose only other open file is in flight over a socket (in no fd table, in no mapping) is in
    use all the same, with no pid to name; free again once the socket is gone."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"d")
    dir_fd = os.open(tmp_path, fsops.OPEN_DIR)
    try:
        sender, receiver = socket.socketpair(socket.AF_UNIX)
        with sender, receiver:
            fd = os.open(disk, os.O_RDONLY)
            socket.send_fds(sender, [b"x"], [fd])
            os.close(fd)
            assert inuse.usage(dir_fd, disk.name, tmp_path) == inuse.Usage(True, ())
        assert inuse.usage(dir_fd, disk.name, tmp_path) == inuse.FREE
    finally:
        os.close(dir_fd)


def test_a_symlink_or_a_fifo_where_the_disk_belongs_is_not_in_use(tmp_path: Path) -> None:
    """Only a regular file is a disk: a symlink there is never followed (its target may be held) and a FIFO
    is neither waited on nor probed."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"t")
    os.symlink(target, tmp_path / "rootfs.ext4")
    os.mkfifo(tmp_path / "fifo.ext4")
    dir_fd = os.open(tmp_path, fsops.OPEN_DIR)
    try:
        with hold_open(target, "rw") as holder:
            assert inuse.usage(dir_fd, "elsewhere", tmp_path) == inuse.Usage(True, (holder.pid,))
            assert inuse.usage(dir_fd, "rootfs.ext4", tmp_path) == inuse.FREE
            assert inuse.usage(dir_fd, "fifo.ext4", tmp_path) == inuse.FREE
    finally:
        os.close(dir_fd)


#: A process holding a write lease on the file at argv[1]; it lets the lease go when the lease is broken.
_LEASE_HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
signal.signal(signal.SIGUSR1, lambda signum, frame: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK))
fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGUSR1)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_disk_under_another_probes_lease_fails_at_once_with_a_transient_error(tmp_path: Path) -> None:
    """While another prober holds its lease the check does not wait for it to let go: it fails at once with
    a transient FilesystemError naming the operation and the disk."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"d")
    holder = subprocess.Popen(
        [sys.executable, "-c", _LEASE_HOLDER, str(disk)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    dir_fd = os.open(tmp_path, fsops.OPEN_DIR)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(FilesystemError) as failed:
            inuse.usage(dir_fd, disk.name, tmp_path)
        assert (failed.value.op, failed.value.path, failed.value.errno) == (
            "check clone in use",
            str(disk),
            errno.EAGAIN,
        )
        assert failed.value.transient
    finally:
        os.close(dir_fd)
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait()
        holder.stdout.close()


def test_a_disk_that_cannot_be_examined_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing stat of the opened disk (EIO) is a FilesystemError with the operation, the disk and errno."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"d")

    def failing_fstat(fd: int) -> os.stat_result:
        raise OSError(errno.EIO, "injected")

    dir_fd = os.open(tmp_path, fsops.OPEN_DIR)
    try:
        assert inuse.usage(dir_fd, disk.name, tmp_path) == inuse.FREE
        with monkeypatch.context() as patch, pytest.raises(FilesystemError) as failed:
            patch.setattr(os, "fstat", failing_fstat)
            inuse.usage(dir_fd, disk.name, tmp_path)
    finally:
        os.close(dir_fd)
    assert (failed.value.op, failed.value.path, failed.value.errno, failed.value.strerror) == (
        "check clone in use",
        str(disk),
        errno.EIO,
        "injected",
    )


def test_a_failing_close_after_the_probe_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() may report EIO after releasing the fd: the probe's answer stands and no fd is left open."""
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"d")
    real_close = os.close

    def failing_close(fd: int) -> None:
        real_close(fd)
        raise OSError(errno.EIO, "injected")

    dir_fd = os.open(tmp_path, fsops.OPEN_DIR)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "close", failing_close)
            verdict = inuse.usage(dir_fd, disk.name, tmp_path)
    finally:
        os.close(dir_fd)
    assert verdict == inuse.FREE
    assert inuse.find_holders({_fid(disk)}) == {}


# ----------------------------------------------------------------------------------------- the /proc scan


def _fid(path: Path) -> inuse.FileId:
    st = path.stat()
    return st.st_dev, st.st_ino


def test_proc_scan_counts_open_files_and_skips_what_it_cannot_read(tmp_path: Path) -> None:
    """In a /proc where some fds cannot be read or stat'ed (closed meanwhile), the holder of the disk is
    still found however its fds are ordered; a process that only has sockets and dead links holds nothing."""
    disk = tmp_path / "disk"
    disk.write_bytes(b"d")
    proc = tmp_path / "proc"
    fds = proc / "101" / "fd"
    fds.mkdir(parents=True)
    for n in range(40):  # the holder's fd sits in the middle of fds that fail, in whatever order listdir gives
        if n == 20:
            os.symlink(disk, fds / str(n))
        elif n % 2:
            (fds / str(n)).write_text("not a link")  # readlink fails
        else:
            os.symlink(tmp_path / "gone" / str(n), fds / str(n))  # stat fails
    other = proc / "102" / "fd"
    other.mkdir(parents=True)
    os.symlink("socket:[1234]", other / "0")
    os.symlink(tmp_path / "gone", other / "1")
    (proc / "self").mkdir()  # not a pid
    assert inuse.find_holders({_fid(disk)}, proc=proc) == {_fid(disk): {101}}
    assert inuse.find_holders(set(), proc=proc) == {}
    assert inuse.find_holders({_fid(disk)}, proc=tmp_path / "no-proc") == {}


def test_proc_scan_never_takes_a_device_or_proc_path_for_a_clone(tmp_path: Path) -> None:
    """An fd whose link names a path under /dev or /proc (devices, shm, proc entries) is never counted as a
    holder, even where that path leads to the disk; a relative link (socket, pipe) neither; a plain path is."""
    disk = tmp_path / "disk"
    disk.write_bytes(b"d")
    proc = tmp_path / "proc"
    fd = os.open(disk, os.O_RDONLY)  # /dev/fd/<fd> and /proc/self/fd/<fd> lead to the disk from here
    try:
        for pid, target in ((201, f"/dev/fd/{fd}"), (202, f"/proc/self/fd/{fd}"), (203, str(disk))):
            (proc / str(pid) / "fd").mkdir(parents=True)
            os.symlink(target, proc / str(pid) / "fd" / "3")
        (proc / "204" / "fd").mkdir(parents=True)
        os.symlink(os.path.relpath(disk, proc / "204" / "fd"), proc / "204" / "fd" / "3")
        assert os.stat(proc / "204" / "fd" / "3").st_ino == _fid(disk)[1]
        assert os.stat(proc / "201" / "fd" / "3").st_ino == _fid(disk)[1]
        assert inuse.find_holders({_fid(disk)}, proc=proc) == {_fid(disk): {203}}
    finally:
        os.close(fd)


def test_proc_scan_finds_a_mapping_under_a_path_with_spaces_past_odd_lines(tmp_path: Path) -> None:
    """A mapped disk is found from /proc/<pid>/maps even when its path has spaces and lines the scan cannot
    parse come first; a process that maps other files does not hold it."""
    disk = tmp_path / "a dir" / "my disk"
    disk.parent.mkdir()
    disk.write_bytes(b"d")
    dev, ino = _fid(disk)
    here = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    proc = tmp_path / "proc"
    maps = {
        301: [
            "00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/vmm",
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 ",
            f"7f0000001000-7f0000002000 rw-s 00000000 zz:01 {ino}      /odd device",
            f"7f0000002000-7f0000003000 rw-s 00000000 {here} notanumber      /odd inode {ino} ",
            f"7f0000003000-7f0000004000 rw-s 00000000 {here} {ino}      {disk}",
        ],
        302: [f"7f0000003000-7f0000004000 rw-s 00000000 {here} {ino + 1}      {tmp_path}/other {ino} "],
        303: ["7f0000003000-7f0000004000 rw-s 00000000 00:00 0 "],
    }
    for pid, lines in maps.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "maps").write_text("\n".join(lines) + "\n")
    assert inuse.find_holders({(dev, ino)}, proc=proc) == {(dev, ino): {301}}

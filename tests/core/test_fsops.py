"""The fd-relative file primitives: what they leave on disk and how their failures are named."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.core import fsops
from worker.errors import FilesystemError


@pytest.fixture
def vm_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "vm-1"
    path.mkdir()
    fd = os.open(path, fsops.OPEN_DIR)
    try:
        yield path, fd
    finally:
        os.close(fd)


def test_read_text_trims_unless_asked_not_to(vm_dir: tuple[Path, int]) -> None:
    """A stamp reads trimmed (as the seed writes and reads it), an owner record exactly; a missing file is None."""
    path, fd = vm_dir
    (path / "stamp").write_text("  abc\n")
    assert fsops.read_text(fd, "stamp", path) == "abc"
    assert fsops.read_text(fd, "stamp", path, strip=False) == "  abc\n"
    assert fsops.read_text(fd, "missing", path) is None


@pytest.mark.parametrize(("plant", "code"), [("directory", errno.EISDIR), ("symlink", errno.ELOOP)])
def test_read_text_refuses_what_is_not_a_file(vm_dir: tuple[Path, int], plant: str, code: int) -> None:
    """A directory or a symlink where a small file belongs is a FilesystemError naming it, never followed."""
    path, fd = vm_dir
    if plant == "directory":
        (path / "stamp").mkdir()
    else:
        (path / "target").write_text("elsewhere")
        (path / "stamp").symlink_to(path / "target")
    with pytest.raises(FilesystemError) as info:
        fsops.read_text(fd, "stamp", path)
    assert (info.value.op, info.value.path, info.value.errno) == ("read", str(path / "stamp"), code)


@pytest.mark.parametrize("durable", [True, False])
def test_write_atomic_replaces_the_whole_file_and_leaves_no_partial(vm_dir: tuple[Path, int], durable: bool) -> None:
    """The file holds exactly the new bytes, readable by others (0644), and no .partial is left."""
    path, fd = vm_dir
    (path / "stamp").write_text("old and longer")
    fsops.write_atomic(fd, "stamp", b"new", path, durable=durable)
    assert (path / "stamp").read_bytes() == b"new"
    assert (path / "stamp").stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert sorted(p.name for p in path.iterdir()) == ["stamp"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_atomic_failure_names_the_file(vm_dir: tuple[Path, int]) -> None:
    """A write that cannot land (a directory is in the way) is a FilesystemError naming the target file."""
    path, fd = vm_dir
    (path / "stamp").mkdir()
    (path / "stamp" / "inside").write_text("x")
    with pytest.raises(FilesystemError) as info:
        fsops.write_atomic(fd, "stamp", b"new", path)
    assert (info.value.op, info.value.path) == ("write", str(path / "stamp"))
    fsops.write_atomic(fd, "other", b"fine", path)
    assert (path / "other").read_bytes() == b"fine"


def test_unlink_removes_files_and_directories_and_ignores_missing(vm_dir: tuple[Path, int]) -> None:
    """unlink removes a file, a whole directory left where a file belongs, and is quiet when nothing is there."""
    path, fd = vm_dir
    (path / "file").write_text("x")
    (path / "dir").mkdir()
    (path / "dir" / "inside").write_text("x")
    for name in ("file", "dir", "missing"):
        fsops.unlink(fd, name, path)
    assert list(path.iterdir()) == []


def test_unlink_failure_names_the_file(vm_dir: tuple[Path, int]) -> None:
    """An unlink refused by the filesystem (an immutable file) is a FilesystemError naming it."""
    path, fd = vm_dir
    victim = path / "rootfs.ext4"
    victim.write_text("x")
    if subprocess.run(["chattr", "+i", str(victim)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(FilesystemError) as info:
            fsops.unlink(fd, "rootfs.ext4", path)
        assert (info.value.op, info.value.path, info.value.errno) == ("remove", str(victim), errno.EPERM)
    finally:
        subprocess.run(["chattr", "-i", str(victim)], check=True)


def test_delete_quietly_removes_trees_and_files_and_warns_instead_of_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Released clones are deleted whole; what cannot be deleted is logged by name and never raised."""
    tree = tmp_path / "vm-1.abc"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "rootfs.ext4").write_text("x")
    loose = tmp_path / "loose"
    loose.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(tree)
    fsops.delete_quietly(link)  # a symlink goes, never what it points to
    assert tree.exists() and not link.exists()
    for path in (tree, loose, tmp_path / "missing"):
        fsops.delete_quietly(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert caplog.text == ""

    stuck_dir = tmp_path / "vm-2.def"
    stuck_dir.mkdir()
    stuck = stuck_dir / "rootfs.ext4"
    stuck.write_text("x")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        fsops.delete_quietly(stuck_dir)
        fsops.delete_quietly(stuck)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    messages = [r.getMessage() for r in caplog.records]
    assert f"could not delete released clone {stuck}: [Errno 1] Operation not permitted: 'rootfs.ext4'" in messages
    assert f"could not delete released clone {stuck}: [Errno 1] Operation not permitted: '{stuck}'" in messages


class _Unreadable:
    """A directory entry whose type cannot be read (as after an I/O error)."""

    name = "broken"

    def is_dir(self) -> bool:
        raise OSError(errno.EIO, "Input/output error")


def test_an_entry_whose_type_cannot_be_read_is_not_a_directory(tmp_path: Path) -> None:
    """is_dir answers False for an entry it cannot examine, True for a real directory."""
    (tmp_path / "d").mkdir()
    (real,) = os.scandir(tmp_path)
    assert fsops.is_dir(real) is True
    assert fsops.is_dir(_Unreadable()) is False  # type: ignore[arg-type]


def test_a_directory_that_cannot_be_removed_whole_is_not_an_error(vm_dir: tuple[Path, int]) -> None:
    """A directory left where a file belongs is removed as far as it can be; what resists stays, without error."""
    path, fd = vm_dir
    (path / "rootfs.ext4.partial").mkdir()
    stuck = path / "rootfs.ext4.partial" / "stuck"
    stuck.write_text("x")
    (path / "rootfs.ext4.partial" / "loose").write_text("x")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        fsops.unlink(fd, "rootfs.ext4.partial", path)
        assert sorted(p.name for p in (path / "rootfs.ext4.partial").iterdir()) == ["stuck"]
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


def test_write_atomic_overwrites_a_stale_partial_whole(vm_dir: tuple[Path, int]) -> None:
    """A longer partial left by a crash does not leak its tail into the new file."""
    path, fd = vm_dir
    (path / "stamp.partial").write_text("left by a crash, longer than the new content")
    fsops.write_atomic(fd, "stamp", b"new", path)
    assert (path / "stamp").read_bytes() == b"new"


def test_write_atomic_never_writes_through_a_planted_symlink(vm_dir: tuple[Path, int], tmp_path: Path) -> None:
    """A symlink planted as the partial is refused (ELOOP), and its target keeps its bytes."""
    path, fd = vm_dir
    target = tmp_path / "host-file"
    target.write_text("host data")
    (path / "stamp.partial").symlink_to(target)
    with pytest.raises(FilesystemError) as info:
        fsops.write_atomic(fd, "stamp", b"new", path)
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(path / "stamp"), errno.ELOOP)
    assert target.read_text() == "host data"


def test_a_fifo_planted_as_a_small_file_reads_as_empty_without_hanging(vm_dir: tuple[Path, int]) -> None:
    """A FIFO where a stamp or owner record belongs reads as empty at once: nobody can make the worker wait."""
    path, fd = vm_dir
    os.mkfifo(path / "stamp")
    assert fsops.read_text(fd, "stamp", path) == ""


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _failing(code: int) -> Any:
    def fail(*_: object, **__: object) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


def test_open_dir_opens_a_directory_and_names_what_it_refuses(tmp_path: Path) -> None:
    """A real directory opens; a symlink to one or a missing path is a FilesystemError with the caller's op."""
    real = tmp_path / "clones"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    fd = fsops.open_dir(real, op="flush clones dir")
    try:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    for name, code in (("link", errno.ENOTDIR), ("missing", errno.ENOENT)):
        with pytest.raises(FilesystemError) as info:
            fsops.open_dir(tmp_path / name, op="flush clones dir")
        assert (info.value.op, info.value.path, info.value.errno) == ("flush clones dir", str(tmp_path / name), code)


def test_fsync_dir_flushes_a_directory_and_names_its_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flushing a directory works; one that cannot be opened or flushed is a "flush dir" FilesystemError naming it."""
    real = tmp_path / "clones"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    fsops.fsync_dir(real)
    with pytest.raises(FilesystemError) as info:
        fsops.fsync_dir(tmp_path / "link")
    assert (info.value.op, info.value.path, info.value.errno) == ("flush dir", str(tmp_path / "link"), errno.ENOTDIR)
    before = _open_fds()
    monkeypatch.setattr(os, "fsync", _failing(errno.EIO))
    with pytest.raises(FilesystemError) as info:
        fsops.fsync_dir(real)
    assert (info.value.op, info.value.path, info.value.errno) == ("flush dir", str(real), errno.EIO)
    assert _open_fds() == before


@pytest.mark.parametrize("durable", [True, False])
def test_write_atomic_flushes_only_when_durable_which_is_the_default(
    vm_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """By default (and with durable=True) a failing flush is a "write" FilesystemError naming the file, which keeps
    its old bytes; with durable=False no flush is asked for, so the write lands."""
    path, fd = vm_dir
    (path / "stamp").write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _failing(errno.EIO))
    if durable:
        for kwargs in ({}, {"durable": True}):
            with pytest.raises(FilesystemError) as info:
                fsops.write_atomic(fd, "stamp", b"new", path, **kwargs)
            assert (info.value.op, info.value.path, info.value.errno) == ("write", str(path / "stamp"), errno.EIO)
            assert (path / "stamp").read_bytes() == b"old"
    else:
        fsops.write_atomic(fd, "stamp", b"new", path, durable=False)
        assert (path / "stamp").read_bytes() == b"new"


def test_a_failing_write_is_named_and_leaks_no_descriptor(
    vm_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the disk refuses (ENOSPC) is a "write" FilesystemError naming the file, and closes what it opened."""
    path, fd = vm_dir
    before = _open_fds()
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", _failing(errno.ENOSPC))
        with pytest.raises(FilesystemError) as info:
            fsops.write_partial(fd, "stamp", b"digest", path)
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(path / "stamp"), errno.ENOSPC)
    assert _open_fds() == before
    written = fsops.write_partial(fd, "stamp", b"digest", path)
    try:
        assert (path / "stamp.partial").read_bytes() == b"digest"
    finally:
        os.close(written)


def test_read_small_file_returns_up_to_the_limit_and_nothing_odd(vm_dir: tuple[Path, int], tmp_path: Path) -> None:
    """A regular file of at most `limit` bytes reads whole; one byte more, a FIFO, a directory, a symlink (even
    to a small file) or a missing name read as None."""
    path, fd = vm_dir
    (path / "exact").write_bytes(b"x" * 16)
    (path / "over").write_bytes(b"x" * 17)
    (path / "dir").mkdir()
    os.mkfifo(path / "fifo")
    (tmp_path / "small").write_bytes(b"tiny")
    (path / "link").symlink_to(tmp_path / "small")
    assert fsops.read_small_file(fd, "exact", limit=16) == b"x" * 16
    assert fsops.read_small_file(fd, "over", limit=17) == b"x" * 17
    for name in ("over", "dir", "fifo", "link", "missing"):
        assert fsops.read_small_file(fd, name, limit=16) is None, name


def test_read_small_file_refuses_a_file_bigger_than_its_reported_size() -> None:
    """A file that reports size 0 but holds more than `limit` bytes (as /proc files do) reads as None."""
    proc = os.open(f"/proc/{os.getpid()}", fsops.OPEN_DIR)
    try:
        assert os.stat("status", dir_fd=proc).st_size == 0
        assert fsops.read_small_file(proc, "status", limit=16) is None
        status = fsops.read_small_file(proc, "status", limit=65536)
        assert status is not None and status.startswith(b"Name:")
    finally:
        os.close(proc)


def test_closing_a_descriptor_never_raises(tmp_path: Path) -> None:
    """close() releases the descriptor, and a failing close (here EBADF, already closed) is not an error."""
    fd = os.open(tmp_path, fsops.OPEN_DIR)
    fsops.close(fd)
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    fsops.close(fd)


def test_write_new_creates_the_file_whole_and_flushes_nothing(
    vm_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_new makes a new file holding exactly the data, in one write and with no fsync, and leaves no
    partial; a file already there is an error naming it, and is left as it was."""
    path, fd = vm_dir
    writes: list[int] = []
    real_write = os.write

    def write(target: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(target, data)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", lambda _: pytest.fail("write_new flushed"))
    fsops.write_new(fd, ".vm-id", b"vm-1", path)
    assert (path / ".vm-id").read_bytes() == b"vm-1"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((path / ".vm-id").stat().st_mode) == 0o644 & ~umask
    assert writes == [4]
    assert sorted(os.listdir(path)) == [".vm-id"]
    with pytest.raises(FilesystemError) as info:
        fsops.write_new(fd, ".vm-id", b"vm-2", path)
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(path / ".vm-id"), errno.EEXIST)
    assert (path / ".vm-id").read_bytes() == b"vm-1"


def test_write_new_of_more_than_a_page_goes_through_a_partial(
    vm_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data larger than one page (which one write could leave torn) is written and renamed into place instead."""
    path, fd = vm_dir
    renamed: list[str] = []
    real_rename = os.rename

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        renamed.append(str(src))
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", lambda _: pytest.fail("write_new flushed"))
    fsops.write_new(fd, "big", b"y" * fsops.ONE_PAGE, path)
    assert renamed == []
    fsops.write_new(fd, "bigger", b"z" * (fsops.ONE_PAGE + 1), path)
    assert renamed == ["bigger.partial"]
    assert (path / "bigger").read_bytes() == b"z" * (fsops.ONE_PAGE + 1)
    assert sorted(os.listdir(path)) == ["big", "bigger"]


def test_write_new_never_leaves_a_torn_file(vm_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a write ever come back short, the file is removed and the error names it (a prefix of a vm id
    would claim the directory for another VM); a failing write is named too, and removes nothing else."""
    path, fd = vm_dir
    monkeypatch.setattr(os, "write", lambda target, data: len(data) - 1)
    with pytest.raises(FilesystemError) as info:
        fsops.write_new(fd, ".vm-id", b"vm-1", path)
    assert (info.value.op, info.value.path, info.value.errno) == ("write", str(path / ".vm-id"), errno.EIO)
    assert info.value.strerror == "short write"
    assert not (path / ".vm-id").exists()

    def enospc(target: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(FilesystemError) as info:
        fsops.write_new(fd, ".clone.json", b"{}", path)
    assert (info.value.op, info.value.errno) == ("write", errno.ENOSPC)
    assert info.value.transient

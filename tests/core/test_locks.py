"""Cross-process locks: one holder at a time, also when the lock file is removed and re-created under waiters."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import wait_until
from worker.core import locks
from worker.errors import FilesystemError


def waiters_on(path_ino: int) -> int:
    """How many flock waiters the kernel lists for the inode (blocked lock requests show as `->` in /proc/locks)."""
    count = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and fields[-3].endswith(f":{path_ino}"):
            count += 1
    return count


def in_thread(body: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_exclusive_lets_one_holder_in_at_a_time(tmp_path: Path) -> None:
    """A second holder waits until the first leaves, then gets in; the lock file is created with its dirs."""
    path = tmp_path / "locks" / "vm-1.lock"
    entered = threading.Event()

    def second() -> None:
        with locks.exclusive(path):
            entered.set()

    with locks.exclusive(path):
        assert path.exists()
        waiter = in_thread(second)
        wait_until(lambda: waiters_on(path.stat().st_ino) == 1, what="the second holder to wait", timeout=20)
        assert not entered.is_set()
    waiter.join(timeout=30)
    assert entered.is_set()


def test_a_waiter_on_a_replaced_lock_file_waits_for_the_new_holder(tmp_path: Path) -> None:
    """A waiter that opened the old lock file, removed and re-created meanwhile, never runs beside the new holder."""
    path = tmp_path / "vm-1.lock"
    entered = threading.Event()

    def waiter_body() -> None:
        with locks.exclusive(path):
            entered.set()

    first = locks.exclusive(path)
    first.__enter__()
    old_ino = path.stat().st_ino
    waiter = in_thread(waiter_body)
    wait_until(lambda: waiters_on(old_ino) == 1, what="the waiter to block on the old lock file", timeout=20)
    path.unlink()
    newcomer = locks.exclusive(path)  # creates a new lock file and takes it at once
    newcomer.__enter__()
    new_ino = path.stat().st_ino
    assert new_ino != old_ino
    first.__exit__(None, None, None)  # the waiter now gets the old, unlinked file: it must notice and wait again
    wait_until(
        lambda: entered.is_set() or waiters_on(new_ino) == 1, what="the waiter to retry on the new file", timeout=20
    )
    assert not entered.is_set(), "the waiter ran while the new holder held the lock"
    newcomer.__exit__(None, None, None)
    waiter.join(timeout=30)
    assert entered.is_set()


def test_a_waiter_whose_lock_file_was_removed_locks_a_new_one(tmp_path: Path) -> None:
    """When the holder removes the lock file on leaving, the waiter takes a new file at the path, which others see."""
    path = tmp_path / "vm-1.lock"
    inside = threading.Event()
    leave = threading.Event()

    def waiter_body() -> None:
        with locks.exclusive(path):
            inside.set()
            leave.wait(30)

    with locks.exclusive(path, remove_if=lambda: True):
        old_ino = path.stat().st_ino
        waiter = in_thread(waiter_body)
        wait_until(lambda: waiters_on(old_ino) == 1, what="the waiter to block", timeout=20)
    wait_until(inside.is_set, what="the waiter to get in", timeout=20)
    try:
        assert path.exists()
        with locks.try_exclusive(path) as mine:
            assert mine is False, "the waiter holds a lock nobody else can see"
    finally:
        leave.set()
        waiter.join(timeout=30)
    with locks.try_exclusive(path) as mine:
        assert mine is True


def test_remove_if_decides_whether_the_lock_file_goes(tmp_path: Path) -> None:
    """The lock file is removed on leaving exactly when remove_if says so, and kept otherwise."""
    kept, removed = tmp_path / "kept.lock", tmp_path / "removed.lock"
    with locks.exclusive(kept, remove_if=lambda: False):
        pass
    with locks.exclusive(removed, remove_if=lambda: True):
        pass
    with locks.exclusive(tmp_path / "default.lock"):
        pass
    assert kept.exists() and not removed.exists() and (tmp_path / "default.lock").exists()


def test_remove_if_tolerates_a_lock_file_already_gone(tmp_path: Path) -> None:
    """A lock file someone else removed while held is not an error when it is to be removed anyway."""
    path = tmp_path / "gone.lock"
    with locks.exclusive(path, remove_if=lambda: True):
        path.unlink()
    assert not path.exists()


def test_try_exclusive_answers_at_once(tmp_path: Path) -> None:
    """try_exclusive yields False while another holder has the lock, True once it is free, creating its dirs."""
    path = tmp_path / "a" / "b" / ".warm.lock"
    with locks.try_exclusive(path) as first:
        assert first is True
        with locks.try_exclusive(path) as second:
            assert second is False
        with locks.exclusive(path.with_name("other.lock")):
            pass
    with locks.try_exclusive(path) as again:
        assert again is True


@pytest.mark.parametrize("use", ["exclusive", "try_exclusive"])
def test_unusable_lock_path_is_a_filesystem_error_naming_it(tmp_path: Path, use: str) -> None:
    """A lock whose directory cannot exist (a file is in the way) is a permanent FilesystemError naming the path."""
    (tmp_path / "file").write_text("in the way")
    path = tmp_path / "file" / "vm-1.lock"
    with (
        pytest.raises(FilesystemError) as info,
        locks.exclusive(path) if use == "exclusive" else locks.try_exclusive(path),
    ):
        pass
    assert (info.value.op, info.value.path) == ("lock", str(path))
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert not info.value.transient
    with locks.exclusive(tmp_path / "fine.lock") if use == "exclusive" else locks.try_exclusive(tmp_path / "f.lock"):
        pass


@pytest.mark.parametrize("use", ["exclusive", "try_exclusive"])
def test_a_symlink_as_lock_file_is_refused(tmp_path: Path, use: str) -> None:
    """A symlink planted at the lock path is not followed: the lock fails (ELOOP) and the target is untouched."""
    target = tmp_path / "target"
    path = tmp_path / "locks" / "vm-1.lock"
    path.parent.mkdir()
    path.symlink_to(target)
    with (
        pytest.raises(FilesystemError) as info,
        locks.exclusive(path) if use == "exclusive" else locks.try_exclusive(path),
    ):
        pass
    assert (info.value.op, info.value.path, info.value.errno) == ("lock", str(path), errno.ELOOP)
    assert not target.exists()


def test_non_blocking_exclusive_says_no_at_once_and_touches_nothing(tmp_path: Path) -> None:
    """blocking=False yields False while another holds the lock (and removes nothing), True when it is free."""
    path = tmp_path / "vm-1.lock"
    with locks.exclusive(path) as held:
        assert held is True
        with locks.exclusive(path, blocking=False, remove_if=lambda: True) as second:
            assert second is False
        assert path.exists()
    with locks.exclusive(path, blocking=False, remove_if=lambda: True) as free:
        assert free is True
        with locks.exclusive(path, blocking=False) as other:
            assert other is False
    assert not path.exists()


def test_lock_files_are_private(tmp_path: Path) -> None:
    """Lock files are created readable and writable by their owner only (0600), whatever the umask allows."""
    old = os.umask(0)
    try:
        for make in (locks.exclusive, locks.try_exclusive):
            path = tmp_path / f"{make.__name__}.lock"
            with make(path):
                pass
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_failing_flock_is_a_filesystem_error_and_leaks_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock refused by the kernel (ENOLCK: out of lock records) is a transient FilesystemError naming the lock
    file, and the descriptor opened for it is closed."""
    path = tmp_path / "vm-1.lock"

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(FilesystemError) as info, locks.exclusive(path):
        pass
    assert (info.value.op, info.value.path, info.value.errno) == ("lock", str(path), errno.ENOLCK)
    assert info.value.transient
    assert len(os.listdir("/proc/self/fd")) == before
    monkeypatch.undo()
    with locks.exclusive(path) as held:
        assert held is True


def test_a_lock_file_that_cannot_be_removed_is_left_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock file that resists removal (EROFS here) stays behind with a warning naming it and why; leaving the
    lock is not an error, and the lock still works afterwards."""
    path = tmp_path / "vm-1.lock"

    def read_only(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as patched:
        patched.setattr(Path, "unlink", read_only)
        with locks.exclusive(path, remove_if=lambda: True) as held:
            assert held is True
    assert path.exists()
    assert caplog.messages == [f"could not remove lock file {path}: [Errno 30] Read-only file system: '{path}'"]
    with locks.exclusive(path, remove_if=lambda: True) as held:
        assert held is True
    assert not path.exists()


def test_the_lock_dir_is_made_on_first_use_and_only_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first lock makes its directory (parents too); a lock file that still cannot be created after that
    is a FilesystemError naming it, not an endless retry."""
    path = tmp_path / "a" / ".locks" / "vm-1.lock"
    with locks.exclusive(path) as held:
        assert held and path.exists()
    real_open = os.open
    calls = []

    def never(file: object, flags: int, *args: object, **kw: object) -> int:
        if str(file) == str(tmp_path / "b" / "vm-1.lock"):
            calls.append(file)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_open(file, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", never)
    with pytest.raises(FilesystemError) as info, locks.exclusive(tmp_path / "b" / "vm-1.lock"):
        pass
    assert (info.value.op, info.value.path, info.value.errno) == (
        "lock",
        str(tmp_path / "b" / "vm-1.lock"),
        errno.ENOENT,
    )
    assert len(calls) == 2 and (tmp_path / "b").is_dir()


def test_a_lock_dir_made_by_another_process_meanwhile_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first lockers race to make the lock dir: the one whose mkdir finds it made already locks all the same."""
    path = tmp_path / ".locks" / "vm-1.lock"
    real_open = os.open
    first = [True]

    def raced(file: object, flags: int, *args: object, **kw: object) -> int:
        if str(file) == str(path) and first[0]:
            first[0] = False
            path.parent.mkdir()  # the other process, between our open and our mkdir
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_open(file, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", raced)
    with locks.exclusive(path) as held:
        assert held and path.exists()

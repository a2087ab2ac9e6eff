"""Start-up fix-up: leftovers of crashed clones and releases go; complete clones are never touched."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.core.test_reconcile import snapshot
from tests.helpers import hold_open
from worker.core import fixup, locks
from worker.core.config import RootfsConfig
from worker.core.fixup import FixupReport
from worker.errors import FilesystemError


def make_old(path: Path, seconds: float = 3600) -> None:
    then = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (then, then), follow_symlinks=False)


def clone_files(snap: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    """The files of the two complete clones (the directory's own mtime moves when a stray file goes)."""
    return {k: v for k, v in snap.items() if k.startswith(("vm-ours/", "seed-vm/"))}


def test_sweep_removes_what_crashes_left_and_never_a_complete_clone(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Partial clones, trash, stray partial files and orphaned lock files go; every complete clone stays."""
    env.template("base", b"B" * 4096)
    ours = env.registry.clone_for_vm("vm-ours", "base").path.parent
    seed = env.clones_dir / "seed-vm"
    seed.mkdir()
    (seed / "rootfs.ext4").write_bytes(b"B" * 4096)
    (seed / "rootfs.ext4.sha256").write_text("a" * 64)
    (ours / ".vm-id.partial").write_text("half")  # a claim interrupted beside a complete clone
    crashed = env.clones_dir / "vm-crashed"  # killed mid-copy: a partial disk and our records
    crashed.mkdir()
    (crashed / "rootfs.ext4.partial").write_bytes(b"x" * 1000)
    (crashed / ".vm-id").write_text("vm-crashed")
    unstamped = env.clones_dir / "seed-unstamped"  # the seed killed between its copy and its stamp
    unstamped.mkdir()
    (unstamped / "rootfs.ext4").write_bytes(b"x")
    (env.clones_dir / ".trash" / "vm-old.0123").mkdir(parents=True)
    (env.clones_dir / ".trash" / "vm-old.0123" / "rootfs.ext4").write_bytes(b"x")
    (env.clones_dir / ".locks" / "vm-gone.lock").write_text("")
    for path in (crashed, unstamped):
        make_old(path)
    complete_before = clone_files(snapshot(env.clones_dir))
    del complete_before["vm-ours/.vm-id.partial"]

    with caplog.at_level(logging.INFO, logger="worker.core.fixup"):
        report = env.registry.fixup()

    assert sorted(report.partial_clones) == ["seed-unstamped", "vm-crashed"]
    assert report.partial_files == ["vm-ours/.vm-id.partial"]
    assert report.trash == [".trash/vm-old.0123"]
    assert report.locks == [".locks/vm-gone.lock"]
    assert report.failed == {}
    after = snapshot(env.clones_dir)
    assert clone_files(after) == complete_before
    assert not crashed.exists() and not unstamped.exists()
    assert not list((env.clones_dir / ".trash").iterdir())
    assert "removed incomplete clone" in caplog.text and "vm-crashed" in caplog.text
    assert not (env.clones_dir / ".locks" / "seed-vm.lock").exists(), "a complete clone was locked"
    assert env.registry.fixup().removed == 0  # a second sweep finds nothing


def test_sweep_spares_leftovers_someone_may_be_working_on(env: Env) -> None:
    """An incomplete clone that is fresh, locked, or whose disk is held open is left alone."""
    fresh = env.clones_dir / "vm-fresh"  # the seed may be copying into it right now
    fresh.mkdir(parents=True)
    (fresh / "rootfs.ext4").write_bytes(b"x")
    locked = env.clones_dir / "vm-locked"
    locked.mkdir()
    (locked / "rootfs.ext4.partial").write_bytes(b"x")
    held = env.clones_dir / "vm-held"
    held.mkdir()
    (held / "rootfs.ext4").write_bytes(b"x")
    make_old(locked)
    make_old(held)
    with (
        locks.exclusive(env.clones_dir / ".locks" / "vm-locked.lock"),
        hold_open(held / "rootfs.ext4", "rw"),
    ):
        report = fixup.sweep(env.registry.config)
    assert report.partial_clones == []
    assert fresh.exists() and locked.exists() and held.exists()
    assert (env.clones_dir / ".locks" / "vm-locked.lock").exists()
    make_old(fresh)
    assert sorted(fixup.sweep(env.registry.config).partial_clones) == ["vm-fresh", "vm-held", "vm-locked"]


def incomplete_clone(clones: Path, name: str, *files: str) -> Path:
    """A VM directory holding only `files` (one byte each), unchanged for an hour: an interrupted clone."""
    vm = clones / name
    vm.mkdir(parents=True)
    for f in files:
        (vm / f).write_bytes(b"x")
    make_old(vm)
    return vm


def complete_clone(clones: Path, name: str) -> Path:
    """A VM directory with a disk and its stamp, as the seed leaves it."""
    vm = clones / name
    vm.mkdir(parents=True)
    (vm / "rootfs.ext4").write_bytes(b"B" * 4096)
    (vm / "rootfs.ext4.sha256").write_text("a" * 64)
    return vm


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the sweep itself logged, formatted."""
    return [r.getMessage() for r in caplog.records if r.name == "worker.core.fixup"]


def test_report_dict_names_each_kind_of_leftover() -> None:
    """The report's dict (logged, returned to callers) has one key per kind of leftover; `removed` counts them."""
    report = FixupReport(
        partial_clones=["vm-a"],
        partial_files=["vm-b/.vm-id.partial"],
        trash=[".trash/vm-c.1"],
        locks=[".locks/vm-d.lock", ".locks/vm-e.lock"],
        failed={"vm-f": "boom"},
    )
    assert report.to_dict() == {
        "partial_clones": ["vm-a"],
        "partial_files": ["vm-b/.vm-id.partial"],
        "trash": [".trash/vm-c.1"],
        "locks": [".locks/vm-d.lock", ".locks/vm-e.lock"],
        "failed": {"vm-f": "boom"},
    }
    assert report.removed == 5
    empty = FixupReport()
    assert empty.to_dict() == {"partial_clones": [], "partial_files": [], "trash": [], "locks": [], "failed": {}}
    assert empty.removed == 0


def test_sweep_logs_each_removal_with_its_path(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Every removal is logged with the path it removed, and the sweep ends with one summary line."""
    clones = env.clones_dir
    done = complete_clone(clones, "vm-done")
    (done / ".vm-id.partial").write_text("half")
    crashed = incomplete_clone(clones, "vm-crashed", "rootfs.ext4.partial")
    (clones / ".trash" / "vm-old.1").mkdir(parents=True)
    (clones / ".locks").mkdir()
    (clones / ".locks" / "vm-gone.lock").write_text("")
    with caplog.at_level(logging.INFO, logger="worker.core.fixup"):
        report = fixup.sweep(env.registry.config)
    assert report.removed == 4
    assert messages(caplog) == [
        f"start-up sweep: removed incomplete clone {crashed}",
        f"start-up sweep: removed {done / '.vm-id.partial'}",
        f"start-up sweep: emptied {clones / '.trash' / 'vm-old.1'}",
        f"start-up sweep: removed lock file {clones / '.locks' / 'vm-gone.lock'}",
        f"start-up sweep of {clones} removed 4 leftovers: {report.to_dict()}",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.core.fixup"):
        assert fixup.sweep(env.registry.config).removed == 0
    assert messages(caplog) == []  # nothing removed, nothing said


def test_sweep_released_empties_trash_and_orphaned_locks_but_spares_partial_clones(env: Env) -> None:
    """The sweep a release ends with empties the trash and removes the lock files of gone VMs; an abandoned
    partial clone waits for the start-up sweep."""
    clones = env.clones_dir
    crashed = incomplete_clone(clones, "vm-crashed", "rootfs.ext4.partial")
    (clones / ".trash" / "vm-old.1").mkdir(parents=True)
    (clones / ".trash" / "vm-old.1" / "rootfs.ext4").write_bytes(b"x")
    (clones / ".locks").mkdir()
    (clones / ".locks" / "vm-gone.lock").write_text("")
    report = fixup.sweep_released(clones)
    assert report.to_dict() == {
        "partial_clones": [],
        "partial_files": [],
        "trash": [".trash/vm-old.1"],
        "locks": [".locks/vm-gone.lock"],
        "failed": {},
    }
    assert (crashed / "rootfs.ext4.partial").exists()
    assert not (clones / ".trash" / "vm-old.1").exists()
    assert not (clones / ".locks" / "vm-gone.lock").exists()


def test_clones_dir_missing_is_nothing_to_do_and_unreadable_raises(tmp_path: Path) -> None:
    """A clones dir that is missing or not a directory is nothing to sweep; one that cannot be examined raises a
    FilesystemError naming the operation, the path and the errno."""
    templates = tmp_path / "templates"
    assert fixup.sweep(RootfsConfig(templates, tmp_path / "missing")).to_dict() == FixupReport().to_dict()
    (tmp_path / "file").write_text("")
    assert fixup.sweep(RootfsConfig(templates, tmp_path / "file")).to_dict() == FixupReport().to_dict()
    below_a_file = tmp_path / "file" / "clones"
    with pytest.raises(FilesystemError) as caught:
        fixup.sweep(RootfsConfig(templates, below_a_file))
    assert (caught.value.op, caught.value.path, caught.value.errno) == (
        "read clones dir",
        str(below_a_file),
        errno.ENOTDIR,
    )
    assert str(caught.value) == f"read clones dir {below_a_file}: Not a directory (ENOTDIR)"


def test_trash_that_is_not_a_directory_is_reported_and_the_clone_stays(env: Env) -> None:
    """When `.trash` is a file, an abandoned clone cannot be moved into it: both failures are reported with
    their operation and path, the clone stays, and it goes once the trash is usable again."""
    clones = env.clones_dir
    crashed = incomplete_clone(clones, "vm-crashed", "rootfs.ext4.partial")
    trash = clones / ".trash"
    trash.write_text("")
    report = fixup.sweep(env.registry.config)
    assert report.failed == {
        "vm-crashed": f"remove incomplete clone {crashed}: File exists (EEXIST)",
        ".trash": f"read trash {trash}: Not a directory (ENOTDIR)",
    }
    assert report.partial_clones == []
    assert (crashed / "rootfs.ext4.partial").exists()
    trash.unlink()
    report = fixup.sweep(env.registry.config)
    assert (report.partial_clones, report.failed) == (["vm-crashed"], {})
    assert not crashed.exists()


def test_locks_dir_that_is_not_a_directory_is_reported_and_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """When `.locks` is a file no VM can be locked: the VM that needed work is reported failed with the error's
    type and text and a warning names its directory; the lock sweep's failure is reported too; nothing goes."""
    clones = env.clones_dir
    crashed = incomplete_clone(clones, "vm-crashed", "rootfs.ext4.partial")
    lock_dir = clones / ".locks"
    lock_dir.write_text("")
    with caplog.at_level(logging.INFO, logger="worker.core.fixup"):
        report = fixup.sweep(env.registry.config)
    vm_error = f"lock {lock_dir / 'vm-crashed.lock'}: Not a directory (ENOTDIR)"
    assert report.failed == {
        "vm-crashed": f"FilesystemError: {vm_error}",
        ".locks": f"read locks {lock_dir}: Not a directory (ENOTDIR)",
    }
    assert messages(caplog) == [f"start-up sweep could not check {crashed}: {vm_error}"]
    assert report.removed == 0
    assert (crashed / "rootfs.ext4.partial").exists()


def test_a_disk_that_cannot_be_examined_is_reported_and_the_sweep_goes_on(env: Env) -> None:
    """A VM whose disk cannot be opened to see whether it is in use (a socket where the disk belongs) is
    reported with the path that failed and kept; the other VMs are still swept."""
    clones = env.clones_dir
    odd = clones / "vm-odd"
    odd.mkdir(parents=True)
    os.mknod(odd / "rootfs.ext4", stat.S_IFSOCK | 0o600)
    make_old(odd)
    crashed = incomplete_clone(clones, "vm-crashed", "rootfs.ext4.partial")
    report = fixup.sweep(env.registry.config)
    assert report.failed == {
        "vm-odd": f"FilesystemError: check clone in use {odd / 'rootfs.ext4'}: No such device or address (ENXIO)"
    }
    assert report.partial_clones == ["vm-crashed"]
    assert not crashed.exists()
    assert stat.S_ISSOCK(os.lstat(odd / "rootfs.ext4").st_mode)


def test_grace_runs_from_the_newest_change_to_the_given_now(env: Env) -> None:
    """An incomplete clone is spared until exactly `grace` seconds after its newest change, counted up to the
    `now` the caller passes (not the clock)."""
    vm = env.clones_dir / "vm-young"
    vm.mkdir(parents=True)
    (vm / "rootfs.ext4.partial").write_bytes(b"x")
    changed = int(time.time())  # whole seconds: exact float arithmetic at the boundary
    for path in (vm / "rootfs.ext4.partial", vm):
        os.utime(path, ns=(changed * 10**9, changed * 10**9))
    assert fixup.sweep(env.registry.config, grace=60, now=changed + 59.5).partial_clones == []
    assert (vm / "rootfs.ext4.partial").exists()
    assert fixup.sweep(env.registry.config, grace=60, now=changed + 60).partial_clones == ["vm-young"]
    assert not vm.exists()


def test_an_open_partial_disk_spares_its_clone_an_open_partial_stamp_does_not(env: Env) -> None:
    """Only a disk (or partial disk) held open means a VM may be using the clone; an open partial stamp does not
    keep an abandoned clone."""
    disk = incomplete_clone(env.clones_dir, "vm-disk", "rootfs.ext4.partial")
    stamp = incomplete_clone(env.clones_dir, "vm-stamp", "rootfs.ext4.sha256.partial")
    fds = [
        os.open(disk / "rootfs.ext4.partial", os.O_RDONLY),
        os.open(stamp / "rootfs.ext4.sha256.partial", os.O_RDONLY),
    ]
    try:
        report = fixup.sweep(env.registry.config)
    finally:
        for fd in fds:
            os.close(fd)
    assert report.partial_clones == ["vm-stamp"]
    assert (disk / "rootfs.ext4.partial").exists()
    assert not stamp.exists()


def test_a_clone_is_complete_only_with_a_regular_disk_and_a_non_empty_stamp(env: Env) -> None:
    """Old clones whose disk is a symlink or whose stamp is empty are swept (the link's own age counts, its
    fresh target is not touched); a regular disk with any non-empty stamp, even a dangling symlink, is kept."""
    clones = env.clones_dir
    outside = env.root / "outside"
    outside.mkdir()
    target = outside / "disk"
    target.write_bytes(b"T" * 4096)  # fresh: following the link would make the clone look busy
    linked = clones / "vm-linked"
    linked.mkdir(parents=True)
    (linked / "rootfs.ext4").symlink_to(target)
    (linked / "rootfs.ext4.sha256").write_text("a" * 64)
    empty = complete_clone(clones, "vm-empty")
    (empty / "rootfs.ext4.sha256").write_text("")
    short = complete_clone(clones, "vm-short")
    (short / "rootfs.ext4.sha256").write_text("a")
    link_stamp = complete_clone(clones, "vm-link-stamp")
    (link_stamp / "rootfs.ext4.sha256").unlink()
    (link_stamp / "rootfs.ext4.sha256").symlink_to(outside / "no-such-stamp")
    for vm in (linked, empty, short, link_stamp):
        make_old(vm)
    kept = {vm: snapshot(vm) for vm in (short, link_stamp)}
    report = fixup.sweep(env.registry.config)
    assert sorted(report.partial_clones) == ["vm-empty", "vm-linked"]
    assert not linked.exists() and not empty.exists()
    assert target.read_bytes() == b"T" * 4096
    assert {vm: snapshot(vm) for vm in kept} == kept


def test_stray_partials_of_any_kind_beside_a_complete_clone_are_removed(env: Env) -> None:
    """A stray `*.partial` beside a complete clone goes whether it is a file, a directory or a symlink (dangling
    or not, never followed); the clone and the link's target stay."""
    done = complete_clone(env.clones_dir, "vm-done")
    outside = env.root / "outside"
    outside.mkdir()
    target = outside / "kept"
    target.write_text("kept")
    (done / ".vm-id.partial").symlink_to(outside / "missing")
    (done / ".clone.json.partial").symlink_to(target)
    (done / "rootfs.ext4.partial").mkdir()
    (done / "rootfs.ext4.partial" / "chunk").write_bytes(b"x")
    (done / "rootfs.ext4.sha256.partial").write_text("half")
    report = fixup.sweep(env.registry.config)
    assert sorted(report.partial_files) == [
        "vm-done/.clone.json.partial",
        "vm-done/.vm-id.partial",
        "vm-done/rootfs.ext4.partial",
        "vm-done/rootfs.ext4.sha256.partial",
    ]
    assert report.failed == {}
    assert sorted(os.listdir(done)) == ["rootfs.ext4", "rootfs.ext4.sha256"]
    assert target.read_text() == "kept"


def test_a_file_vanishing_while_the_sweep_looks_does_not_hide_fresh_ones(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry that disappears between the directory read and its stat is skipped, and a fresh file listed
    after it still spares the clone."""
    vm = incomplete_clone(env.clones_dir, "vm-busy", "vanishing")
    (vm / "rootfs.ext4.partial").write_bytes(b"x")  # fresh: someone is writing here
    make_old(vm / "vanishing")
    os.utime(vm, (time.time() - 3600, time.time() - 3600))
    real_scandir = os.scandir

    def scandir_losing_one(path: int | str) -> Iterator[os.DirEntry[str]]:
        if not isinstance(path, int) or "vanishing" not in os.listdir(path):
            return real_scandir(path)
        with real_scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name != "vanishing")  # the vanishing one first
        os.unlink("vanishing", dir_fd=path)
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_losing_one)
    report = fixup.sweep(env.registry.config)
    monkeypatch.undo()
    assert report.partial_clones == []
    assert (vm / "rootfs.ext4.partial").exists()
    make_old(vm)
    assert fixup.sweep(env.registry.config).partial_clones == ["vm-busy"]


def test_the_lock_sweep_removes_only_unheld_locks_of_gone_vms(env: Env) -> None:
    """Lock files of gone VMs go; the warm-up lock, other files, the lock of a VM that exists and a lock someone
    holds stay; a lock file that cannot be opened is reported with its path, and the sweep goes on past each."""
    clones = env.clones_dir
    complete_clone(clones, "vm-a")
    lock_dir = clones / ".locks"
    lock_dir.mkdir()
    for name in (".warm.lock", "vm-a.lock", "vm-b", "vm-gone.lock", "vm-held.lock", "vm-zz.lock"):
        (lock_dir / name).write_text("")
    (lock_dir / "vm-dir.lock").mkdir()
    with locks.exclusive(lock_dir / "vm-held.lock"):
        report = fixup.sweep(env.registry.config)
    assert report.locks == [".locks/vm-gone.lock", ".locks/vm-zz.lock"]
    assert report.failed == {".locks/vm-dir.lock": f"lock {lock_dir / 'vm-dir.lock'}: Is a directory (EISDIR)"}
    assert sorted(os.listdir(lock_dir)) == [".warm.lock", "vm-a.lock", "vm-b", "vm-dir.lock", "vm-held.lock"]


def test_a_vm_that_appears_while_its_lock_is_checked_keeps_its_lock_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clone that starts right after the lock sweep found its VM gone keeps its lock file, and the report does
    not claim it was removed; another gone VM's lock file still goes."""
    clones = env.clones_dir
    lock_dir = clones / ".locks"
    lock_dir.mkdir(parents=True)
    (lock_dir / "vm-late.lock").write_text("")
    (lock_dir / "vm-gone.lock").write_text("")
    late = clones / "vm-late"
    real_lexists = os.path.lexists

    def clone_starts_after_the_look(path: str | os.PathLike[str]) -> bool:
        if os.fspath(path) == str(late) and not real_lexists(late):
            late.mkdir()
            return False  # the sweep saw it gone, the clone came right after
        return real_lexists(path)

    monkeypatch.setattr(os.path, "lexists", clone_starts_after_the_look)
    report = fixup.sweep_released(clones)
    monkeypatch.undo()
    assert report.locks == [".locks/vm-gone.lock"]
    assert sorted(os.listdir(lock_dir)) == ["vm-late.lock"]


def test_a_trash_entry_that_cannot_be_deleted_is_reported_and_the_rest_emptied(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trash entry whose files cannot be deleted (an I/O error) is reported as such and stays; the entries
    after it are still emptied."""
    trash = env.clones_dir / ".trash"
    (trash / "vm-a.1").mkdir(parents=True)
    (trash / "vm-a.1" / "stuck").write_bytes(b"x")
    (trash / "vm-b.2").mkdir()
    (trash / "vm-b.2" / "rootfs.ext4").write_bytes(b"x")
    real_unlink = os.unlink

    def failing_unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        if os.path.basename(path) == "stuck":
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    report = fixup.sweep_released(env.clones_dir)
    monkeypatch.undo()
    assert report.failed == {".trash/vm-a.1": "could not delete"}
    assert report.trash == [".trash/vm-b.2"]
    assert sorted(os.listdir(trash)) == ["vm-a.1"]
    assert fixup.sweep_released(env.clones_dir).trash == [".trash/vm-a.1"]


def test_a_vm_dir_replaced_by_a_file_after_the_listing_gets_no_lock_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name listed as a VM directory that is a file by the time the sweep looks is left alone, no lock file
    made for it; the real VM directories are still swept."""
    clones = env.clones_dir
    crashed = incomplete_clone(clones, "vm-crashed", "rootfs.ext4.partial")
    (clones / "vm-file").write_text("")
    monkeypatch.setattr(fixup, "vm_dir_names", lambda _: ["vm-crashed", "vm-file"])
    report = fixup.sweep(env.registry.config)
    monkeypatch.undo()
    assert (report.partial_clones, report.failed) == (["vm-crashed"], {})
    assert not crashed.exists()
    assert (clones / "vm-file").read_text() == ""
    assert os.listdir(clones / ".locks") == []

"""What a worker sweeps when it starts: what crashed operations left in the clones dir.

- partial clones: VM directories without a complete clone (no disk, or a disk without a stamp) that nobody
  is working on, and stray `*.partial` files of interrupted writes beside a complete clone;
- the trash: directories that releases renamed away and did not finish deleting;
- lock files of VMs whose directory no longer exists.

A complete clone (disk and stamp) is never touched, ours or the seed's. Everything for one VM is done under
its lock, taken without waiting: a VM whose lock is held is being worked on and is skipped. A directory the
Rust runtime may be filling right now (it copies into `rootfs.ext4` first and stamps it afterwards, taking
no lock of ours) is spared while anything in it changed within the last `grace` seconds, or while its
disk is held open.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.core import fsops, inuse, locks
from worker.core.config import RootfsConfig
from worker.core.inventory import is_vm_dir_name, vm_dir_names
from worker.core.layout import CLONE_ROOTFS_FILE, CLONE_STAMP_FILE, LOCKS_DIR, TRASH_DIR, partials
from worker.errors import FilesystemError, RootfsError

log = logging.getLogger(__name__)

#: Seconds an incomplete directory must have been left unchanged before it counts as abandoned.
DEFAULT_GRACE_S = 60.0


@dataclass
class FixupReport:
    """What the sweep removed (names relative to the clones dir) and what it could not."""

    partial_clones: list[str] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    trash: list[str] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "partial_clones": list(self.partial_clones),
            "partial_files": list(self.partial_files),
            "trash": list(self.trash),
            "locks": list(self.locks),
            "failed": dict(self.failed),
        }

    @property
    def removed(self) -> int:
        return len(self.partial_clones) + len(self.partial_files) + len(self.trash) + len(self.locks)


def sweep(config: RootfsConfig, *, grace: float = DEFAULT_GRACE_S, now: float | None = None) -> FixupReport:
    """Remove what crashed operations left; log each removal. Never raises for one entry: a failure is
    recorded and the sweep goes on."""
    report = FixupReport()
    clones = config.clones_dir
    try:
        if not stat.S_ISDIR(os.stat(clones).st_mode):
            return report
    except FileNotFoundError:
        return report
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read clones dir", path=clones) from exc
    current = time.time() if now is None else now
    for name in vm_dir_names(clones):
        try:
            _sweep_vm(clones, name, grace, current, report)
        except (RootfsError, OSError) as exc:
            report.failed[name] = f"{type(exc).__name__}: {exc}"
            log.warning("start-up sweep could not check %s: %s", clones / name, exc)
    _sweep_trash(clones / TRASH_DIR, report)
    _sweep_locks(clones, report)
    if report.removed:
        log.info("start-up sweep of %s removed %d leftovers: %s", clones, report.removed, report.to_dict())
    return report


def sweep_released(clones: Path) -> FixupReport:
    """The part of the sweep that needs no grace period: the trash and the lock files of VMs that are gone,
    which only releases leave (a release that crashed after its commit point). Reconcile ends with it."""
    report = FixupReport()
    _sweep_trash(clones / TRASH_DIR, report)
    _sweep_locks(clones, report)
    return report


def _sweep_vm(clones: Path, name: str, grace: float, now: float, report: FixupReport) -> None:
    vm_dir = clones / name
    if not _needs_work(vm_dir):
        return  # the common case, a complete clone and nothing else: no lock taken, no lock file made
    lock = clones / LOCKS_DIR / f"{name}.lock"
    with locks.exclusive(lock, remove_if=lambda: not os.path.lexists(vm_dir), blocking=False) as held:
        if not held:
            return  # a clone or release of this VM is running
        try:
            dir_fd = os.open(vm_dir, fsops.OPEN_DIR)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            if _complete(dir_fd):
                _remove_partial_files(dir_fd, vm_dir, report)
                return
            if not _abandoned(dir_fd, vm_dir, grace, now):
                return
        finally:
            fsops.close(dir_fd)
        # Into the trash first, as a release does: one rename takes it away for good, and whatever a crash
        # or an I/O error leaves of the deletion is emptied by the trash sweep, which needs no grace period
        # (deleting in place would move the directory's mtime and restart its grace period).
        trash = clones / TRASH_DIR
        doomed = trash / f"{name}.{uuid.uuid4().hex}"
        try:
            trash.mkdir(exist_ok=True)
            os.rename(vm_dir, doomed)
        except OSError as exc:
            report.failed[name] = str(FilesystemError.from_os(exc, op="remove incomplete clone", path=vm_dir))
            return
        fsops.fsync_dir(clones)
        report.partial_clones.append(name)
        log.info("start-up sweep: removed incomplete clone %s", vm_dir)
    fsops.delete_quietly(doomed)


def _remove_partial_files(dir_fd: int, vm_dir: Path, report: FixupReport) -> None:
    for leftover in partials():
        if _exists(dir_fd, leftover):
            fsops.unlink(dir_fd, leftover, vm_dir)
            report.partial_files.append(f"{vm_dir.name}/{leftover}")
            log.info("start-up sweep: removed %s", vm_dir / leftover)


def _abandoned(dir_fd: int, vm_dir: Path, grace: float, now: float) -> bool:
    """Unchanged for `grace` seconds (the seed takes none of our locks: it may be filling it right now) and
    its disk held open by nobody."""
    if now - _newest_mtime(dir_fd) < grace:
        return False
    return not any(
        inuse.usage(dir_fd, disk, vm_dir, pids=False).in_use for disk in (CLONE_ROOTFS_FILE, *partials()[:1])
    )


def _needs_work(vm_dir: Path) -> bool:
    """Something to remove here, judged without the lock (and judged again under it)."""
    try:
        dir_fd = os.open(vm_dir, fsops.OPEN_DIR)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        return not _complete(dir_fd) or any(_exists(dir_fd, leftover) for leftover in partials())
    finally:
        fsops.close(dir_fd)


def _complete(dir_fd: int) -> bool:
    try:
        st = os.stat(CLONE_ROOTFS_FILE, dir_fd=dir_fd, follow_symlinks=False)
        stamp = os.stat(CLONE_STAMP_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and stamp.st_size > 0


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _newest_mtime(dir_fd: int) -> float:
    newest = os.fstat(dir_fd).st_mtime
    for entry in os.scandir(dir_fd):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            continue
    return newest


def _gone(vm_dir: Path) -> Callable[[], bool]:
    return lambda: not os.path.lexists(vm_dir)


def _sweep_trash(trash: Path, report: FixupReport) -> None:
    try:
        entries = sorted(os.listdir(trash))
    except FileNotFoundError:
        return
    except OSError as exc:
        report.failed[TRASH_DIR] = str(FilesystemError.from_os(exc, op="read trash", path=trash))
        return
    for name in entries:
        fsops.delete_quietly(trash / name)
        if os.path.lexists(trash / name):
            report.failed[f"{TRASH_DIR}/{name}"] = "could not delete"
            continue
        report.trash.append(f"{TRASH_DIR}/{name}")
        log.info("start-up sweep: emptied %s", trash / name)


def _sweep_locks(clones: Path, report: FixupReport) -> None:
    """Lock files of VMs that are gone, each removed while held (locks.exclusive's remove_if), so a process
    that opened it meanwhile notices and takes a new one: never two holders."""
    lock_dir = clones / LOCKS_DIR
    try:
        names = sorted(os.listdir(lock_dir))
    except FileNotFoundError:
        return
    except OSError as exc:
        report.failed[LOCKS_DIR] = str(FilesystemError.from_os(exc, op="read locks", path=lock_dir))
        return
    for lock_name in names:
        safe_id = lock_name.removesuffix(".lock")
        if safe_id == lock_name or not is_vm_dir_name(safe_id):
            continue  # not a VM's lock (the warm-up lock starts with a dot)
        vm_dir = clones / safe_id
        if os.path.lexists(vm_dir):
            continue
        path = lock_dir / lock_name
        try:
            with locks.exclusive(path, remove_if=_gone(vm_dir), blocking=False) as held:
                pass
        except RootfsError as exc:
            report.failed[f"{LOCKS_DIR}/{lock_name}"] = str(exc)
            continue
        if held and not os.path.lexists(path):
            report.locks.append(f"{LOCKS_DIR}/{lock_name}")
            log.info("start-up sweep: removed lock file %s", path)

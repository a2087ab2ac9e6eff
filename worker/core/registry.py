"""The registry facade: list and hash template stacks, clone one per VM, release clones.

The clone and release protocols are kept together here so the crash-safety argument reads in one place
(see worker.core.layout for the invariant, docs/crash-safety.md for the argument): a clone is built as
`.rootfs.ext4.partial`, flushed, stamped, and only then renamed into place; a release renames the VM's
directory into `.trash` before deleting it. Everything for one VM happens under its flock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from worker.core import cloning, durability, fixup, fsops, hashing, inuse, inventory, locks, records, space
from worker.core.config import RootfsConfig
from worker.core.fixup import FixupReport
from worker.core.hashcache import HashCache
from worker.core.layout import (
    CACHE_DIR,
    CLONE_ROOTFS_FILE,
    CLONE_STAMP_FILE,
    LOCKS_DIR,
    OWNER_FILE,
    PARTIAL_SUFFIX,
    STAMPS_DIR,
    TRASH_DIR,
    WARM_LOCK,
    partials,
    record_names,
)
from worker.core.models import CloneOrigin, HashWork, StackInfo, VmRootfs, WarmReport
from worker.core.names import check_stack_name, check_vm_id
from worker.core.reconcile import DEFAULT_OLDER_THAN, ReconcileReport, reconcile
from worker.core.stamps import StampSources
from worker.core.templates import Template, open_template, stack_names
from worker.errors import (
    CloneInUse,
    FilesystemError,
    RootfsError,
    StackNotFound,
    StampMismatch,
    VmBusy,
    VmIdConflict,
)

log = logging.getLogger(__name__)


#: (stack, bytes done, bytes total) while a template is being hashed.
HashProgress = Callable[[str, int, int], None]


class RootfsRegistry:
    """The filesystem core. Imports no Celery: tasks, CLI and tests all drive this class."""

    def __init__(self, config: RootfsConfig) -> None:
        self._config = config
        self._cache = HashCache(config.clones_dir / CACHE_DIR / "hashes")
        self._stamps = StampSources(config.clones_dir / CACHE_DIR / STAMPS_DIR)
        self._hash_work = HashWork()
        self._hash_work_lock = threading.Lock()

    @classmethod
    def from_env(cls) -> RootfsRegistry:
        return cls(RootfsConfig.from_env())

    @property
    def config(self) -> RootfsConfig:
        return self._config

    @property
    def hash_work(self) -> HashWork:
        """Every hash lookup of this registry so far: hits, misses, bytes and seconds hashed (for metrics)."""
        with self._hash_work_lock:
            return self._hash_work

    # ----------------------------------------------------------------- stacks

    def stacks(self, *, progress: HashProgress | None = None) -> list[StackInfo]:
        """Every stack with a template, sorted by name; a missing template dir is an empty list."""
        return [info for info, _ in self._scan(progress)]

    def stack(self, name: str, *, progress: HashProgress | None = None) -> StackInfo | None:
        """One stack by name, None when absent. An invalid name raises before any filesystem access."""
        check_stack_name(name)
        with open_template(self._config.template_dir, name) as template:
            if template is None:
                return None
            return self._info(template, progress)[0]

    def warm(self, *, progress: HashProgress | None = None) -> WarmReport:
        """Hash every template not in the shared cache yet, so no clone has to.

        One warm-up per host at a time: a second one returns at once (`busy`) instead of tying up a
        second worker process on the same hashes.
        """
        started = time.monotonic()
        with locks.try_exclusive(self._config.clones_dir / LOCKS_DIR / WARM_LOCK) as mine:
            if not mine:
                return WarmReport(busy=True)
            self._cache.sweep_temp_files()  # what a killed warm-up left
            hashed: list[str] = []
            warm: list[str] = []
            failed: dict[str, str] = {}
            digests: set[str] = set()
            total = 0
            for name in stack_names(self._config.template_dir):
                try:
                    with open_template(self._config.template_dir, name) as template:
                        if template is None:
                            continue
                        info, computed = self._info(template, progress)
                except RootfsError as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    continue
                digests.add(info.sha256)
                if computed:
                    hashed.append(name)
                    total += info.size_bytes
                else:
                    warm.append(name)
            self._warm_stamps(digests, complete=not failed)
        return WarmReport(tuple(hashed), tuple(warm), total, time.monotonic() - started, failed)

    def _warm_stamps(self, digests: set[str], *, complete: bool) -> None:
        """Where clones take their stamps by reflink (XFS), make every template's stamp source now, so no
        clone waits for one to reach the disk; and, after a warm-up that saw every template (`complete`),
        drop the sources of hashes no template has any more."""
        if not space.probe_reflink(self._config.clones_dir):
            return
        try:
            clones_fd = os.open(self._config.clones_dir, fsops.OPEN_DIR)
        except OSError:
            return
        try:
            if not durability.orders_metadata(clones_fd):
                return
        finally:
            fsops.close(clones_fd)
        for digest in digests:
            fd = self._stamps.open(digest)
            if fd is not None:
                fsops.close(fd)
        if complete:
            self._stamps.prune(digests)

    def cached_stacks(self) -> dict[str, str | None]:
        """Every stack with its hash where the cache has it, None where cold: never hashes (heartbeats and
        the inventory call this; a stack that cannot be opened is left out)."""
        found: dict[str, str | None] = {}
        for name in stack_names(self._config.template_dir):
            with contextlib.suppress(RootfsError), open_template(self._config.template_dir, name) as template:
                if template is not None:
                    found[name] = self._cache.get(template.key)
        return found

    # -------------------------------------------------------------- inventory

    def clones(self, *, pids: bool = True) -> list[inventory.CloneInfo]:
        """Every VM directory on this host (worker.core.inventory); takes no lock, hashes nothing."""
        return inventory.list_clones(self._config.clones_dir, self.cached_stacks(), pids=pids)

    def host_summary(self) -> dict[str, Any]:
        """Free/total bytes, reflink, clone count and warm stack hashes, for heartbeats."""
        return inventory.host_summary(self._config.clones_dir, self.cached_stacks())

    def reconcile(
        self,
        keep: Sequence[str],
        *,
        older_than: float = DEFAULT_OLDER_THAN,
        dry_run: bool = True,
        now: float | None = None,
    ) -> ReconcileReport:
        """Release every clone not in `keep`, old enough and not in use (worker.core.reconcile); then finish
        what earlier releases left (trash, lock files of gone VMs), so a reconcile that died converges."""
        report = reconcile(self, keep, older_than=older_than, dry_run=dry_run, now=now)
        if not dry_run:
            fixup.sweep_released(self._config.clones_dir)
        return report

    def fixup(self) -> FixupReport:
        """Sweep what crashed operations left (worker.core.fixup); run when a worker starts."""
        return fixup.sweep(self._config)

    @staticmethod
    def hash_file(path: str | os.PathLike[str]) -> str:
        """SHA-256 of a file, read the way templates are (under a read lease where granted)."""
        return hashing.hash_file(path, leased=True)

    def _scan(self, progress: HashProgress | None) -> Iterator[tuple[StackInfo, bool]]:
        for name in stack_names(self._config.template_dir):
            with open_template(self._config.template_dir, name) as template:
                if template is not None:
                    yield self._info(template, progress)

    def _info(self, template: Template, progress: HashProgress | None) -> tuple[StackInfo, bool]:
        """The template's info (with what finding its hash cost) and whether its hash was computed now."""
        spent = 0.0

        def compute() -> str:
            nonlocal spent
            started = time.monotonic()
            report = None if progress is None else (lambda done, total: progress(template.name, done, total))
            guard = template.guard if template.leased else None
            digest = hashing.hash_fd(template.fd, path=str(template.path), progress=report, guard=guard)
            template.check_unchanged()
            spent = time.monotonic() - started
            return digest

        digest, computed = self._cache.get_or_compute(template.key, compute)
        size = template.key.size
        with self._hash_work_lock:
            self._hash_work += HashWork(misses=1, bytes=size, seconds=spent) if computed else HashWork(hits=1)
        return StackInfo(template.name, template.path, size, digest), computed

    # ------------------------------------------------------------------ clones

    def clone_for_vm(self, vm_id: str, stack: str, *, progress: HashProgress | None = None) -> VmRootfs:
        """The VM's own copy of `stack`, made once: the same call again returns the same clone."""
        safe_id = check_vm_id(vm_id)
        check_stack_name(stack)
        vm_dir = self._config.clones_dir / safe_id
        with self._vm_lock(safe_id), open_template(self._config.template_dir, stack) as template:
            if template is None:
                raise StackNotFound(stack, str(self._config.template_dir))
            with self._open_vm_dir(vm_dir, required=False) as dir_fd:
                if dir_fd is not None:
                    self._check_owner(dir_fd, vm_dir, vm_id, safe_id)
                    if _clear_leftovers(dir_fd, vm_dir):
                        # Unlinking a hard link to the template moved its ctime: take its key anew.
                        template.refresh_key()
                complete = dir_fd is not None and _has_disk(dir_fd)
            if not complete:
                # Before the hash and before any write: a copy that cannot fit is refused at once.
                space.ensure_room(template.stat(), self._config.clones_dir, self._config.min_free)
            return self._clone_from(template, vm_dir, vm_id, safe_id, progress)

    def _clone_from(
        self, template: Template, vm_dir: Path, vm_id: str, safe_id: str, progress: HashProgress | None
    ) -> VmRootfs:
        info, _ = self._info(template, progress)
        method: CloneOrigin = "existing"
        fresh = _make_vm_dir(vm_dir)
        with self._open_vm_dir(vm_dir, required=True) as dir_fd:
            assert dir_fd is not None
            # A directory this call just made (under the VM's lock) holds nothing yet: nothing to read.
            existing = not fresh and self._existing_clone(dir_fd, vm_dir, safe_id, info)
            try:
                self._claim(dir_fd, vm_dir, vm_id, info.name, existing, fresh=fresh)
                if existing:
                    self._flush_existing(dir_fd, vm_dir)
                else:
                    method = self._build_clone(dir_fd, vm_dir, template, info.sha256)
            except BaseException:
                _discard_if_unused(dir_fd, vm_dir)  # leaves a directory that holds a clone as it is
                raise
        return VmRootfs(safe_id, info.name, vm_dir / CLONE_ROOTFS_FILE, info.sha256, method)

    def release(
        self,
        vm_id: str,
        *,
        force: bool = False,
        wait: bool = True,
        recheck: Callable[[int, Path], None] | None = None,
    ) -> bool:
        """Remove the VM's clone; True if there was one. Releasing twice is not an error.

        A disk another process holds open (a running VM) is refused with CloneInUse unless `force`. With
        `wait=False` a VM whose lock is held raises VmBusy instead of waiting; `recheck(dir_fd, vm_dir)` runs
        under the lock and may raise to spare the clone (reconcile re-checks its age there).

        The clone is gone for good once its directory is renamed into `.trash` and that rename is on disk;
        deleting the files comes after, outside the lock, and whatever a crash or an I/O error leaves of
        it there is deleted by the next release (of any VM), which never fails over it.
        """
        safe_id = check_vm_id(vm_id)
        clones = self._config.clones_dir
        vm_dir = clones / safe_id
        try:
            with self._vm_lock(safe_id, wait=wait, vm_id=vm_id):
                with self._open_vm_dir(vm_dir, required=False) as dir_fd:
                    found = dir_fd is not None
                    if dir_fd is not None:
                        self._check_owner(dir_fd, vm_dir, vm_id, safe_id)
                        if recheck is not None:
                            recheck(dir_fd, vm_dir)
                        if not force:
                            usage = inuse.usage(dir_fd, CLONE_ROOTFS_FILE, vm_dir)
                            if usage.in_use:
                                raise CloneInUse(vm_id, list(usage.pids))
                if found:
                    self._to_trash(vm_dir, safe_id)
        finally:
            self.empty_trash()  # also when nothing was found: a crashed release may have left it there
        return found

    def empty_trash(self) -> None:
        """Delete what releases left in `.trash` (theirs, or a crashed one's). Never raises: the clone was
        already released when its directory reached the trash; what fails here is retried next time."""
        trash = self._config.clones_dir / TRASH_DIR
        try:
            entries = [Path(entry.path) for entry in os.scandir(trash)]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not list %s to empty it: %s", trash, exc)
            return
        for path in entries:  # concurrent releases may race for the same entries: both ignore vanished ones
            fsops.delete_quietly(path)

    def _to_trash(self, vm_dir: Path, safe_id: str) -> None:
        """Rename the VM's directory into `.trash`, on disk before returning: the release's commit point."""
        clones = self._config.clones_dir
        trash = clones / TRASH_DIR
        doomed = trash / f"{safe_id}.{uuid.uuid4().hex}"
        try:
            trash.mkdir(exist_ok=True)
            os.rename(vm_dir, doomed)
        except OSError as exc:
            raise FilesystemError.from_os(exc, op="remove clone dir", path=vm_dir) from exc
        # Both directories as one group (one rename changed both: one commit): the entry gone from the clones
        # dir (what the Rust runtime looks at) and the one in the trash (so a crash cannot lose the files).
        clones_fd = fsops.open_dir(clones, op="flush clones dir")
        try:
            trash_fd = fsops.open_dir(trash, op="flush clones dir")
            try:
                durability.fsync_together([(clones_fd, clones), (trash_fd, trash)], op="flush clones dir")
            finally:
                fsops.close(trash_fd)
        finally:
            fsops.close(clones_fd)

    # ---------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _vm_lock(self, safe_id: str, *, wait: bool = True, vm_id: str | None = None) -> Iterator[None]:
        """Serialises clone and release of one VM across processes; the lock file goes with the VM."""
        vm_dir = self._config.clones_dir / safe_id
        path = self._config.clones_dir / LOCKS_DIR / f"{safe_id}.lock"
        with locks.exclusive(path, remove_if=lambda: not os.path.lexists(vm_dir), blocking=wait) as held:
            if not held:
                raise VmBusy(vm_id if vm_id is not None else safe_id)
            yield

    @contextlib.contextmanager
    def _open_vm_dir(self, vm_dir: Path, *, required: bool) -> Iterator[int | None]:
        """The VM's directory as an fd (never through a symlink), so every later step stays inside it; None
        when there is none, unless `required` (the caller made it: _make_vm_dir)."""
        try:
            fd = os.open(vm_dir, fsops.OPEN_DIR)
        except FileNotFoundError as exc:
            if required:  # removed between our mkdir and open: only a concurrent release-all could
                raise FilesystemError.from_os(exc, op="open clone dir", path=vm_dir) from exc
            yield None
            return
        except OSError as exc:
            # ELOOP/ENOTDIR: something other than a directory sits where the VM's directory belongs.
            raise FilesystemError.from_os(exc, op="open clone dir", path=vm_dir) from exc
        try:
            yield fd
        finally:
            fsops.close(fd)

    def _check_owner(self, dir_fd: int, vm_dir: Path, vm_id: str, safe_id: str) -> None:
        owner = _read_owner(dir_fd, vm_dir)
        if owner and owner != vm_id:
            raise VmIdConflict(vm_id, safe_id, owner)

    def _claim(self, dir_fd: int, vm_dir: Path, vm_id: str, stack: str, existing: bool, *, fresh: bool) -> None:
        """Record who owns the directory (also when adopting a clone the seed made), and for the inventory
        which stack it holds and since when (worker.core.records).

        Not flushed on its own (one fsync less on the clone path): after a power cut the record may come
        back empty, which reads as no record, as for a directory the seed made.
        """
        owner = vm_id.encode("utf-8", "surrogatepass")
        if fresh:  # one write into a new file: empty (no owner yet) or whole, never a prefix of the id
            fsops.write_new(dir_fd, OWNER_FILE, owner, vm_dir)
        elif _read_owner(dir_fd, vm_dir) != vm_id:
            fsops.write_atomic(dir_fd, OWNER_FILE, owner, vm_dir, durable=False)
        records.write_record(dir_fd, vm_dir, vm_id=vm_id, stack=stack, adopted=existing, fresh=fresh)

    def _existing_clone(self, dir_fd: int, vm_dir: Path, safe_id: str, info: StackInfo) -> bool:
        """True when a complete clone of these bytes is in place (ours or the seed's), False when none."""
        try:
            os.stat(CLONE_ROOTFS_FILE, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise FilesystemError.from_os(exc, op="stat clone", path=vm_dir / CLONE_ROOTFS_FILE) from exc
        stamp = fsops.read_text(dir_fd, CLONE_STAMP_FILE, vm_dir)
        if stamp != info.sha256:
            raise StampMismatch(safe_id, info.name, stamp or "", info.sha256)
        return True

    def _flush_existing(self, dir_fd: int, vm_dir: Path) -> None:
        """Before reporting a clone found in place, make sure it is on disk: the call that built it may have
        died between its rename and its directory flushes (or it is the seed's, flushed by its `sync`).
        Nothing is created here, so nothing needs ordering: all four flushes form one group."""
        clones = vm_dir.parent
        opened: list[tuple[int, Path]] = []
        try:
            for name in (CLONE_ROOTFS_FILE, CLONE_STAMP_FILE):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
                except OSError as exc:
                    raise FilesystemError.from_os(exc, op="flush clone", path=vm_dir / name) from exc
                opened.append((fd, vm_dir / name))
            opened.append((fsops.open_dir(clones, op="flush clones dir"), clones))
            durability.fsync_together([(dir_fd, vm_dir), *opened], op="flush clone")
        finally:
            for fd, _ in opened:
                fsops.close(fd)

    def _build_clone(self, dir_fd: int, vm_dir: Path, template: Template, digest: str) -> CloneOrigin:
        """Copy and stamp, make both durable before the clone is named, name it, flush both directories:
        one wait for the disk on XFS, two elsewhere. The step-by-step argument is in docs/crash-safety.md."""
        partial = CLONE_ROOTFS_FILE + PARTIAL_SUFFIX
        dst_path = vm_dir / partial
        clones = vm_dir.parent
        try:
            dst = os.open(
                partial,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                stat.S_IMODE(template.mode) | 0o600,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            raise FilesystemError.from_os(exc, op="create clone", path=dst_path) from exc
        stamp: int | None = None
        try:
            try:
                method = cloning.clone_fd(template.fd, dst, src_path=str(template.path), dst_path=str(dst_path))
                template.check_unchanged()
                # The stamp goes under its own name at once: no reader trusts a stamp without a clone beside
                # it (the Rust runtime reads it only then, the next clone removes it as a leftover).
                if method == "reflink" and durability.orders_metadata(dst):
                    # XFS: the stamp a reflink too, so the clone is metadata alone, which XFS logs in order:
                    # the flush after the rename covers both (worker.core.stamps). No round trip here.
                    stamp = self._reflink_stamp(dir_fd, vm_dir, digest)
                if stamp is None:
                    stamp = fsops.write_file(dir_fd, CLONE_STAMP_FILE, digest.encode("ascii"), vm_dir)
                    # 1st round trip. On disk before the clone is named: a power cut must never leave a
                    # complete-looking clone of zeros, or a stamp of nothing. The stamp, changed last,
                    # first: its journal commit carries the clone's metadata with it (worker.core.durability).
                    durability.fsync_together([(stamp, vm_dir / CLONE_STAMP_FILE), (dst, dst_path)], op="flush clone")
            finally:
                fsops.close(dst)
                if stamp is not None:
                    fsops.close(stamp)
            fsops.rename(dir_fd, partial, CLONE_ROOTFS_FILE, vm_dir, op="rename clone")
            # Last round trip: the rename (and the records) in the VM's directory, then the VM's directory
            # in the clones dir (its mkdir is older: the same commit took it along). Only then is it reported.
            clones_fd = fsops.open_dir(clones, op="flush clones dir")
            try:
                durability.fsync_together([(dir_fd, vm_dir), (clones_fd, clones)], op="flush clone dir")
            finally:
                fsops.close(clones_fd)
        except BaseException:
            _roll_back(dir_fd, vm_dir)
            raise
        log.info("cloned %s to %s by %s", template.path, vm_dir / CLONE_ROOTFS_FILE, method)
        return "reflink" if method == "reflink" else "copy"

    def _reflink_stamp(self, dir_fd: int, vm_dir: Path, digest: str) -> int | None:
        """The stamp as a reflink of the stamp source of `digest`, open; None when there is no source or the
        pair cannot be reflinked (the caller writes the stamp instead)."""
        source = self._stamps.open(digest)
        if source is None:
            return None
        path = vm_dir / CLONE_STAMP_FILE
        try:
            try:
                fd = os.open(
                    CLONE_STAMP_FILE,
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=dir_fd,
                )
            except OSError as exc:
                raise FilesystemError.from_os(exc, op="write", path=path) from exc
            try:
                if cloning.reflink(source, fd, dst_path=str(path)):
                    return fd
            except BaseException:
                fsops.close(fd)
                raise
            fsops.close(fd)
            return None
        finally:
            fsops.close(source)


def _make_vm_dir(vm_dir: Path) -> bool:
    """Make the VM's directory unless it exists; True when this call made it (empty, ours alone: the caller
    holds the VM's lock). Made durable by the clones-dir fsync that ends a build. The clones dir exists: taking
    the VM's lock made `<clones>/.locks` (a clones dir removed since is an error here, and made again by the
    next call's lock)."""
    try:
        os.mkdir(vm_dir, 0o755)
    except FileExistsError:
        return False
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="create clone dir", path=vm_dir) from exc
    return True


def _roll_back(dir_fd: int, vm_dir: Path) -> None:
    """Undo a failed build, the clone first: if it cannot be removed, its stamp stays with it, so what is
    left is still a complete, stamped clone (which the next call flushes before reporting it)."""
    try:
        fsops.unlink(dir_fd, CLONE_ROOTFS_FILE, vm_dir)
    except RootfsError:
        return
    for leftover in (CLONE_STAMP_FILE, *partials()):
        with contextlib.suppress(RootfsError):
            fsops.unlink(dir_fd, leftover, vm_dir)


def _read_owner(dir_fd: int, vm_dir: Path) -> str | None:
    """The recorded vm id exactly as the caller sent it: "vm-1 " and "vm-1\t" share a directory (vm-1_)
    and must not share a disk, and an id with a trailing space must still own (and release) its clone."""
    return fsops.read_text(dir_fd, OWNER_FILE, vm_dir, strip=False)


def _clear_leftovers(dir_fd: int, vm_dir: Path) -> bool:
    """Remove what an interrupted clone left: ours (partials, a stamp with no clone) or the seed's (a clone
    with no stamp), and a clone that is a hard link (the seed's fallback): the VM would write into the
    template. What remains is either a complete clone or nothing. True when a clone file was removed (it
    may have been a hard link to the template, whose ctime then moved)."""
    try:
        st = os.stat(CLONE_ROOTFS_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="stat clone", path=vm_dir / CLONE_ROOTFS_FILE) from exc
    complete = (
        st is not None
        and stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
        and fsops.read_text(dir_fd, CLONE_STAMP_FILE, vm_dir) is not None
    )
    doomed = list(partials())
    if not complete:
        if st is not None:
            log.warning("removing incomplete or shared clone in %s", vm_dir)
        doomed += [CLONE_ROOTFS_FILE, CLONE_STAMP_FILE]
    for name in doomed:
        fsops.unlink(dir_fd, name, vm_dir)
    return not complete and st is not None


def _discard_if_unused(dir_fd: int, vm_dir: Path) -> None:
    """After a failed build, leave nothing behind: the directory goes unless it holds a clone."""
    with contextlib.suppress(OSError, RootfsError):
        if os.path.lexists(vm_dir / CLONE_ROOTFS_FILE):
            return
        for leftover in (CLONE_STAMP_FILE, *record_names(), *partials()):
            fsops.unlink(dir_fd, leftover, vm_dir)
        os.rmdir(vm_dir)


def _has_disk(dir_fd: int) -> bool:
    try:
        os.stat(CLONE_ROOTFS_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # let the clone path report it, as it did before the space check
    return True

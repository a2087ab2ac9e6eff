"""What is on this host: one entry per VM directory, and the host's totals for placement and metrics.

Listing must never stall a clone and must stay cheap with thousands of clones: it takes no VM lock (a clone
being built shows up as `incomplete`, a clone being released may vanish between two reads and is then
skipped), hashes nothing (a stack's hash comes from the shared cache or is unknown) and reads only small
files (stamp and record) plus one open of each disk for its stat and its in-use lease. The /proc scan that
names holders runs once for the whole listing, and only when some disk is held.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from worker.core import inuse, space
from worker.core.fsops import OPEN_DIR, close
from worker.core.layout import (
    CLONE_RECORD_FILE,
    CLONE_ROOTFS_FILE,
    CLONE_STAMP_FILE,
    OWNER_FILE,
    PARTIAL_SUFFIX,
)
from worker.core.records import parse_record
from worker.errors import FilesystemError

#: Exactly what `safe_vm_id` can produce (ASCII letters, digits, '-', '_'): no dot, so never ours.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")

#: complete: disk and stamp, with our record; foreign: disk and stamp, no record of ours (the Rust runtime
#: made it); incomplete: no disk or no stamp (an interrupted clone, or one being built right now).
CloneState = Literal["complete", "incomplete", "foreign"]


@dataclass(slots=True)
class CloneInfo:
    vm_id: str
    dir: str
    stack: str | None
    source_sha256: str | None
    #: The stack's template now has another hash or is gone; None when that cannot be told without hashing.
    stale: bool | None
    size_bytes: int
    allocated_bytes: int
    created: float | None
    modified: float | None
    in_use: bool
    pids: tuple[int, ...]
    state: CloneState

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "dir": self.dir,
            "stack": self.stack,
            "source_sha256": self.source_sha256,
            "stale": self.stale,
            "size_bytes": self.size_bytes,
            "allocated_bytes": self.allocated_bytes,
            "created": self.created,
            "modified": self.modified,
            "in_use": self.in_use,
            "pids": list(self.pids),
            "state": self.state,
        }


def is_vm_dir_name(name: str) -> bool:
    """A name the seed's `safe_vm_id` can produce: what a VM directory may be called. Everything else in the
    clones dir (our dot-directories, `lost+found`, an operator's notes) is not a clone."""
    return _SAFE_NAME.fullmatch(name) is not None


def vm_dir_names(clones_dir: Path) -> list[str]:
    """The VM directories, sorted, from one directory read (no stat: the entry type says directory)."""
    try:
        with os.scandir(clones_dir) as entries:
            return sorted(e.name for e in entries if is_vm_dir_name(e.name) and _is_real_dir(e))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="read clones dir", path=clones_dir) from exc


def count_clones(clones_dir: Path) -> int:
    """How many VM directories there are: for the heartbeat and metrics, one directory read."""
    return len(vm_dir_names(clones_dir))


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def list_clones(
    clones_dir: Path, stack_hashes: dict[str, str | None], *, in_use: bool = True, pids: bool = True
) -> list[CloneInfo]:
    """One entry per VM directory, sorted by directory name.

    `stack_hashes` is every stack with its hash where warm (RootfsRegistry.cached_stacks: from the cache
    only). `in_use=False` skips the lease probes (for totals), `pids=False` the /proc scan for held disks.
    """
    by_hash: dict[str, str] = {}
    for name, digest in sorted(stack_hashes.items(), reverse=True):
        if digest is not None:
            by_hash[digest] = name  # several stacks with one hash (aliases): the first by name wins
    found: list[tuple[CloneInfo, inuse.FileId | None, bool | None]] = []
    for name in vm_dir_names(clones_dir):
        entry = _inspect(clones_dir, name, stack_hashes, by_hash, in_use=in_use)
        if entry is not None:
            found.append(entry)
    holders: dict[inuse.FileId, set[int]] = {}
    unsure = {fid for _, fid, verdict in found if fid is not None and verdict is not True}
    if in_use and unsure and (pids or any(verdict is None for _, _, verdict in found)):
        holders = inuse.find_holders(unsure)
    result = []
    for info, fid, verdict in found:
        held = holders.get(fid, set()) if fid is not None else set()
        busy = verdict is False or bool(held)
        result.append(_with_use(info, busy, tuple(sorted(held)) if pids else ()))
    return result


def _with_use(info: CloneInfo, busy: bool, pids: tuple[int, ...]) -> CloneInfo:
    if busy:
        info.in_use, info.pids = True, pids
    return info


def clone_totals(clones_dir: Path) -> tuple[int, int]:
    """(number of VM directories, bytes their disks allocate), for metrics and dashboards: one directory
    read and one lstat per VM (the disk, else the partial disk of an interrupted clone); no lease, no
    record read, no lock."""
    names = vm_dir_names(clones_dir)
    allocated = 0
    for name in names:
        for disk in (CLONE_ROOTFS_FILE, CLONE_ROOTFS_FILE + PARTIAL_SUFFIX):
            try:
                allocated += os.lstat(f"{clones_dir}/{name}/{disk}").st_blocks * 512
            except OSError:
                continue
            break
    return len(names), allocated


def host_summary(clones_dir: Path, stack_hashes: dict[str, str | None]) -> dict[str, Any]:
    """What a scheduler needs to place a VM without asking the host: free and total bytes of the clones
    filesystem, whether it clones by reflink (as probed at start; None if never probed), how many clones
    it holds, and every stack with its hash where warm. Reads no template bytes and writes nothing."""
    try:
        usage: space.FsUsage | None = space.fs_usage(clones_dir)
    except OSError:
        usage = None
    return {
        "free_bytes": usage.free if usage else None,
        "total_bytes": usage.total if usage else None,
        "reflink": space.reflink_known(clones_dir),
        "clones": count_clones(clones_dir),
        "stacks": dict(sorted(stack_hashes.items())),
    }


# --------------------------------------------------------------------------------------------- one VM dir


def _inspect(
    clones_dir: Path,
    name: str,
    stack_hashes: dict[str, str | None],
    by_hash: dict[str, str],
    *,
    in_use: bool,
) -> tuple[CloneInfo, inuse.FileId | None, bool | None] | None:
    """One VM directory, in about a dozen syscalls: the disk's open (its fstat and lease come from that
    one fd), the stamp's and the record's reads."""
    vm_dir = f"{clones_dir}/{name}"
    with _open_dir(vm_dir) as dir_fd:
        if dir_fd is None:
            return None  # released (or replaced by a non-directory) since the directory was read
        disk, verdict = _open_disk(dir_fd, CLONE_ROOTFS_FILE, in_use=in_use)
        stamp = _read(dir_fd, CLONE_STAMP_FILE)
        complete = disk is not None and stat.S_ISREG(disk.st_mode) and bool(stamp)
        if not complete:
            # Ours builds `rootfs.ext4.partial`; the seed writes `rootfs.ext4` and stamps it afterwards.
            partial, partial_verdict = _open_disk(dir_fd, CLONE_ROOTFS_FILE + PARTIAL_SUFFIX, in_use=in_use)
            if partial is not None:
                disk, verdict = partial, partial_verdict
        record = parse_record(_read(dir_fd, CLONE_RECORD_FILE))
        owner = None if record is not None else _read(dir_fd, OWNER_FILE)
        created = _number(record.get("created")) if record else None
        if created is None:
            created = _mtime(dir_fd, CLONE_STAMP_FILE) if stamp else None
        if created is None:
            created = _mtime(dir_fd, ".")
    vm_id = (_text(record.get("vm_id")) if record else None) or owner or name
    stack = _text(record.get("stack")) if record else None
    if stack is None and complete and stamp:
        stack = by_hash.get(stamp)
    state: CloneState = "incomplete" if not complete else ("complete" if record or owner else "foreign")
    info = CloneInfo(
        vm_id=vm_id,
        dir=name,
        stack=stack,
        source_sha256=stamp or None,
        stale=_stale(stack, stamp, stack_hashes) if complete else None,
        size_bytes=disk.st_size if disk is not None else 0,
        allocated_bytes=disk.st_blocks * 512 if disk is not None else 0,
        created=created,
        modified=disk.st_mtime if disk is not None else None,
        in_use=False,
        pids=(),
        state=state,
    )
    fid = (disk.st_dev, disk.st_ino) if disk is not None and verdict is not True else None
    return info, fid, verdict


def _open_disk(dir_fd: int, name: str, *, in_use: bool) -> tuple[os.stat_result | None, bool | None]:
    """The disk's stat and, when asked, its lease verdict (inuse.lease_probe), from one open."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError:
        return None, True
    try:
        try:
            st = os.fstat(fd)
        except OSError:  # as when it cannot be opened: unknown, so treated as in use
            return None, True
        if not in_use or not stat.S_ISREG(st.st_mode):
            return st, True
        return st, inuse.lease_probe(fd, release=False)
    finally:
        close(fd)  # also drops the lease, if the probe took one


def _stale(stack: str | None, stamp: str | None, stack_hashes: dict[str, str | None]) -> bool | None:
    if stack is None:
        # Made from no stack whose hash is warm: stale if every stack is warm (its template is gone or
        # was rotated), unknown while some hash is cold (it may be that one).
        return True if all(d is not None for d in stack_hashes.values()) else None
    if stack not in stack_hashes:
        return True
    current = stack_hashes[stack]
    return None if current is None else current != stamp


@contextlib.contextmanager
def _open_dir(vm_dir: str) -> Iterator[int | None]:
    try:
        fd = os.open(vm_dir, OPEN_DIR)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            yield None
            return
        raise FilesystemError.from_os(exc, op="open clone dir", path=vm_dir) from exc
    try:
        yield fd
    finally:
        close(fd)


def _stat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _mtime(dir_fd: int, name: str) -> float | None:
    st = _stat(dir_fd, name)
    return st.st_mtime if st is not None else None


def _read(dir_fd: int, name: str) -> str | None:
    """A small file's trimmed text; None when absent or unreadable (the inventory reports, never fails)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("utf-8", "surrogatepass").strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        close(fd)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

"""The clones filesystem's space: how much is free, whether clones there are reflinks, and the guard that
refuses a copy which would eat into the reserve.

A sparse copy of a multi-GB template onto a nearly full filesystem fails halfway with ENOSPC, after writing
gigabytes, and a transient error is retried: five times the same wasted copy, with the host's other VMs
starving for space meanwhile. So before a copy that allocates data we compare what it needs (the template's
allocated bytes: the copy is sparse, holes stay holes) with what statfs says is free, and refuse at once,
having written nothing. A reflink allocates no data blocks (a few metadata blocks), so it is not checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from worker.core.layout import CACHE_DIR
from worker.errors import FilesystemError, InsufficientSpace

log = logging.getLogger(__name__)

MIN_FREE_VAR = "ROOTFS_MIN_FREE"

#: _IOW(0x94, 9, int) from linux/fs.h (as in worker.core.cloning; Python 3.11's fcntl has no FICLONE).
_FICLONE = 0x40049409

_RESERVE_RE = re.compile(r"(?:(?P<pct>\d+(?:\.\d+)?)\s*%|(?P<num>\d+)\s*(?P<unit>[KMGT]?)(?:i?B)?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Reserve:
    """Space a clone must leave free: a number of bytes, or a percentage of the filesystem's size."""

    nbytes: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.nbytes is None) == (self.percent is None):
            raise ValueError("a reserve is either bytes or a percentage")

    @classmethod
    def parse(cls, raw: str) -> Reserve:
        """`5%`, `0.5%`, `10737418240`, `10G` (K/M/G/T are powers of 1024)."""
        match = _RESERVE_RE.fullmatch(raw.strip())
        if match is None:
            raise ValueError("expected bytes (e.g. 10737418240 or 10G) or a percentage (e.g. 5%)")
        if match["pct"] is not None:
            percent = float(match["pct"])
            if percent > 100:
                raise ValueError("a percentage must be at most 100")
            return cls(percent=percent)
        return cls(nbytes=int(match["num"]) * _UNITS[match["unit"].upper()])

    def of(self, total: int) -> int:
        """The reserve in bytes on a filesystem of `total` bytes."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.percent is not None
        return int(total * self.percent / 100)

    def __str__(self) -> str:
        if self.nbytes is not None:
            return str(self.nbytes)
        return f"{self.percent:g}%"


DEFAULT_RESERVE = Reserve(percent=5.0)


@dataclass(frozen=True)
class FsUsage:
    """statfs of a filesystem: bytes free to an unprivileged writer (f_bavail), and its size."""

    free: int
    total: int


def fs_usage(path: Path) -> FsUsage:
    """statfs of the filesystem that holds `path` (or would: its nearest existing ancestor). For the
    heartbeat and for metrics; never raises for a path that does not exist yet."""
    st = os.statvfs(_existing(path))
    return FsUsage(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


def _stat_existing(path: Path) -> os.stat_result:
    """The stat of `path`, or of its nearest existing ancestor (one stat when it exists, as it mostly does)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return os.stat(_existing(path))


def _existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


# ------------------------------------------------------------------------------------------------ reflink

_reflinks: dict[int, bool] = {}
_reflinks_mutex = threading.Lock()


def reflink_known(clones_dir: Path) -> bool | None:
    """Whether the clones filesystem clones by reflink, as probed before (None: never probed in this
    process). Never touches the disk: for the heartbeat."""
    try:
        dev = _stat_existing(clones_dir).st_dev
    except OSError:
        return None
    with _reflinks_mutex:
        return _reflinks.get(dev)


def probe_reflink(clones_dir: Path) -> bool:
    """Whether FICLONE works on the clones filesystem, probed once per filesystem and process with two
    tiny files in our private cache dir. A probe that cannot write (read-only, no permission) says False
    and is not remembered, so a later call tries again."""
    try:
        dev = _stat_existing(clones_dir).st_dev
    except OSError:
        return False
    with _reflinks_mutex:
        known = _reflinks.get(dev)
    if known is not None:
        return known
    try:
        result = _probe(clones_dir / CACHE_DIR)
    except OSError as exc:
        log.warning("could not probe reflink support under %s: %s", clones_dir, exc)
        return False
    with _reflinks_mutex:
        _reflinks[dev] = result
    log.info("clones filesystem at %s clones by %s", clones_dir, "reflink" if result else "sparse copy")
    return result


def _probe(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f".reflink-probe.{os.getpid()}.{threading.get_ident()}"
    src_path, dst_path = Path(f"{base}.src"), Path(f"{base}.dst")
    try:
        src_path.write_bytes(b"\0" * 4096)
        with src_path.open("rb") as src, dst_path.open("wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            except OSError:
                return False
            return True
    finally:
        for leftover in (src_path, dst_path):
            with contextlib.suppress(OSError):
                leftover.unlink()


# -------------------------------------------------------------------------------------------------- guard


def will_reflink(template: os.stat_result, clones_dir: Path) -> bool:
    """A clone of this template will be a reflink: same filesystem, and that filesystem reflinks.

    Different devices never reflink (FICLONE says EXDEV), so the probe, which writes, runs only when they
    are one. (btrfs subvolumes report distinct devices yet could reflink: they get the guard, a safe error.)
    """
    try:
        same = _stat_existing(clones_dir).st_dev == template.st_dev
    except OSError:
        return False
    return same and probe_reflink(clones_dir)


def ensure_room(template: os.stat_result, clones_dir: Path, reserve: Reserve) -> None:
    """Raise InsufficientSpace, before anything is written, when a sparse copy of `template` would leave
    less than `reserve` free on the clones filesystem. A reflink needs no room and passes."""
    if will_reflink(template, clones_dir):
        return
    needed = template.st_blocks * 512
    try:
        usage = fs_usage(clones_dir)
    except OSError as exc:
        raise FilesystemError.from_os(exc, op="check free space", path=clones_dir) from exc
    keep = reserve.of(usage.total)
    if usage.free - needed < keep:
        raise InsufficientSpace(str(clones_dir), needed, usage.free, keep)

"""A reflink clone on XFS waits for the disk once: its stamp is a reflink too (worker.core.stamps), and XFS logs
metadata in order (docs/crash-safety.md, "One round trip on XFS"). Elsewhere the two-round-trip protocol stays."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MIB, record_fsyncs, sha256_of, write_template, xfs_reflink_mount
from worker.core import cloning, durability
from worker.core.config import RootfsConfig
from worker.core.registry import RootfsRegistry
from worker.errors import FilesystemError


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One XFS loop mount (reflink=1) for the module; each test works in its own directory on it."""
    with xfs_reflink_mount(tmp_path_factory.mktemp("xfs"), size_mib=300) as mountpoint:
        yield mountpoint


@pytest.fixture
def root(xfs: Path, request: pytest.FixtureRequest) -> Path:
    path: Path = xfs / str(request.node.name).replace("[", "-").replace("]", "")
    path.mkdir()
    return path


def registry_on(root: Path, data: bytes = b"") -> RootfsRegistry:
    write_template(root / "templates", "base", data or os.urandom(MIB))
    return RootfsRegistry(RootfsConfig(root / "templates", root / "clones"))


def log_forces_waited(mountpoint: Path) -> int:
    """XFS's count of log forces that waited for the disk (per device, /sys/fs/xfs/<dev>/stats)."""
    st = os.stat(mountpoint)
    device = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve().name
    for line in Path(f"/sys/fs/xfs/{device}/stats/stats").read_text().splitlines():
        if line.startswith("log "):
            return int(line.split()[5])
    raise AssertionError("no log line in the XFS stats")


def test_only_xfs_is_trusted_to_log_metadata_in_order(xfs: Path, tmp_path: Path) -> None:
    """orders_metadata says yes for a file on XFS and no for one on the work dir's filesystem (not XFS here)."""
    (xfs / "probe").write_bytes(b"x")
    (tmp_path / "probe").write_bytes(b"x")
    for path, expected in ((xfs / "probe", True), (tmp_path / "probe", False)):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert durability.orders_metadata(fd) is expected
        finally:
            os.close(fd)


def test_without_fstatfs_nothing_is_trusted_and_that_is_not_remembered(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem type cannot be asked, a file on XFS is not trusted; asked again once it can be, it is."""
    (root / "probe").write_bytes(b"x")
    durability._types.clear()
    monkeypatch.setattr(durability, "_fstatfs", lambda: None)
    fd = os.open(root / "probe", os.O_RDONLY)
    try:
        assert durability.filesystem_type(fd) is None
        assert durability.orders_metadata(fd) is False
        monkeypatch.undo()
        assert durability.filesystem_type(fd) == durability.XFS_MAGIC
        assert durability.orders_metadata(fd) is True
    finally:
        os.close(fd)


def test_the_filesystem_type_is_asked_once_per_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """orders_metadata asks fstatfs once per filesystem and process (a statfs on XFS runs background inode gc on
    the caller's CPU), answers for every file on it from then on, and says no for a descriptor it cannot stat."""
    durability._types.clear()
    real = durability._fstatfs()
    assert real is not None
    probe = os.open(tmp_path, os.O_RDONLY)
    on_xfs = durability.filesystem_type(probe) == durability.XFS_MAGIC
    os.close(probe)
    asked: list[int] = []

    def counting(fd: int, buf: Any) -> int:
        asked.append(fd)
        return real(fd, buf)

    monkeypatch.setattr(durability, "_fstatfs", lambda: counting)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x")
        fd = os.open(tmp_path / name, os.O_RDONLY)
        try:
            assert durability.orders_metadata(fd) is on_xfs
        finally:
            os.close(fd)
    assert len(asked) == 1
    fd = os.open(tmp_path / "a", os.O_RDONLY)
    os.close(fd)
    assert durability.orders_metadata(fd) is False  # closed: fstat fails
    assert len(asked) == 1


def test_a_reflink_clone_on_xfs_waits_for_the_disk_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On XFS a clone flushes only its two directories, after the rename (one log force that waits; the
    fallback, where no stamp source can be made, waits twice), and its stamp is a file of its own holding the
    template's hash."""
    registry = registry_on(root)
    registry.warm()
    forces = log_forces_waited(root)
    flushed = record_fsyncs(monkeypatch)
    one_trip = []
    for n in range(3):  # the fewest of three: a background log force (xfsaild) may fall inside one clone
        before = log_forces_waited(root)
        rootfs = registry.clone_for_vm(f"vm-{n}", "base")
        one_trip.append(log_forces_waited(root) - before)
        assert flushed == [str(root / "clones" / f"vm-{n}"), str(root / "clones")]
        flushed.clear()
        stamp = rootfs.path.parent / "rootfs.ext4.sha256"
        assert stamp.read_text() == rootfs.source_sha256 == sha256_of(rootfs.path)
        st = stamp.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert min(one_trip) == 1, one_trip
    assert log_forces_waited(root) > forces

    source = root / "clones" / ".cache" / "stamps" / rootfs.source_sha256
    source.unlink()
    source.mkdir()  # in the way: no stamp source can be made
    registry = RootfsRegistry(registry.config)  # a fresh worker: no source kept open either
    two_trips = []
    for n in range(3):
        before = log_forces_waited(root)
        rootfs = registry.clone_for_vm(f"vm-fallback-{n}", "base")
        two_trips.append(log_forces_waited(root) - before)
        assert len(flushed) == 4
        flushed.clear()
        assert (rootfs.path.parent / "rootfs.ext4.sha256").read_text() == sha256_of(rootfs.path)
    assert min(two_trips) == 2, two_trips


def test_a_damaged_stamp_source_never_reaches_a_clone(root: Path) -> None:
    """A stamp source overwritten with another hash (same inode, as a stray `echo >` would) is noticed: the
    clone's stamp is still its template's hash, and the source is whole again."""
    registry = registry_on(root)
    digest = registry.clone_for_vm("vm-1", "base").source_sha256
    source = root / "clones" / ".cache" / "stamps" / digest
    assert source.read_text() == digest
    source.chmod(0o644)
    source.write_text("0" * 64)
    rootfs = registry.clone_for_vm("vm-2", "base")
    assert (rootfs.path.parent / "rootfs.ext4.sha256").read_text() == digest == sha256_of(rootfs.path)
    assert source.read_text() == digest


def test_a_released_clone_leaves_the_stamp_source_and_the_other_clones_intact(root: Path) -> None:
    """Stamps share blocks with their source: releasing one clone changes neither the source nor another
    clone's stamp, and writing into one stamp (as the Rust runtime rewrites a stamp) changes no other."""
    registry = registry_on(root)
    a = registry.clone_for_vm("vm-a", "base")
    b = registry.clone_for_vm("vm-b", "base")
    source = root / "clones" / ".cache" / "stamps" / a.source_sha256
    (a.path.parent / "rootfs.ext4.sha256").write_text("f" * 64)
    assert registry.release("vm-a")
    assert (b.path.parent / "rootfs.ext4.sha256").read_text() == b.source_sha256
    assert source.read_text() == b.source_sha256


def test_warm_makes_the_stamp_sources_and_drops_stale_ones(root: Path) -> None:
    """On XFS a warm-up leaves one stamp source per template hash, and drops those of hashes no template has;
    the first clone after it then makes none (its only flushes are the two directories)."""
    registry = registry_on(root)
    stamps_dir = root / "clones" / ".cache" / "stamps"
    stamps_dir.mkdir(parents=True)
    (stamps_dir / ("0" * 64)).write_text("0" * 64)
    digest = registry.stack("base").sha256  # type: ignore[union-attr]
    registry.warm()
    assert os.listdir(stamps_dir) == [digest]
    assert (stamps_dir / digest).read_text() == digest


def test_warm_makes_no_stamp_sources_where_clones_are_copies(tmp_path: Path) -> None:
    """Where clones are copies (the work dir: no reflink, not XFS) there is nothing to reflink: no sources."""
    registry = registry_on(tmp_path, b"x" * 4096)
    registry.warm()
    assert not (tmp_path / "clones" / ".cache" / "stamps").exists()
    rootfs = registry.clone_for_vm("vm-1", "base")
    assert rootfs.method == "copy"
    assert not (tmp_path / "clones" / ".cache" / "stamps").exists()


def test_a_reflinked_stamp_is_an_ordinary_file_and_costs_no_descriptor(root: Path) -> None:
    """On XFS the stamp has the mode of a written stamp (0644 under the umask), and neither clones nor a
    warm-up keep descriptors open beyond the few kept stamp sources."""
    registry = registry_on(root)
    registry.warm()
    umask = os.umask(0)
    os.umask(umask)
    rootfs = registry.clone_for_vm("vm-0", "base")
    before = len(os.listdir("/proc/self/fd"))
    for n in range(1, 6):
        registry.clone_for_vm(f"vm-{n}", "base")
        registry.warm()
    assert len(os.listdir("/proc/self/fd")) == before
    stamp = rootfs.path.parent / "rootfs.ext4.sha256"
    assert stat.S_IMODE(stamp.stat().st_mode) == 0o644 & ~umask


def test_a_stamp_reflink_refused_falls_back_to_writing_it(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the stamp cannot be reflinked (the source on another filesystem, say), the clone writes its stamp
    and takes the two round trips, leaking no descriptor."""
    registry = registry_on(root)
    registry.warm()
    real = cloning.reflink
    monkeypatch.setattr(
        cloning,
        "reflink",
        lambda src, dst, *, dst_path: False if dst_path.endswith(".sha256") else real(src, dst, dst_path=dst_path),
    )
    flushed = record_fsyncs(monkeypatch)
    registry.clone_for_vm("vm-0", "base")
    before = len(os.listdir("/proc/self/fd"))
    flushed.clear()
    rootfs = registry.clone_for_vm("vm-1", "base")
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(flushed) == 4
    assert (rootfs.path.parent / "rootfs.ext4.sha256").read_text() == sha256_of(rootfs.path)


@pytest.mark.parametrize("step", ["create", "reflink"])
def test_a_failing_stamp_on_xfs_names_it_and_leaves_no_clone(
    root: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Creating or reflinking the stamp failing (EIO) is a transient FilesystemError naming the stamp; the VM
    directory goes, and the next call succeeds."""
    registry = registry_on(root)
    registry.warm()
    vm_dir = root / "clones" / "vm-1"
    stamp = vm_dir / "rootfs.ext4.sha256"
    if step == "create":
        real_open = os.open

        def failing_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
            if path == "rootfs.ext4.sha256":
                raise OSError(errno.EIO, "Input/output error")
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", failing_open)
    else:
        real = cloning.reflink

        def failing_reflink(src: int, dst: int, *, dst_path: str) -> bool:
            if dst_path.endswith(".sha256"):
                raise FilesystemError.from_os(OSError(errno.EIO, "Input/output error"), op="reflink", path=dst_path)
            return real(src, dst, dst_path=dst_path)

        monkeypatch.setattr(cloning, "reflink", failing_reflink)
    with pytest.raises(FilesystemError) as info:
        registry.clone_for_vm("vm-1", "base")
    assert (info.value.path, info.value.errno) == (str(stamp), errno.EIO)
    assert info.value.op == ("write" if step == "create" else "reflink")
    assert info.value.transient
    assert not vm_dir.exists()
    monkeypatch.undo()
    assert registry.clone_for_vm("vm-1", "base").path.exists()


def test_a_copy_flushes_its_data_first_even_where_metadata_is_ordered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a reflink makes a clone metadata alone: a copy on a filesystem trusted to order metadata still
    flushes its stamp and data before the rename (the two round trips)."""
    registry = registry_on(tmp_path, b"x" * 4096)
    monkeypatch.setattr(durability, "orders_metadata", lambda fd: True)
    flushed = record_fsyncs(monkeypatch)
    rootfs = registry.clone_for_vm("vm-1", "base")
    assert rootfs.method == "copy"
    vm_dir = tmp_path / "clones" / "vm-1"
    assert flushed == [
        str(vm_dir / "rootfs.ext4.sha256"),
        str(vm_dir / "rootfs.ext4.partial"),
        str(vm_dir),
        str(tmp_path / "clones"),
    ]

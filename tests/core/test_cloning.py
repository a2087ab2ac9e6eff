from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import tmpfs_mount, xfs_reflink_mount
from worker.core.cloning import CloneMethod, clone_fd
from worker.errors import FilesystemError, InvalidArgument, TemplateChanged

MiB = 1 << 20


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    with xfs_reflink_mount(tmp_path) as mountpoint:
        yield mountpoint


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path, size_mib=8) as mountpoint:
        yield mountpoint


@pytest.fixture
def roomy_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path, size_mib=64) as mountpoint:
        yield mountpoint


def clone(src: Path, dst: Path) -> CloneMethod:
    """Clone the way the worker does: read-only source, a freshly created destination."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            return clone_fd(src_fd, dst_fd, src_path=str(src), dst_path=str(dst))
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def data_map(path: Path) -> list[tuple[int, int]]:
    """[start, end) of the file's data extents, as SEEK_DATA/SEEK_HOLE report them."""
    extents: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, offset))
    finally:
        os.close(fd)
    return extents


def assert_same_sparse_file(dst: Path, src: Path) -> None:
    """Same size, same holes, same bytes in every data extent: the same content, without reading holes."""
    assert dst.stat().st_size == src.stat().st_size
    extents = data_map(src)
    assert data_map(dst) == extents
    with src.open("rb") as a, dst.open("rb") as b:
        for start, end in extents:
            a.seek(start)
            b.seek(start)
            assert a.read(end - start) == b.read(end - start), f"bytes differ in [{start}, {end})"


def scattered_sparse_file(path: Path, size: int = 512 * MiB) -> Path:
    """Mostly hole, with a few MiB of data at the start, unaligned in the middle, and in the last byte."""
    assert size >= 8 * MiB, "the data extents below would not fit"
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in [(0, MiB), (size // 4 + 777, 2 * MiB), (size // 2 + 4096, 64 * 1024)]:
            f.seek(offset)
            f.write(os.urandom(length))
        f.seek(size - 1)
        f.write(b"\x01")
    return path


def filesystem_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Path:
    if filesystem_type(tmp_path) != "ext2/ext3":  # statfs names ext4 by its shared magic
        pytest.skip(f"tmp_path is on {filesystem_type(tmp_path)}, these tests describe ext4")
    return tmp_path


def test_clone_has_identical_bytes_and_is_a_sparse_copy_on_ext4(ext4_dir: Path) -> None:
    """On ext4 (no reflink) the clone is a "sparse-copy" with exactly the source's bytes."""
    src = ext4_dir / "rootfs.ext4"
    src.write_bytes(os.urandom(3 * MiB + 17))
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert dst.read_bytes() == src.read_bytes()


def test_sparse_source_stays_sparse(ext4_dir: Path) -> None:
    """A 512 MiB file with a few MiB of data clones with its size, bytes and holes, no more blocks."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4")
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    assert dst.stat().st_blocks <= src.stat().st_blocks
    assert_same_sparse_file(dst, src)


def test_trailing_hole_keeps_the_full_size(ext4_dir: Path) -> None:
    """A template that ends in a hole clones to the full apparent size, not to the end of its last data."""
    src = ext4_dir / "rootfs.ext4"
    with src.open("wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(64 * MiB)
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    assert dst.stat().st_size == 64 * MiB
    assert_same_sparse_file(dst, src)


def test_empty_source_clones_to_empty_file(ext4_dir: Path) -> None:
    """An empty template gives an empty clone."""
    src = ext4_dir / "empty.ext4"
    src.write_bytes(b"")
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    assert dst.stat().st_size == 0


def test_clone_is_independent_of_the_source(ext4_dir: Path) -> None:
    """Writing into the clone leaves the template's bytes alone: a copy, never a hard link."""
    src = ext4_dir / "rootfs.ext4"
    src.write_bytes(os.urandom(MiB))
    before = sha256(src)
    dst = ext4_dir / "clone.ext4"
    clone(src, dst)
    with dst.open("r+b") as f:
        f.write(b"written by the VM")
    assert sha256(src) == before
    assert src.stat().st_nlink == 1
    assert src.stat().st_ino != dst.stat().st_ino


def test_non_empty_destination_is_refused(ext4_dir: Path) -> None:
    """A destination that already has bytes is rejected and left as it was (old bytes would show in holes)."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"
    dst.write_bytes(b"stale")
    src_fd, dst_fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        with pytest.raises(InvalidArgument):
            clone_fd(src_fd, dst_fd, src_path=str(src), dst_path=str(dst))
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert dst.read_bytes() == b"stale"


def test_source_offset_is_restored(ext4_dir: Path) -> None:
    """The caller's source fd offset is where it was, though SEEK_DATA walked the file."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=8 * MiB)
    dst = ext4_dir / "clone.ext4"
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.lseek(src_fd, 4242, os.SEEK_SET)
        clone_fd(src_fd, dst_fd, src_path=str(src), dst_path=str(dst))
        assert os.lseek(src_fd, 0, os.SEEK_CUR) == 4242
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert sha256(dst) == sha256(src)


def test_without_seek_data_the_copy_is_still_exact(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where SEEK_DATA is unsupported (EINVAL) the whole file is copied as data, byte-exact."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=16 * MiB)
    real_lseek = os.lseek

    def lseek(fd: int, offset: int, whence: int) -> int:
        if whence in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_lseek(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", lseek)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    monkeypatch.undo()
    assert dst.stat().st_size == src.stat().st_size
    assert sha256(dst) == sha256(src)


def test_without_copy_file_range_the_copy_is_exact_and_sparse(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When copy_file_range refuses the pair (EXDEV), read/write copies the same bytes and holes."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=256 * MiB)

    def refuse(*args: int) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = ext4_dir / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert dst.stat().st_blocks <= src.stat().st_blocks
    assert_same_sparse_file(dst, src)


def test_source_truncated_during_copy_raises_template_changed(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that shrinks while it is copied is a transient TemplateChanged, not a half-zero clone."""
    src = scattered_sparse_file(ext4_dir / "rootfs.ext4", size=256 * MiB)
    real_copy_file_range = os.copy_file_range

    def copy_then_truncate(src_fd: int, dst_fd: int, count: int, offset_src: int, offset_dst: int) -> int:
        copied = real_copy_file_range(src_fd, dst_fd, count, offset_src, offset_dst)
        os.truncate(src, 100 * MiB)
        return copied

    monkeypatch.setattr(os, "copy_file_range", copy_then_truncate)
    with pytest.raises(TemplateChanged) as info:
        clone(src, ext4_dir / "clone.ext4")
    assert info.value.path == str(src)
    assert info.value.transient


def test_reflink_on_xfs(xfs_dir: Path) -> None:
    """On XFS with reflink=1 the clone is a reflink with identical bytes, and writing it spares the source."""
    src = scattered_sparse_file(xfs_dir / "rootfs.ext4", size=64 * MiB)
    before = sha256(src)
    dst = xfs_dir / "clone.ext4"
    assert clone(src, dst) == "reflink"
    assert sha256(dst) == before
    with dst.open("r+b") as f:
        f.write(b"written by the VM")
        f.seek(16 * MiB + 777)
        f.write(b"and inside the second extent")
    assert sha256(src) == before
    assert sha256(dst) != before


def test_clone_across_filesystems_is_a_sparse_copy(tmp_path: Path, roomy_tmpfs: Path) -> None:
    """ext4 -> tmpfs (no reflink, no same-fs copy_file_range) still copies bytes and holes exactly."""
    src = scattered_sparse_file(tmp_path / "rootfs.ext4", size=512 * MiB)
    dst = roomy_tmpfs / "clone.ext4"
    assert clone(src, dst) == "sparse-copy"
    assert dst.stat().st_blocks <= src.stat().st_blocks
    assert_same_sparse_file(dst, src)


def test_full_destination_raises_transient_enospc(tmp_path: Path, tiny_tmpfs: Path) -> None:
    """16 MiB of data into an 8 MiB tmpfs is a transient FilesystemError(ENOSPC) naming the destination."""
    src = tmp_path / "rootfs.ext4"
    src.write_bytes(os.urandom(16 * MiB))
    dst = tiny_tmpfs / "clone.ext4"
    with pytest.raises(FilesystemError) as info:
        clone(src, dst)
    assert info.value.errno == errno.ENOSPC
    assert info.value.transient
    assert info.value.path == str(dst)

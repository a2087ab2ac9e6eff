"""Page-cache residency: exact to the page, and "not resident" wherever the answer is unknown."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import evict
from worker.core import pagecache

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def first_mib_cached(tmp_path: Path) -> Iterator[int]:
    """A 4 MiB file of which exactly the first and the third MiB are in the page cache; yields a read-only
    descriptor."""
    path = tmp_path / "dense.ext4"
    path.write_bytes(os.urandom(4 * MiB))
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: read exactly the first MiB
        os.pread(fd, MiB, 0)
        os.pread(fd, MiB, 2 * MiB)
        yield fd
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def fresh_libc() -> Iterator[None]:
    """The libc lookup is made once per process: forget it before and after each test, so that each test
    loads it (and one that changes what it finds does not leak that)."""
    pagecache._libc.cache_clear()
    yield
    pagecache._libc.cache_clear()


def test_a_range_is_resident_exactly_when_all_its_pages_are(first_mib_cached: int) -> None:
    """Ranges inside the cached first MiB are resident, down to one byte, however they are aligned; a range
    reaching one byte (one page) past it is not, even though pages further on (the third MiB) are cached."""
    fd = first_mib_cached
    inside = [(0, 1), (0, MiB), (17, MiB - 17), (PAGE + 17, 100), (MiB - 1, 1), (MiB - 100, 100), (MiB - PAGE, PAGE)]
    inside += [(2 * MiB, PAGE), (2 * MiB + 5, MiB - 5)]
    for offset, length in inside:
        assert pagecache.resident(fd, offset, length), (offset, length)
    reaching_out = [
        (0, MiB + 1),
        (MiB - 1, 2),
        (MiB - 100, 101),
        (MiB, 1),
        (MiB - PAGE + 1, PAGE),
        (MiB - PAGE, 2 * PAGE),
    ]
    reaching_out += [(0, 3 * MiB), (2 * MiB - 1, 2), (3 * MiB, PAGE), (2 * MiB, MiB + 1)]
    for offset, length in reaching_out:
        assert not pagecache.resident(fd, offset, length), (offset, length)


def test_an_empty_or_negative_range_is_never_resident(first_mib_cached: int) -> None:
    """Nothing to hash is nothing to map: an empty or negative length is not resident, even where cached."""
    fd = first_mib_cached
    assert pagecache.resident(fd, 0, 1)
    assert not pagecache.resident(fd, 0, 0)
    assert not pagecache.resident(fd, PAGE, -1)


def test_a_failing_call_is_not_resident(first_mib_cached: int) -> None:
    """Where the mapping fails (a closed descriptor here) the answer is "not resident"."""
    assert pagecache.resident(first_mib_cached, 0, PAGE)
    assert not pagecache.resident(-1, 0, PAGE)


def test_without_libc_nothing_is_resident(first_mib_cached: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libc cannot be loaded, nothing is resident (everything is read, never mapped)."""
    assert pagecache.resident(first_mib_cached, 0, PAGE)
    pagecache._libc.cache_clear()
    with monkeypatch.context() as patched:

        def no_libc(*args: object, **kwargs: object) -> None:
            raise OSError("libc.so.6: cannot open shared object file")

        patched.setattr(ctypes, "CDLL", no_libc)
        assert not pagecache.resident(first_mib_cached, 0, PAGE)


def test_a_window_far_into_a_large_file_is_mapped_at_its_own_offset(tmp_path: Path) -> None:
    """Offsets past 4 GiB reach the mapping whole (not cut to 32 bits): the view holds the bytes at 5 GiB."""
    path = tmp_path / "large.ext4"
    data = os.urandom(MiB)
    with path.open("wb") as f:
        f.seek(5 << 30)
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, MiB, 5 << 30)
        with pagecache.resident_view(fd, (5 << 30) + 3, (5 << 30) + MiB) as view:
            assert view is not None and bytes(view) == data[3:]
    finally:
        os.close(fd)


def mappings_of(path: Path) -> int:
    """How many mappings of `path` this process has (/proc/self/maps)."""
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(path)))


def test_no_mapping_outlives_its_window(first_mib_cached: int, tmp_path: Path) -> None:
    """Every window is unmapped when its `with` ends, whether it was offered or refused: none pile up."""
    path = tmp_path / "dense.ext4"
    with pagecache.resident_view(first_mib_cached, 0, MiB) as view:
        assert view is not None
        assert mappings_of(path) == 1
    with pagecache.resident_view(first_mib_cached, 0, 2 * MiB) as refused:
        assert refused is None
    for _ in range(50):
        assert pagecache.resident(first_mib_cached, 0, MiB)
    assert mappings_of(path) == 0

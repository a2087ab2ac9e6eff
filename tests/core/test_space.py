"""Disk-space guard: a copy that would eat into the reserve is refused before anything is written."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MIB, tmpfs_mount, tree, write_template, xfs_reflink_mount
from worker import FilesystemError, InsufficientSpace, RootfsConfig, RootfsRegistry
from worker.core import cloning, space
from worker.core.space import Reserve

UNREADABLE = "expected bytes (e.g. 10737418240 or 10G) or a percentage (e.g. 5%)"
OVER_100 = "a percentage must be at most 100"


@pytest.fixture(autouse=True)
def _no_filesystem_probed_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no filesystem probed. The answers are remembered per device number for the life
    of the process, and the device number one test's unmount frees is reused by the next test's mount (under
    mutmut the process has run the whole suite before): without this a test could read another's answer."""
    monkeypatch.setattr(space, "_reflinks", {})


def space_log(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """(level, message) of every record this module logged."""
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == space.__name__]


def fill(fs: Path) -> Path:
    """Write into `fs` until it is full; returns the file that holds the space."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("5%", Reserve(percent=5.0)),
        ("0.5%", Reserve(percent=0.5)),
        ("100%", Reserve(percent=100.0)),
        ("0", Reserve(nbytes=0)),
        ("3K", Reserve(nbytes=3 << 10)),
        ("10G", Reserve(nbytes=10 << 30)),
        ("4096", Reserve(nbytes=4096)),
    ],
)
def test_reserve_reads_bytes_or_a_percentage(raw: str, expected: Reserve) -> None:
    """ROOTFS_MIN_FREE takes bytes (with an optional K/M/G/T) or a percentage of the filesystem."""
    assert Reserve.parse(raw) == expected
    assert Reserve(percent=5.0).of(1000) == 50
    assert Reserve(nbytes=7).of(1000) == 7


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", UNREADABLE),
        ("five", UNREADABLE),
        ("-1", UNREADABLE),
        ("5 %%", UNREADABLE),
        ("1.5G", UNREADABLE),
        ("101%", OVER_100),
        ("100.5%", OVER_100),
    ],
)
def test_reserve_refuses_what_it_cannot_read(raw: str, message: str) -> None:
    """Anything but whole bytes or a percentage up to 100 is refused, with a message saying what is expected."""
    with pytest.raises(ValueError) as refused:
        Reserve.parse(raw)
    assert str(refused.value) == message


def test_reserve_is_either_bytes_or_a_percentage() -> None:
    """A reserve made in code with both or neither amount is refused; with one it is what it says."""
    with pytest.raises(ValueError) as neither:
        Reserve()
    with pytest.raises(ValueError) as both:
        Reserve(nbytes=1, percent=1.0)
    assert str(neither.value) == str(both.value) == "a reserve is either bytes or a percentage"
    assert Reserve(nbytes=1).of(1000) == 1
    assert Reserve(percent=1.0).of(1000) == 10


@pytest.mark.parametrize(("reserve", "shown"), [(Reserve(nbytes=4096), "4096"), (Reserve(percent=0.5), "0.5%")])
def test_reserve_shows_as_it_is_written(reserve: Reserve, shown: str) -> None:
    """A reserve prints the way ROOTFS_MIN_FREE writes it, and reads back as itself."""
    assert str(reserve) == shown
    assert Reserve.parse(shown) == reserve


def test_copy_may_use_all_the_space_above_the_reserve_and_not_a_byte_more(tmp_path: Path) -> None:
    """A copy needs the template's allocated bytes: leaving exactly the reserve free passes, one byte less is
    refused, and the error gives those numbers."""
    template = write_template(tmp_path / "templates", "base", os.urandom(MIB)).stat()  # another fs: a copy
    needed = template.st_blocks * 512
    assert needed >= MIB
    with tmpfs_mount(tmp_path, size_mib=4) as fs:
        clones = fs / "clones"
        free = space.fs_usage(clones).free
        assert space.will_reflink(template, clones) is False
        space.ensure_room(template, clones, Reserve(nbytes=free - needed))
        with pytest.raises(InsufficientSpace) as refused:
            space.ensure_room(template, clones, Reserve(nbytes=free - needed + 1))
        err = refused.value
        assert (err.path, err.needed, err.free, err.reserve) == (str(clones), needed, free, free - needed + 1)


def test_clones_dir_the_kernel_cannot_look_up_fails_the_space_check_as_a_filesystem_error(tmp_path: Path) -> None:
    """A clones dir whose path the kernel refuses (a name over 255 bytes) is no reflink and cannot be probed; the
    space check then fails with FilesystemError("check free space") naming it, where a good path passes."""
    template = write_template(tmp_path / "templates", "base", b"x" * 4096).stat()
    clones = tmp_path / ("c" * 300) / "clones"
    assert space.reflink_known(clones) is None
    assert space.will_reflink(template, clones) is False
    assert space.probe_reflink(clones) is False
    with pytest.raises(FilesystemError) as failed:
        space.ensure_room(template, clones, Reserve(nbytes=0))
    err = failed.value
    assert (err.op, err.path, err.errno) == ("check free space", str(clones), errno.ENAMETOOLONG)
    space.ensure_room(template, tmp_path / "clones", Reserve(nbytes=0))


@pytest.mark.parametrize("cache_dir_exists", [False, True], ids=["new-clones-dir", "cache-dir-exists"])
def test_probe_without_reflink_answers_false_once_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cache_dir_exists: bool
) -> None:
    """tmpfs cannot reflink: the probe (making the clones dir if need be) says so, logs it, leaves no probe files,
    and is remembered: a second call does not probe again."""
    caplog.set_level(logging.INFO, logger=space.__name__)
    with tmpfs_mount(tmp_path, size_mib=1) as fs:
        clones = fs / "deep" / "clones"
        if cache_dir_exists:
            (clones / ".cache").mkdir(parents=True)
        assert space.reflink_known(clones) is None
        assert space.probe_reflink(clones) is False
        assert space.reflink_known(clones) is False
        assert space.probe_reflink(clones) is False
        assert list((clones / ".cache").iterdir()) == []
        assert space_log(caplog) == [(logging.INFO, f"clones filesystem at {clones} clones by sparse copy")]


def test_probe_that_cannot_write_says_false_and_probes_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a full filesystem the probe answers False, warns why and does not remember it; once one block is free
    (all the probe writes) it probes, and that answer is remembered."""
    caplog.set_level(logging.INFO, logger=space.__name__)
    with tmpfs_mount(tmp_path, size_mib=1) as fs:
        clones = fs / "clones"
        (clones / ".cache").mkdir(parents=True)
        filler = fill(fs)
        assert space.fs_usage(fs).free == 0

        assert space.probe_reflink(clones) is False
        assert space.reflink_known(clones) is None
        [(level, message)] = space_log(caplog)
        assert level == logging.WARNING
        assert message.startswith(f"could not probe reflink support under {clones}: [Errno {errno.ENOSPC}] ")
        assert os.strerror(errno.ENOSPC) in message
        assert list((clones / ".cache").iterdir()) == []

        caplog.clear()
        block = os.statvfs(fs).f_frsize
        os.truncate(filler, filler.stat().st_size - block)
        assert space.fs_usage(fs).free == block
        assert space.probe_reflink(clones) is False
        assert space.reflink_known(clones) is False
        assert space_log(caplog) == [(logging.INFO, f"clones filesystem at {clones} clones by sparse copy")]
        assert list((clones / ".cache").iterdir()) == []


def test_clone_that_would_eat_into_the_reserve_fails_before_any_byte_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a 16 MiB filesystem with 6 MiB reserved, a 10 MiB copy is refused at once and writes nothing; a
    4 MiB one still succeeds."""
    with tmpfs_mount(tmp_path, size_mib=16) as fs:
        templates = tmp_path / "templates"
        write_template(templates, "big", os.urandom(10 * MIB))
        write_template(templates, "small", os.urandom(4 * MIB))
        clones = fs / "clones"
        registry = RootfsRegistry(RootfsConfig(templates, clones, min_free=Reserve(nbytes=6 * MIB)))
        registry.clone_for_vm("vm-warm", "small")  # the clones dir exists, with its cache and lock dirs
        copies: list[Any] = []
        real = cloning.clone_fd

        def counting(*a: Any, **kw: Any) -> Any:
            copies.append(a)
            return real(*a, **kw)

        monkeypatch.setattr(cloning, "clone_fd", counting)
        before, free_before = tree(clones), space.fs_usage(clones).free

        with pytest.raises(InsufficientSpace) as refused:
            registry.clone_for_vm("vm-big", "big")

        assert copies == []
        assert tree(clones) == before, "the refused clone wrote something"
        assert space.fs_usage(clones).free == free_before
        err = refused.value
        assert err.transient
        assert err.path == str(clones)
        assert err.needed >= 10 * MIB and err.reserve == 6 * MIB and err.free == free_before

        fits = registry.clone_for_vm("vm-small", "small")
        assert len(copies) == 1
        assert fits.path.stat().st_size == 4 * MIB


def test_percentage_reserve_applies_to_the_filesystem_size(tmp_path: Path) -> None:
    """A 50% reserve on a 16 MiB filesystem refuses a 10 MiB copy that would otherwise fit."""
    with tmpfs_mount(tmp_path, size_mib=16) as fs:
        templates = tmp_path / "templates"
        write_template(templates, "big", os.urandom(10 * MIB))
        strict = RootfsRegistry(RootfsConfig(templates, fs / "clones", min_free=Reserve(percent=50)))
        with pytest.raises(InsufficientSpace) as refused:
            strict.clone_for_vm("vm-1", "big")
        assert refused.value.reserve == 8 * MIB
        lax = RootfsRegistry(RootfsConfig(templates, fs / "clones", min_free=Reserve(nbytes=0)))
        assert lax.clone_for_vm("vm-1", "big").path.stat().st_size == 10 * MIB


def test_a_reflink_needs_no_room_and_the_probe_tells_the_filesystems_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On XFS with reflink a clone is made even under a 99% reserve (it allocates no data); ext4 probes False."""
    caplog.set_level(logging.INFO, logger=space.__name__)
    assert space.probe_reflink(tmp_path) is False
    with xfs_reflink_mount(tmp_path) as xfs:
        write_template(xfs / "templates", "base", os.urandom(4 * MIB))
        registry = RootfsRegistry(RootfsConfig(xfs / "templates", xfs / "clones", min_free=Reserve(percent=99)))
        assert registry.clone_for_vm("vm-1", "base").path.stat().st_size == 4 * MIB
        assert space.reflink_known(xfs / "clones") is True
        assert (logging.INFO, f"clones filesystem at {xfs / 'clones'} clones by reflink") in space_log(caplog)
        assert not list((xfs / "clones" / ".cache").glob(".reflink-probe*")), "the probe left files behind"
        plain = RootfsRegistry(RootfsConfig(tmp_path / "t", xfs / "clones", min_free=Reserve(percent=99)))
        write_template(tmp_path / "t", "other", os.urandom(MIB))
        with pytest.raises(InsufficientSpace):  # template on another filesystem: a copy, guarded
            plain.clone_for_vm("vm-2", "other")

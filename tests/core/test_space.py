"""Disk-space guard: a copy that would eat into the reserve is refused before anything is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MIB, tmpfs_mount, tree, write_template, xfs_reflink_mount
from worker import InsufficientSpace, RootfsConfig, RootfsRegistry
from worker.core import cloning, space
from worker.core.space import Reserve


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("5%", Reserve(percent=5.0)),
        ("0.5%", Reserve(percent=0.5)),
        ("0", Reserve(nbytes=0)),
        ("10G", Reserve(nbytes=10 << 30)),
        ("4096", Reserve(nbytes=4096)),
    ],
)
def test_reserve_reads_bytes_or_a_percentage(raw: str, expected: Reserve) -> None:
    """ROOTFS_MIN_FREE takes bytes (with an optional K/M/G/T) or a percentage of the filesystem."""
    assert Reserve.parse(raw) == expected
    assert Reserve(percent=5.0).of(1000) == 50
    assert Reserve(nbytes=7).of(1000) == 7


@pytest.mark.parametrize("raw", ["", "five", "-1", "101%", "5 %%", "1.5G"])
def test_reserve_refuses_what_it_cannot_read(raw: str) -> None:
    """Anything but whole bytes or a percentage up to 100 is refused."""
    with pytest.raises(ValueError):
        Reserve.parse(raw)


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


def test_a_reflink_needs_no_room_and_the_probe_tells_the_filesystems_apart(tmp_path: Path) -> None:
    """On XFS with reflink a clone is made even under a 99% reserve (it allocates no data); ext4 probes False."""
    assert space.probe_reflink(tmp_path) is False
    with xfs_reflink_mount(tmp_path) as xfs:
        write_template(xfs / "templates", "base", os.urandom(4 * MIB))
        registry = RootfsRegistry(RootfsConfig(xfs / "templates", xfs / "clones", min_free=Reserve(percent=99)))
        assert registry.clone_for_vm("vm-1", "base").path.stat().st_size == 4 * MIB
        assert space.reflink_known(xfs / "clones") is True
        assert not list((xfs / "clones" / ".cache").glob(".reflink-probe*")), "the probe left files behind"
        plain = RootfsRegistry(RootfsConfig(tmp_path / "t", xfs / "clones", min_free=Reserve(percent=99)))
        write_template(tmp_path / "t", "other", os.urandom(MIB))
        with pytest.raises(InsufficientSpace):  # template on another filesystem: a copy, guarded
            plain.clone_for_vm("vm-2", "other")

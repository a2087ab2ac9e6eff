"""Start-up fix-up: leftovers of crashed clones and releases go; complete clones are never touched."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.core.test_reconcile import snapshot
from tests.helpers import hold_open
from worker.core import fixup, locks


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

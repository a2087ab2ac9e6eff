"""A disk in use is never deleted: release refuses a clone another process holds open, unless forced."""

from __future__ import annotations

import os

import pytest

from tests.conftest import Env
from tests.helpers import hold_open
from worker import CloneInUse
from worker.core import fsops, inuse


@pytest.mark.parametrize("how", ["rw", "ro", "mmap"])
def test_release_refuses_a_disk_held_open_and_goes_through_once_the_holder_exits(env: Env, how: str) -> None:
    """A clone held open (read-write, read-only, or only mapped) is refused with its holder's pid; once the
    holder exits, the same release deletes it."""
    env.template("base", b"B" * 8192)
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with hold_open(rootfs.path, how) as holder:
        with pytest.raises(CloneInUse) as refused:
            env.registry.release("vm-1")
        assert refused.value.vm_id == "vm-1"
        assert refused.value.pids == [holder.pid]
        assert not refused.value.transient
        assert rootfs.path.read_bytes() == b"B" * 8192, "the refused release touched the disk"
        holder.kill()
        holder.wait()
        assert env.registry.release("vm-1") is True
    assert not (env.clones_dir / "vm-1").exists()


def test_force_deletes_a_disk_in_use(env: Env) -> None:
    """With force, a disk held open is released anyway (the holder keeps its own open inode)."""
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with hold_open(rootfs.path, "rw") as holder:
        assert env.registry.release("vm-1", force=True) is True
        assert not (env.clones_dir / "vm-1").exists()
        assert holder.poll() is None


def test_proc_scan_is_the_gate_where_no_lease_can_be_taken(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without leases (not our file, leases off) the /proc scan decides: a holder is found, none means free."""
    monkeypatch.setattr(inuse, "lease_probe", lambda fd, release=True: None)
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    with hold_open(rootfs.path, "ro") as holder:
        with pytest.raises(CloneInUse) as refused:
            env.registry.release("vm-1")
        assert refused.value.pids == [holder.pid]
    assert env.registry.release("vm-1") is True


def test_a_closed_disk_is_free_and_a_lease_probe_leaves_no_lease(env: Env) -> None:
    """An idle clone reads as free, twice in a row (the probe's lease is gone), and its bytes are untouched."""
    env.template("base", b"abc")
    rootfs = env.registry.clone_for_vm("vm-1", "base")
    dir_fd = os.open(rootfs.path.parent, fsops.OPEN_DIR)
    try:
        assert inuse.usage(dir_fd, "rootfs.ext4", rootfs.path.parent) == inuse.FREE
        assert inuse.usage(dir_fd, "rootfs.ext4", rootfs.path.parent) == inuse.FREE
        assert inuse.usage(dir_fd, "missing", rootfs.path.parent) == inuse.FREE
    finally:
        os.close(dir_fd)
    with open(rootfs.path, "rb"):  # a plain open must not block on a lease left behind
        pass
    assert rootfs.path.read_bytes() == b"abc"

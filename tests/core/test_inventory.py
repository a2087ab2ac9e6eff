"""Clone inventory: one entry per VM directory, from our record or inferred, without hashing or locking."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env
from tests.core.test_registry import CountingHash
from tests.helpers import hold_open, sha256_of
from worker.core import inventory, locks


def seed_clone(env: Env, safe_id: str, data: bytes, *, stamp: str | None = None) -> Path:
    """A clone as the Rust runtime writes it: the disk and its stamp, nothing of ours."""
    vm_dir = env.clones_dir / safe_id
    vm_dir.mkdir(parents=True)
    (vm_dir / "rootfs.ext4").write_bytes(data)
    if stamp is not None:
        (vm_dir / "rootfs.ext4.sha256").write_text(stamp)
    return vm_dir


def by_dir(env: Env) -> dict[str, dict[str, Any]]:
    return {c.dir: c.to_dict() for c in env.registry.clones()}


def test_inventory_reports_our_clone_from_its_record(env: Env) -> None:
    """Our clone lists with the caller's vm id, its stack, stamp, sizes, creation and disk times."""
    env.template("base", b"B" * 10000)
    before = time.time()
    rootfs = env.registry.clone_for_vm("vm/1", "base")
    record = json.loads((rootfs.path.parent / ".clone.json").read_text())
    assert record["vm_id"] == "vm/1" and record["stack"] == "base"
    assert (rootfs.path.parent / ".vm-id").read_text() == "vm/1"  # kept as before, for older workers
    [entry] = env.registry.clones()
    st = rootfs.path.stat()
    assert entry.to_dict() == {
        "vm_id": "vm/1",
        "dir": "vm_1",
        "stack": "base",
        "source_sha256": rootfs.source_sha256,
        "stale": False,
        "size_bytes": 10000,
        "allocated_bytes": st.st_blocks * 512,
        "created": record["created"],
        "modified": st.st_mtime,
        "in_use": False,
        "pids": [],
        "state": "complete",
    }
    assert before <= record["created"] <= time.time()


def test_inventory_infers_a_seed_clones_stack_and_knows_when_it_cannot(env: Env) -> None:
    """A clone the seed made is `foreign`; its stack comes from its stamp while that hash is warm."""
    env.template("base", b"BASE")
    info = env.registry.stack("base")  # warms the cache
    assert info is not None
    vm_dir = seed_clone(env, "seed-vm", b"BASE", stamp=info.sha256)
    entry = by_dir(env)["seed-vm"]
    assert (entry["state"], entry["vm_id"], entry["stack"], entry["stale"]) == ("foreign", "seed-vm", "base", False)
    assert entry["created"] == pytest.approx((vm_dir / "rootfs.ext4.sha256").stat().st_mtime)
    env.template("cold", b"never hashed")  # one cold stack: an unknown stamp may be its
    other = seed_clone(env, "seed-other", b"?", stamp="0" * 64)
    entry = by_dir(env)["seed-other"]
    assert (entry["state"], entry["stack"], entry["stale"]) == ("foreign", None, None)
    assert sorted(p.name for p in other.iterdir()) == ["rootfs.ext4", "rootfs.ext4.sha256"], "listing wrote"


def test_inventory_marks_stale_and_incomplete_clones(env: Env) -> None:
    """A clone of a rotated or removed stack is stale; leftovers of an interrupted clone are incomplete."""
    path = env.template("base", b"one")
    env.template("gone", b"two")
    env.registry.clone_for_vm("vm-a", "base")
    env.registry.clone_for_vm("vm-b", "gone")
    env.forget(path)
    path.write_bytes(b"rotated")
    env.registry.stacks()  # the new hash is warm
    (env.template_dir / "gone" / "rootfs.ext4").unlink()
    env.expected.clear()
    partial = env.clones_dir / "vm-c"
    partial.mkdir()
    (partial / "rootfs.ext4.partial").write_bytes(b"x" * 5000)
    (partial / ".vm-id").write_text("vm-c")
    found = by_dir(env)
    assert (found["vm-a"]["stale"], found["vm-b"]["stale"]) == (True, True)
    c = found["vm-c"]
    assert (c["state"], c["vm_id"], c["stale"], c["size_bytes"]) == ("incomplete", "vm-c", None, 5000)


def test_inventory_shows_who_holds_a_disk(env: Env) -> None:
    """A disk held by a process lists as in use with that pid; the others do not."""
    env.template("base", b"abc")
    held = env.registry.clone_for_vm("vm-held", "base")
    env.registry.clone_for_vm("vm-idle", "base")
    with hold_open(held.path, "mmap") as holder:
        found = by_dir(env)
        assert (found["vm-held"]["in_use"], found["vm-held"]["pids"]) == (True, [holder.pid])
        assert (found["vm-idle"]["in_use"], found["vm-idle"]["pids"]) == (False, [])
    assert by_dir(env)["vm-held"]["in_use"] is False


def test_inventory_hashes_nothing_takes_no_lock_and_skips_what_is_not_a_clone(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing never reads a template, answers while a VM's lock is held, and lists only VM directories."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    env.registry.release(env.registry.clone_for_vm("vm-2", "base").vm_id)  # leaves .trash and .locks behind
    for stray in ("lost+found", "notes.d"):
        (env.clones_dir / stray).mkdir()
    (env.clones_dir / "a-file").write_text("x")
    os.symlink(env.clones_dir / "vm-1", env.clones_dir / "vm-link")
    env.template("cold", b"new template")
    counter = CountingHash(monkeypatch)
    with locks.exclusive(env.clones_dir / ".locks" / "vm-1.lock"):
        found = env.registry.clones()
    assert [c.dir for c in found] == ["vm-1"]
    assert counter.calls == 0
    assert sha256_of(env.template_dir / "cold" / "rootfs.ext4")  # still there, never hashed by the listing


def test_host_summary_reads_the_cache_only(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat's summary: free/total bytes, clone count, each stack's hash where warm, None where cold."""
    env.template("warm", b"w")
    env.template("cold", b"c")
    env.registry.clone_for_vm("vm-1", "warm")
    counter = CountingHash(monkeypatch)
    summary = env.registry.host_summary()
    assert counter.calls == 0
    assert summary["clones"] == 1
    assert summary["stacks"] == {"cold": None, "warm": sha256_of(env.template_dir / "warm" / "rootfs.ext4")}
    assert 0 < summary["free_bytes"] <= summary["total_bytes"]
    assert summary["reflink"] in (True, False, None)


def test_clone_totals_count_vm_directories_and_their_disks_blocks(env: Env) -> None:
    """Totals for metrics: VM directories only (not lost+found, not ours), blocks of each disk or partial disk."""
    env.template("base", b"B" * 10000)
    disk = env.registry.clone_for_vm("vm-1", "base").path
    partial = env.clones_dir / "vm-2"
    partial.mkdir()
    (partial / "rootfs.ext4.partial").write_bytes(b"x" * 5000)
    (env.clones_dir / "lost+found").mkdir()
    expected = disk.stat().st_blocks * 512 + (partial / "rootfs.ext4.partial").stat().st_blocks * 512
    assert inventory.clone_totals(env.clones_dir) == (2, expected)
    assert inventory.clone_totals(env.clones_dir / "missing") == (0, 0)

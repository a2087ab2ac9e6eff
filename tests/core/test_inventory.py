"""Clone inventory: one entry per VM directory, from our record or inferred, without hashing or locking."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env
from tests.core.test_registry import CountingHash
from tests.helpers import hold_open, sha256_of
from worker.core import inuse, inventory, locks, space
from worker.errors import FilesystemError


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


def test_a_clone_left_by_an_older_worker_lists_with_the_vm_id_it_wrote(env: Env) -> None:
    """Without a record, the owner file an older worker wrote gives the vm id (even one with a lone
    surrogate) and the clone counts as ours; the directory name is the vm id only when nothing says more."""
    env.template("base", b"abc")
    for vm_id in ("vm/1", "vm-\udc80"):
        (env.registry.clone_for_vm(vm_id, "base").path.parent / ".clone.json").unlink()
    seed_clone(env, "seed", b"abc", stamp=env.registry.cached_stacks()["base"])
    found = by_dir(env)
    assert {d: (e["vm_id"], e["state"], e["stack"]) for d, e in found.items()} == {
        "vm_1": ("vm/1", "complete", "base"),
        "vm-_": ("vm-\udc80", "complete", "base"),
        "seed": ("seed", "foreign", "base"),
    }


def test_a_stamp_without_a_disk_is_incomplete_and_has_no_size(env: Env) -> None:
    """A stamp alone (the disk gone) is an incomplete clone of no stack, no size, no disk time."""
    env.template("base", b"abc")
    digest = env.registry.stack("base")
    assert digest is not None
    vm_dir = env.clones_dir / "vm-1"
    vm_dir.mkdir(parents=True)
    (vm_dir / "rootfs.ext4.sha256").write_text(digest.sha256)
    entry = by_dir(env)["vm-1"]
    assert {k: entry[k] for k in ("state", "stack", "stale", "size_bytes", "allocated_bytes", "modified")} == {
        "state": "incomplete",
        "stack": None,
        "stale": None,
        "size_bytes": 0,
        "allocated_bytes": 0,
        "modified": None,
    }
    assert entry["source_sha256"] == digest.sha256


def test_creation_time_comes_from_the_record_else_the_stamp_else_the_directory(env: Env) -> None:
    """`created` is the record's number when it has one, else the stamp's mtime when there is a stamp, else
    the VM directory's mtime: a record's missing, boolean or text "created" counts as none."""
    env.template("base", b"abc")
    digest = "0" * 64
    records: dict[str, object] = {"good": 123.5, "no-created": None, "bool-created": True, "text-created": "5"}
    for name, created in records.items():
        vm_dir = seed_clone(env, name, b"abc", stamp=digest)
        record: dict[str, object] = {"vm_id": name, "stack": "base"}
        if created is not None:
            record["created"] = created
        (vm_dir / ".clone.json").write_text(json.dumps(record))
    seed_clone(env, "seed", b"abc", stamp=digest)
    seed_clone(env, "empty-stamp", b"abc", stamp="")
    (env.clones_dir / "partial").mkdir()
    (env.clones_dir / "partial" / "rootfs.ext4.partial").write_bytes(b"x")
    for vm_dir in env.clones_dir.iterdir():
        stamp = vm_dir / "rootfs.ext4.sha256"
        if stamp.exists():
            os.utime(stamp, (1000.0, 1000.0))
        os.utime(vm_dir, (2000.0, 2000.0))
    created = {d: e["created"] for d, e in by_dir(env).items()}
    assert created == {
        "good": 123.5,
        "no-created": 1000.0,
        "bool-created": 1000.0,
        "text-created": 1000.0,
        "seed": 1000.0,
        "empty-stamp": 2000.0,
        "partial": 2000.0,
    }


def test_staleness_is_known_only_from_warm_hashes(env: Env) -> None:
    """A clone of no warm stack is stale once every stack is warm; a clone of a stack whose hash has gone
    cold keeps its stack, with staleness unknown until the stack is hashed again."""
    template = env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    seed_clone(env, "seed", b"?", stamp="0" * 64)
    found = by_dir(env)
    assert (found["vm-1"]["stack"], found["vm-1"]["stale"]) == ("base", False)
    assert (found["seed"]["stack"], found["seed"]["stale"]) == (None, True)
    os.utime(template, (1000.0, 1000.0))  # same bytes, new mtime: the cached hash no longer applies
    assert env.registry.cached_stacks() == {"base": None}
    found = by_dir(env)
    assert (found["vm-1"]["stack"], found["vm-1"]["stale"]) == ("base", None)
    assert (found["seed"]["stack"], found["seed"]["stale"]) == (None, None)


def test_the_record_names_the_stack_and_an_alias_is_inferred_by_name(env: Env) -> None:
    """Of two stacks with the same bytes, our clone lists the one it was made from (its record); a seed clone
    of those bytes lists the first of them by name."""
    env.template("a", b"same")
    env.template("b", b"same")
    env.registry.clone_for_vm("vm-b", "b")
    info = env.registry.stack("a")
    assert info is not None
    seed_clone(env, "seed", b"same", stamp=info.sha256)
    found = by_dir(env)
    assert (found["vm-b"]["stack"], found["vm-b"]["stale"]) == ("b", False)
    assert (found["seed"]["stack"], found["seed"]["stale"]) == ("a", False)


def test_the_listing_never_follows_a_symlink(env: Env) -> None:
    """A disk or a stamp that is a symlink makes the clone incomplete (its target is not reported), and a
    symlink to a VM directory is not counted as a VM."""
    env.template("base", b"abc")
    real = env.registry.clone_for_vm("vm-1", "base")
    link_disk = seed_clone(env, "link-disk", b"", stamp=real.source_sha256)
    (link_disk / "rootfs.ext4").rename(link_disk / "real.img")
    (link_disk / "real.img").write_bytes(b"abc")
    os.symlink("real.img", link_disk / "rootfs.ext4")
    link_stamp = seed_clone(env, "link-stamp", b"abc")
    (link_stamp / "stamp.txt").write_text(real.source_sha256)
    os.symlink("stamp.txt", link_stamp / "rootfs.ext4.sha256")
    os.symlink(env.clones_dir / "vm-1", env.clones_dir / "vm-link")
    found = by_dir(env)
    assert {d: (e["state"], e["size_bytes"], e["source_sha256"]) for d, e in found.items()} == {
        "vm-1": ("complete", 3, real.source_sha256),
        "link-disk": ("incomplete", 0, real.source_sha256),
        "link-stamp": ("incomplete", 3, None),
    }
    assert inventory.count_clones(env.clones_dir) == 3
    assert inventory.clone_totals(env.clones_dir)[0] == 3
    assert env.registry.host_summary()["clones"] == 3


def test_a_record_over_4_kib_is_damaged_and_ignored(env: Env) -> None:
    """Small files are read up to 4 KiB: a record padded past that is not read whole and counts as none."""
    env.template("base", b"abc")
    for name, size in (("fits", 4096), ("too-big", 4097)):
        vm_dir = seed_clone(env, name, b"abc", stamp="0" * 64)
        body = json.dumps({"vm_id": f"vm/{name}", "stack": "base", "created": 5.0})
        (vm_dir / ".clone.json").write_text(body[:-1] + " " * (size - len(body)) + "}")
        assert (vm_dir / ".clone.json").stat().st_size == size
    found = by_dir(env)
    assert (found["fits"]["vm_id"], found["fits"]["state"]) == ("vm/fits", "complete")
    assert (found["too-big"]["vm_id"], found["too-big"]["state"]) == ("too-big", "foreign")


def test_list_clones_names_holders_by_default_and_skips_what_it_is_told(env: Env) -> None:
    """By default a held disk (or the partial disk of a clone being built) lists with its holder's pid;
    pids=False keeps in_use but names nobody; in_use=False probes nothing and reports every disk idle."""
    env.template("base", b"abc")
    held = env.registry.clone_for_vm("vm-held", "base")
    env.registry.clone_for_vm("vm-idle", "base")
    (env.clones_dir / "vm-building").mkdir()
    partial = env.clones_dir / "vm-building" / "rootfs.ext4.partial"
    partial.write_bytes(b"ab")
    stacks = env.registry.cached_stacks()

    def use(**kwargs: bool) -> dict[str, tuple[bool, tuple[int, ...]]]:
        return {c.dir: (c.in_use, c.pids) for c in inventory.list_clones(env.clones_dir, stacks, **kwargs)}

    with hold_open(held.path, "rw") as holder, hold_open(partial, "ro") as builder:
        assert use() == {
            "vm-held": (True, (holder.pid,)),
            "vm-idle": (False, ()),
            "vm-building": (True, (builder.pid,)),
        }
        assert use(pids=False) == {"vm-held": (True, ()), "vm-idle": (False, ()), "vm-building": (True, ())}
        assert use(in_use=False) == {"vm-held": (False, ()), "vm-idle": (False, ()), "vm-building": (False, ())}


def test_without_leases_the_proc_scan_decides_even_without_pids(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no lease can be taken, the /proc scan finds the holder: in use with its pid, or in use naming
    nobody when pids=False; a disk nobody holds is idle."""
    env.template("base", b"abc")
    held = env.registry.clone_for_vm("vm-held", "base")
    env.registry.clone_for_vm("vm-idle", "base")
    stacks = env.registry.cached_stacks()
    monkeypatch.setattr(inuse, "lease_probe", lambda fd, release=True: None)

    def use(**kwargs: bool) -> dict[str, tuple[bool, tuple[int, ...]]]:
        return {c.dir: (c.in_use, c.pids) for c in inventory.list_clones(env.clones_dir, stacks, **kwargs)}

    with hold_open(held.path, "ro") as holder:
        assert use() == {"vm-held": (True, (holder.pid,)), "vm-idle": (False, ())}
        assert use(pids=False) == {"vm-held": (True, ()), "vm-idle": (False, ())}


def test_a_disk_held_where_no_process_shows_it_lists_in_use_with_no_pids(env: Env) -> None:
    """A disk whose other open file is in flight over a socket is in use, with no pid to name."""
    env.template("base", b"abc")
    disk = env.registry.clone_for_vm("vm-1", "base").path
    sender, receiver = socket.socketpair(socket.AF_UNIX)
    with sender, receiver:
        fd = os.open(disk, os.O_RDONLY)
        socket.send_fds(sender, [b"x"], [fd])
        os.close(fd)
        [entry] = env.registry.clones()
        assert (entry.in_use, entry.pids) == (True, ())
    [entry] = env.registry.clones()
    assert (entry.in_use, entry.pids) == (False, ())


def test_a_disk_that_cannot_be_stat_ed_lists_incomplete_and_idle(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk whose fstat fails (EIO) lists as an incomplete clone with no size, not in use (release's own
    check under the lock decides); the listing itself does not fail."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")
    stacks = env.registry.cached_stacks()

    def failing_fstat(fd: int) -> os.stat_result:
        raise OSError(errno.EIO, "injected")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fstat", failing_fstat)
        [entry] = inventory.list_clones(env.clones_dir, stacks)
    assert (entry.state, entry.size_bytes, entry.in_use, entry.pids) == ("incomplete", 0, False, ())
    [entry] = inventory.list_clones(env.clones_dir, stacks)
    assert (entry.state, entry.size_bytes, entry.in_use) == ("complete", 3, False)


def test_host_summary_without_a_filesystem_answer_says_unknown(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the clones filesystem cannot be stat'ed, free and total bytes are None and the rest is reported."""
    env.template("base", b"abc")
    env.registry.clone_for_vm("vm-1", "base")

    def failing_fs_usage(path: Path) -> space.FsUsage:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(space, "fs_usage", failing_fs_usage)
    summary = env.registry.host_summary()
    assert (summary["free_bytes"], summary["total_bytes"], summary["clones"]) == (None, None, 1)
    assert list(summary["stacks"]) == ["base"]


def test_a_clones_dir_that_cannot_be_read_is_an_error_naming_it(tmp_path: Path) -> None:
    """A clones dir that exists but cannot be listed (a symlink loop) fails with the operation and the path,
    unlike a missing one, which simply holds no clones."""
    loop = tmp_path / "clones"
    os.symlink(loop, loop)
    with pytest.raises(FilesystemError) as failed:
        inventory.count_clones(loop)
    assert (failed.value.op, failed.value.path, failed.value.errno) == ("read clones dir", str(loop), errno.ELOOP)
    assert inventory.count_clones(tmp_path / "missing") == 0


def test_record_fields_of_the_wrong_type_count_as_missing(env: Env) -> None:
    """A record whose vm id or stack is not a non-empty string: the vm id falls back to the directory name
    and the stack is inferred from the stamp; the record still marks the clone as ours."""
    env.template("base", b"abc")
    info = env.registry.stack("base")
    assert info is not None
    for name, record in (("odd", {"vm_id": 7, "stack": ["base"]}), ("blank", {"vm_id": "", "stack": ""})):
        vm_dir = seed_clone(env, name, b"abc", stamp=info.sha256)
        (vm_dir / ".clone.json").write_text(json.dumps(record))
    seed_clone(env, "seed", b"abc", stamp=info.sha256)
    found = by_dir(env)
    assert {d: (e["vm_id"], e["stack"], e["state"]) for d, e in found.items()} == {
        "odd": ("odd", "base", "complete"),
        "blank": ("blank", "base", "complete"),
        "seed": ("seed", "base", "foreign"),
    }


def test_without_pids_the_listing_never_scans_proc_where_leases_answer(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pids=False (reconcile, over thousands of clones) answers from the leases alone: no /proc scan, even
    with a disk held; pids=True scans once for the held disks only."""
    env.template("base", b"abc")
    held = env.registry.clone_for_vm("vm-held", "base")
    env.registry.clone_for_vm("vm-idle", "base")
    scans: list[set[inuse.FileId]] = []
    real_find_holders = inuse.find_holders

    def spy(targets: set[inuse.FileId]) -> dict[inuse.FileId, set[int]]:
        if targets:
            scans.append(set(targets))
        return real_find_holders(targets)

    monkeypatch.setattr(inuse, "find_holders", spy)
    with hold_open(held.path, "rw") as holder:
        assert {c.dir: c.in_use for c in env.registry.clones(pids=False)} == {"vm-held": True, "vm-idle": False}
        assert scans == []
        assert {c.dir: c.pids for c in env.registry.clones()} == {"vm-held": (holder.pid,), "vm-idle": ()}
    st = held.path.stat()
    assert scans == [{(st.st_dev, st.st_ino)}]

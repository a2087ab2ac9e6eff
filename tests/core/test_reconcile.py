"""Reconcile: release leaked clones, never a kept, young, in-use or busy one; a dry run changes nothing."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env
from tests.helpers import hold_open
from worker import InvalidArgument
from worker.core import inuse, locks
from worker.core.inventory import CloneInfo
from worker.core.reconcile import MAX_KEEP, reconcile


def age(vm_dir: Path, seconds: float) -> None:
    """Make a clone look `seconds` old: its record's creation time (or the seed's stamp), its directory's mtime."""
    then = time.time() - seconds
    record = vm_dir / ".clone.json"
    if record.exists():
        data = json.loads(record.read_text())
        data["created"] = then
        record.write_text(json.dumps(data))
    if (vm_dir / "rootfs.ext4.sha256").exists():
        os.utime(vm_dir / "rootfs.ext4.sha256", (then, then))
    os.utime(vm_dir, (then, then))


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below root with its inode, mtime (ns) and size: identical means nothing was touched."""
    found = {}
    for d, ds, fs in os.walk(root):
        for name in ds + fs:
            st = os.lstat(os.path.join(d, name))
            found[os.path.relpath(os.path.join(d, name), root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What reconcile itself logged, in order."""
    return [r.getMessage() for r in caplog.records if r.name == "worker.core.reconcile"]


@pytest.fixture
def fleet(env: Env) -> Env:
    """Clones: kept, leaked (old), young, seed-made (old, leaked), and a foreign in-progress leftover."""
    env.template("base", b"B" * 4096)
    for vm in ("vm-keep", "vm-leak", "vm-young", "vm:held"):
        env.registry.clone_for_vm(vm, "base")
    seed = env.clones_dir / "seed-leak"
    seed.mkdir()
    (seed / "rootfs.ext4").write_bytes(b"B" * 4096)
    (seed / "rootfs.ext4.sha256").write_text(env.registry.stack("base").sha256)  # type: ignore[union-attr]
    for vm in ("vm-keep", "vm-leak", "vm_held", "seed-leak"):
        age(env.clones_dir / vm, 3600)
    return env


def test_reconcile_releases_exactly_the_leaked_clones(fleet: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Not kept, old enough and idle: released; kept, young and in-use clones stay; each release and the
    totals are logged, and the report's dict form says the same."""
    env = fleet
    caplog.set_level(logging.INFO, logger="worker.core.reconcile")
    with hold_open(env.clones_dir / "vm_held" / "rootfs.ext4", "ro"):
        report = env.registry.reconcile(["vm-keep", "not-on-this-host"], older_than=600, dry_run=False)
    assert messages(caplog) == [
        "reconcile released seed-leak (seed-leak)",
        "reconcile released vm-leak (vm-leak)",
        "reconcile: released 2, kept 1, in use 1, too young 1, failed 0",
    ]
    assert json.loads(json.dumps(report.to_dict())) == {
        "released": ["seed-leak", "vm-leak"],
        "kept": ["vm-keep"],
        "in_use": ["vm:held"],
        "too_young": ["vm-young"],
        "failed": {},
        "dry_run": False,
    }
    assert sorted(report.released) == ["seed-leak", "vm-leak"]
    assert report.kept == ["vm-keep"]
    assert report.too_young == ["vm-young"]
    assert report.in_use == ["vm:held"]
    assert report.failed == {}
    assert sorted(p.name for p in env.clones_dir.iterdir() if not p.name.startswith(".")) == [
        "vm-keep",
        "vm-young",
        "vm_held",
    ]


def test_dry_run_touches_nothing_and_predicts_the_real_run(fleet: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A dry run (the default) leaves every inode and mtime as it was, says so in its log line and report,
    and names what the real run then releases."""
    env = fleet
    caplog.set_level(logging.INFO, logger="worker.core.reconcile")
    before = snapshot(env.clones_dir)
    dry = env.registry.reconcile(["vm-keep"], older_than=600)
    assert snapshot(env.clones_dir) == before
    assert dry.dry_run and sorted(dry.released) == ["seed-leak", "vm-leak", "vm:held"]
    assert dry.to_dict()["dry_run"] is True
    assert messages(caplog) == ["reconcile (dry run): released 3, kept 1, in use 0, too young 1, failed 0"]
    assert reconcile(env.registry, ["vm-keep"], older_than=600).dry_run  # the core function's default too
    assert snapshot(env.clones_dir) == before
    real = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False)
    assert sorted(real.released) == sorted(dry.released)


def test_one_failure_does_not_stop_the_sweep(fleet: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A clone that cannot be released is reported and logged with its error, and the others are still
    released."""
    env = fleet
    caplog.set_level(logging.WARNING, logger="worker.core.reconcile")
    broken = env.clones_dir / "a-broken"
    broken.mkdir()
    (broken / ".clone.json").write_text(json.dumps({"vm_id": "a-broken", "stack": "base", "created": 0}))
    (broken / ".vm-id").write_text("a:broken")  # its owner record disagrees: release refuses it
    age(broken, 3600)
    report = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False)
    error = "VmIdConflict: vm id 'a-broken' maps to clone directory 'a-broken', which belongs to vm id 'a:broken'"
    assert report.failed == {"a-broken": error}
    assert report.to_dict()["failed"] == {"a-broken": error}
    assert messages(caplog) == [f"reconcile could not release a-broken: {error}"]
    assert sorted(report.released) == ["seed-leak", "vm-leak", "vm:held"]
    assert broken.exists()


def test_a_clone_being_worked_on_or_remade_since_the_listing_is_spared(fleet: Env) -> None:
    """A VM whose lock is held counts as in use; one that is young again under its lock is too young."""
    env = fleet
    with locks.exclusive(env.clones_dir / ".locks" / "vm-leak.lock"):
        # `now` an hour ahead: the listing thinks vm-young is old, the re-check under the lock knows better.
        report = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False, now=time.time() + 3600)
    assert "vm-leak" in report.in_use
    assert "vm-young" in report.too_young
    assert (env.clones_dir / "vm-leak").exists() and (env.clones_dir / "vm-young").exists()


LONG = "vm-" * 40  # its repr is longer than the 80 characters an error quotes


@pytest.mark.parametrize(
    ("args", "field", "value", "reason"),
    [
        ({"keep": LONG}, "keep", repr(LONG)[:80], "must be a list of vm ids, not str"),
        ({"keep": {"vm-1": 1}}, "keep", "{'vm-1': 1}", "must be a list of vm ids, not dict"),
        ({"keep": ["vm-1", 7]}, "keep[1]", "7", "must be a string, not int"),
        ({"keep": ["vm-1", ""]}, "keep[1]", "''", "sanitises to an empty string"),
        ({"keep": ["x"] * (MAX_KEEP + 1)}, "keep", f"<{MAX_KEEP + 1} ids>", "at most 100000 vm ids"),
        ({"older_than": -1}, "older_than", "-1", "must be a finite number of seconds, >= 0"),
        ({"older_than": -(10**100)}, "older_than", repr(-(10**100))[:80], "must be a finite number of seconds, >= 0"),
        ({"older_than": float("nan")}, "older_than", "nan", "must be a finite number of seconds, >= 0"),
        ({"older_than": "600"}, "older_than", "'600'", "must be a number of seconds"),
        ({"older_than": LONG}, "older_than", repr(LONG)[:80], "must be a number of seconds"),
        ({"older_than": True}, "older_than", "True", "must be a number of seconds"),
        ({"dry_run": 0}, "dry_run", "0", "must be true or false"),
        ({"dry_run": LONG}, "dry_run", repr(LONG)[:80], "must be true or false"),
    ],
    ids=[
        "keep-str",
        "keep-dict",
        "keep-int-id",
        "keep-empty-id",
        "keep-too-many",
        "older-negative",
        "older-huge-negative",
        "older-nan",
        "older-str",
        "older-long-str",
        "older-bool",
        "dry-run-int",
        "dry-run-long-str",
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_touched(
    fleet: Env, args: dict[str, object], field: str, value: str, reason: str
) -> None:
    """A keep list that is not at most 100,000 vm ids, a bad age or a dry_run that is not a bool is a
    permanent InvalidArgument naming the argument, quoting (at most 80 characters of) it and saying why."""
    before = snapshot(fleet.clones_dir)
    call: dict[str, object] = {"keep": ["vm-1"], "older_than": 600, "dry_run": False, **args}
    with pytest.raises(InvalidArgument) as refused:
        fleet.registry.reconcile(call.pop("keep"), **call)  # type: ignore[arg-type]
    assert (refused.value.field, refused.value.value, refused.value.reason) == (field, value, reason)
    assert not refused.value.transient
    assert snapshot(fleet.clones_dir) == before


def test_a_full_keep_list_is_accepted(fleet: Env) -> None:
    """Exactly 100,000 ids is allowed."""
    keep = [f"vm-{i}" for i in range(MAX_KEEP - 1)] + ["vm-keep"]
    assert fleet.registry.reconcile(keep).kept == ["vm-keep"]


def test_an_unexpected_os_error_is_reported_and_the_sweep_goes_on(
    fleet: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An OSError escaping a release (a bug's way out) fails that clone only, reported and logged with it."""
    env = fleet
    caplog.set_level(logging.WARNING, logger="worker.core.reconcile")
    real = env.registry.release

    def release(vm_id: str, **kwargs: Any) -> bool:
        if vm_id == "vm-leak":
            raise OSError(errno.EIO, "Input/output error")
        return real(vm_id, **kwargs)

    monkeypatch.setattr(env.registry, "release", release)
    report = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False)
    assert report.failed == {"vm-leak": "OSError: [Errno 5] Input/output error"}
    assert messages(caplog) == ["reconcile could not release vm-leak: [Errno 5] Input/output error"]
    assert sorted(report.released) == ["seed-leak", "vm:held"]
    assert (env.clones_dir / "vm-leak").exists() and not (env.clones_dir / "seed-leak").exists()


def test_a_clone_the_inventory_cannot_date_is_never_released_by_age(
    fleet: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clone listed without a creation time counts as new, whatever the age limit above zero."""
    env = fleet
    real = env.registry.clones

    def clones(**kwargs: Any) -> list[CloneInfo]:
        found = real(**kwargs)
        for clone in found:
            if clone.vm_id == "vm-leak":
                clone.created = None
        return found

    monkeypatch.setattr(env.registry, "clones", clones)
    for older_than in (600, 1):
        report = env.registry.reconcile(["vm-keep"], older_than=older_than, dry_run=False)
        assert "vm-leak" in report.too_young and "vm-leak" not in report.released
    assert (env.clones_dir / "vm-leak").exists()
    monkeypatch.undo()  # the real listing dates it: then it goes
    assert "vm-leak" in env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False).released


def test_a_record_younger_than_its_directory_spares_the_clone(env: Env) -> None:
    """Under the VM's lock the record's creation time counts, not only the directory's mtime: a clone whose
    record was just written is young even in an old directory; the same clone with an old record goes."""
    env.template("base", b"B" * 4096)
    env.registry.clone_for_vm("vm-1", "base")
    vm_dir = env.clones_dir / "vm-1"
    then = time.time() - 3600
    os.utime(vm_dir / "rootfs.ext4.sha256", (then, then))
    os.utime(vm_dir, (then, then))  # the directory looks an hour old, the record says "just made"
    later = time.time() + 3600  # the listing, an hour on, finds the record old enough too
    report = env.registry.reconcile([], older_than=600, dry_run=False, now=later)
    assert report.too_young == ["vm-1"] and report.released == []
    assert vm_dir.exists()
    age(vm_dir, 3600)
    report = env.registry.reconcile([], older_than=600, dry_run=False)
    assert report.released == ["vm-1"] and not vm_dir.exists()


def test_an_unreadable_record_does_not_keep_an_old_clone(env: Env) -> None:
    """A record that cannot be read (a directory in its place) is only a missing hint: the old clone goes."""
    env.template("base", b"B" * 4096)
    env.registry.clone_for_vm("vm-1", "base")
    vm_dir = env.clones_dir / "vm-1"
    (vm_dir / ".clone.json").unlink()
    (vm_dir / ".clone.json").mkdir()
    then = time.time() - 3600
    for path in (vm_dir / "rootfs.ext4.sha256", vm_dir):
        os.utime(path, (then, then))
    report = env.registry.reconcile([], older_than=600, dry_run=False)
    assert report.released == ["vm-1"] and report.failed == {}
    assert not vm_dir.exists()


def test_a_clone_exactly_older_than_the_limit_is_released(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The age limit is inclusive: a clone exactly `older_than` seconds old is released, listing and re-check
    alike; a second less and it stays."""
    env.template("base", b"B" * 4096)
    clock = float(int(time.time()))
    monkeypatch.setattr(time, "time", lambda: clock)
    for vm, seconds in (("vm-old", 600.0), ("vm-new", 599.0)):
        env.registry.clone_for_vm(vm, "base")
        age(env.clones_dir / vm, 7200)  # the directory and stamp older still: the record decides
        record = env.clones_dir / vm / ".clone.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "created": clock - seconds}))
    report = env.registry.reconcile([], older_than=600, dry_run=False, now=clock)
    assert report.released == ["vm-old"]
    assert report.too_young == ["vm-new"]


@pytest.mark.parametrize("older_than", [0, 0.5])
def test_an_age_limit_under_a_second_is_accepted(fleet: Env, older_than: float) -> None:
    """older_than may be 0 (no age limit: even a clone made a moment ago goes) or a fraction of a second."""
    env = fleet
    report = env.registry.reconcile(["vm-keep"], older_than=older_than, dry_run=True)
    assert "vm-leak" in report.released and "vm-keep" in report.kept
    if older_than == 0:
        assert "vm-young" in report.released and report.too_young == []


def test_ages_are_measured_from_now(fleet: Env) -> None:
    """`now` is the listing's clock: seen from two hours ago, the hour-old clones are too young."""
    env = fleet
    report = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=True, now=time.time() - 7200)
    assert report.released == []
    assert sorted(report.too_young) == ["seed-leak", "vm-leak", "vm-young", "vm:held"]


def test_a_running_vm_is_told_by_its_lease_without_a_proc_scan(fleet: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconcile never scans every process's open files when the disks' leases answer; a listing that asks
    for holders' pids does."""
    env = fleet
    scans: list[object] = []
    real = inuse.find_holders

    def find_holders(targets: Any, **kwargs: Any) -> Any:
        scans.append(targets)
        return real(targets, **kwargs)

    monkeypatch.setattr(inuse, "find_holders", find_holders)
    with hold_open(env.clones_dir / "vm_held" / "rootfs.ext4", "ro") as holder:
        report = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False)
        assert report.in_use == ["vm:held"] and scans == []
        held = [c for c in env.registry.clones() if c.in_use]
        assert [(c.vm_id, c.pids) for c in held] == [("vm:held", (holder.pid,))] and len(scans) == 1

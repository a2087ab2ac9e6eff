"""Reconcile: release leaked clones, never a kept, young, in-use or busy one; a dry run changes nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.helpers import hold_open
from worker import InvalidArgument
from worker.core import locks
from worker.core.reconcile import MAX_KEEP


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


def test_reconcile_releases_exactly_the_leaked_clones(fleet: Env) -> None:
    """Not kept, old enough and idle: released; kept, young and in-use clones stay."""
    env = fleet
    with hold_open(env.clones_dir / "vm_held" / "rootfs.ext4", "ro"):
        report = env.registry.reconcile(["vm-keep", "not-on-this-host"], older_than=600, dry_run=False)
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


def test_dry_run_touches_nothing_and_predicts_the_real_run(fleet: Env) -> None:
    """A dry run leaves every inode and mtime as it was, and names what the real run then releases."""
    env = fleet
    before = snapshot(env.clones_dir)
    dry = env.registry.reconcile(["vm-keep"], older_than=600)
    assert snapshot(env.clones_dir) == before
    assert dry.dry_run and sorted(dry.released) == ["seed-leak", "vm-leak", "vm:held"]
    real = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False)
    assert sorted(real.released) == sorted(dry.released)


def test_one_failure_does_not_stop_the_sweep(fleet: Env) -> None:
    """A clone that cannot be released is reported with its error, and the others are still released."""
    env = fleet
    broken = env.clones_dir / "a-broken"
    broken.mkdir()
    (broken / ".clone.json").write_text(json.dumps({"vm_id": "a-broken", "stack": "base", "created": 0}))
    (broken / ".vm-id").write_text("a:broken")  # its owner record disagrees: release refuses it
    age(broken, 3600)
    report = env.registry.reconcile(["vm-keep"], older_than=600, dry_run=False)
    assert list(report.failed) == ["a-broken"]
    assert "VmIdConflict" in report.failed["a-broken"]
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


@pytest.mark.parametrize(
    ("keep", "older_than", "field"),
    [
        ("vm-1", 600, "keep"),
        ({"vm-1": 1}, 600, "keep"),
        (["vm-1", 7], 600, "keep[1]"),
        (["vm-1", ""], 600, "keep[1]"),
        (["x"] * (MAX_KEEP + 1), 600, "keep"),
        (["vm-1"], -1, "older_than"),
        (["vm-1"], float("nan"), "older_than"),
        (["vm-1"], "600", "older_than"),
        (["vm-1"], True, "older_than"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_touched(
    fleet: Env, keep: object, older_than: object, field: str
) -> None:
    """A keep list that is not at most 100,000 vm ids, or a bad age, is a permanent InvalidArgument."""
    before = snapshot(fleet.clones_dir)
    with pytest.raises(InvalidArgument) as refused:
        fleet.registry.reconcile(keep, older_than=older_than, dry_run=False)  # type: ignore[arg-type]
    assert refused.value.field == field
    assert not refused.value.transient
    assert snapshot(fleet.clones_dir) == before


def test_a_full_keep_list_is_accepted(fleet: Env) -> None:
    """Exactly 100,000 ids is allowed."""
    keep = [f"vm-{i}" for i in range(MAX_KEEP - 1)] + ["vm-keep"]
    assert fleet.registry.reconcile(keep).kept == ["vm-keep"]

"""7. Fleet lifecycle: listing 10,000 clones, reconciling 10,000 keeping 9,000, and what the in-use check
costs a release.

All in-process on the registry (no queue: the queue's own cost is section 5's), on the bench's work dir.
The 10,000 clones are written directly in the on-disk layout (a sparse 1 GiB disk without data, the stamp,
and for 9 in 10 our two records; 1 in 10 as the Rust runtime leaves them, with no record): making them
through `clone_for_vm` would cost four fsyncs each and measure nothing more. They are dated an hour back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Context, Row, Section, Target, median, ms, ratio, timed
from worker.core import inuse
from worker.core.config import RootfsConfig
from worker.core.registry import RootfsRegistry
from worker.core.space import Reserve
from worker.dev.templates import write_template

CLONES = 10_000
KEEP = 9_000
RELEASES = 300
#: Processes on the host while the two in-use checks are timed ("a host with thousands of processes" is
#: out of reach of a shared 2-core machine; the scan's cost per process is what the note reports).
HOST_PROCESSES = 1_000


@dataclass
class _Samples:
    listing: list[float] = field(default_factory=list)
    listing_cpu: list[float] = field(default_factory=list)
    walk: list[float] = field(default_factory=list)
    dry_run: list[float] = field(default_factory=list)
    reconcile: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    released: int = 0
    checked: list[float] = field(default_factory=list)
    forced: list[float] = field(default_factory=list)
    lease: list[float] = field(default_factory=list)
    scan: list[float] = field(default_factory=list)
    processes: int = 0
    states: dict[str, int] = field(default_factory=dict)


def run_section(ctx: Context) -> Section:
    section = Section("Lifecycle")
    s = _Samples()
    count = 1_000 if ctx.quick else CLONES
    keep = count * KEEP // CLONES
    templates, clones = ctx.workdir / "templates", ctx.workdir / "clones"
    write_template(templates, "base", b"B" * 4096)
    registry = RootfsRegistry(RootfsConfig(templates, clones, min_free=Reserve(nbytes=0)))
    digest = registry.stacks()[0].sha256

    ctx.log(f"lifecycle: writing {count} clones")
    _fabricate(clones, range(count), digest)
    for _ in range(ctx.reps(full=5, quick=1)):
        s.walk.append(timed(lambda: _bare_walk(clones))[0])
        cpu = time.process_time()
        seconds, listed = timed(registry.clones)
        s.listing_cpu.append(time.process_time() - cpu)
        s.listing.append(seconds)
    s.states = _count_states(listed)

    keep_ids = [_vm_id(i) for i in range(keep)]
    leaked = [_vm_id(i) for i in range(keep, count)]
    for r in range(ctx.reps(full=3, quick=1)):
        ctx.log(f"lifecycle: reconcile round {r + 1}")
        s.dry_run.append(timed(lambda: registry.reconcile(keep_ids, dry_run=True))[0])
        seconds, report = timed(lambda: registry.reconcile(keep_ids, older_than=600, dry_run=False))
        s.reconcile.append(seconds)
        s.released = len(report.released)
        if report.failed or s.released != count - keep:
            raise RuntimeError(f"reconcile released {s.released}, failed {report.failed}")
        _fabricate(clones, range(keep, count), digest)
        s.direct.append(timed(lambda: _release_all(registry, leaked))[0])
        _fabricate(clones, range(keep, count), digest)

    shutil.rmtree(clones)
    _release_pairs(ctx, registry, s)
    _in_use_checks(ctx, templates, s)
    section.rows += _rows(s, count, keep)
    section.notes += _notes(s, count, keep)
    return section


def _vm_id(i: int) -> str:
    """Every tenth clone is the seed's: its directory `vm_<i>` records no vm id; ours keep `vm-<i>`."""
    return f"vm_{i}" if i % 10 == 0 else f"vm-{i}"


def _release_all(registry: RootfsRegistry, vm_ids: list[str]) -> int:
    return sum(registry.release(vm, force=True) for vm in vm_ids)


def _fabricate(clones: Path, ids: range, digest: str) -> None:
    """Clones in the on-disk layout, an hour old; every tenth without our records (as the seed makes them)."""
    then = time.time() - 3600
    for i in ids:
        foreign = i % 10 == 0
        vm_id = _vm_id(i)
        vm_dir = clones / vm_id
        vm_dir.mkdir(parents=True)
        with open(vm_dir / "rootfs.ext4", "wb") as f:
            f.truncate(1 << 30)
        (vm_dir / "rootfs.ext4.sha256").write_text(digest)
        if not foreign:
            (vm_dir / ".vm-id").write_text(vm_id)
            record = {"vm_id": vm_id, "stack": "base", "created": then}
            (vm_dir / ".clone.json").write_text(json.dumps(record))
        os.utime(vm_dir / "rootfs.ext4.sha256", (then, then))
        os.utime(vm_dir, (then, then))


def _bare_walk(clones: Path) -> int:
    """The least any listing must do: read the clones dir and stat each disk."""
    n = 0
    for entry in os.scandir(clones):
        if not entry.name.startswith("."):
            os.stat(f"{entry.path}/rootfs.ext4", follow_symlinks=False)
            n += 1
    return n


def _count_states(listed: Sequence[object]) -> dict[str, int]:
    states: dict[str, int] = {}
    for info in listed:
        state = str(getattr(info, "state", "?"))
        states[state] = states.get(state, 0) + 1
    return states


def _release_pairs(ctx: Context, registry: RootfsRegistry, s: _Samples) -> None:
    """Releases with the in-use check and with force (no check), alternating, on real clones of one template."""
    pairs = ctx.reps(full=RELEASES, quick=20)
    ctx.log(f"lifecycle: {pairs} release pairs")
    for i in range(pairs):
        checked, forced = f"rel-c-{i}", f"rel-f-{i}"
        registry.clone_for_vm(checked, "base")
        registry.clone_for_vm(forced, "base")
        order = [(checked, False), (forced, True)] if i % 2 else [(forced, True), (checked, False)]
        for vm, force in order:
            seconds, _ = timed(lambda vm=vm, force=force: registry.release(vm, force=force))  # type: ignore[misc]
            (s.forced if force else s.checked).append(seconds)


def _in_use_checks(ctx: Context, templates: Path, s: _Samples) -> None:
    """The lease probe against a /proc scan, with the host raised to HOST_PROCESSES processes."""
    disk = templates / "base" / "rootfs.ext4"
    have = sum(1 for name in os.listdir("/proc") if name.isdigit())
    extra = max(0, ctx.reps(full=HOST_PROCESSES, quick=200) - have)
    ctx.log(f"lifecycle: {have} processes, starting {extra} more")
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(extra):
            sleepers.append(subprocess.Popen(["sleep", "600"]))
        s.processes = sum(1 for name in os.listdir("/proc") if name.isdigit())
        dir_fd = os.open(disk.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.stat(disk)
            for _ in range(ctx.reps(full=7, quick=2)):
                s.lease.append(_per_call(lambda: inuse.usage(dir_fd, "rootfs.ext4", disk.parent), 200))
                s.scan.append(timed(lambda: inuse.find_holders({(st.st_dev, st.st_ino)}))[0])
        finally:
            os.close(dir_fd)
    finally:
        for proc in sleepers:
            proc.kill()
        for proc in sleepers:
            proc.wait()


def _per_call(fn: object, n: int) -> float:
    assert callable(fn)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _spread(values: list[float]) -> str:
    """Quartiles: a few hundred samples do not fit in a note."""
    ordered = sorted(values)
    q = [ordered[int((len(ordered) - 1) * f)] for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return "min {:.2f}, q1 {:.2f}, median {:.2f}, q3 {:.2f}, max {:.2f}".format(*(v * 1e3 for v in q))


def _rows(s: _Samples, count: int, keep: int) -> list[Row]:
    listing, walk = median(s.listing), median(s.walk)
    rec, direct = median(s.reconcile), median(s.direct)
    checked, forced = median(s.checked), median(s.forced)
    lease, scan = median(s.lease), median(s.scan)
    return [
        Row(
            f"List {count:,} clones in-process (`RootfsRegistry.clones`): time (baseline: scandir + stat of each disk)",
            ms(listing),
            ms(walk),
            ratio(listing, walk),
            Target("<", 1.0, "s"),
            value=listing,
        ),
        Row(
            f"Reconcile {count:,} clones keeping {keep:,} ({count - keep:,} released) / the same releases called"
            " directly",
            ms(rec),
            ms(direct),
            ratio(rec, direct),
            None,
        ),
        Row(
            f"Reconcile {count:,} clones keeping {keep:,}, dry run: time",
            ms(median(s.dry_run)),
            "—",
            None,
            None,
        ),
        Row(
            "`release` with the in-use check / with `force` (no check): median of the pairs' ratios",
            ms(checked),
            ms(forced),
            median([ratio(c, f) for c, f in zip(s.checked, s.forced, strict=True)]),
            Target("<=", 1.1),
        ),
        Row(
            f"In-use check with {s.processes} processes on the host: write-lease probe / /proc scan",
            f"{lease * 1e6:.3g} µs",
            ms(scan),
            ratio(lease, scan),
            None,
        ),
    ]


def _notes(s: _Samples, count: int, keep: int) -> list[str]:
    def listing(values: list[float]) -> str:
        return ", ".join(f"{v * 1e3:.0f}" for v in values)

    return [
        f"Clones: {count:,} written in the on-disk layout ({s.states} as listed), on the work dir's filesystem. "
        "Listing takes no lock and hashes nothing: per VM directory it opens the disk once (its fstat and its "
        "write-lease probe come from that fd), reads the stamp and our record (or `.vm-id`); the /proc scan "
        "runs only if some disk is held (none here).",
        f"Listing samples (ms, wall): {listing(s.listing)}; CPU time of this process (user + system) "
        f"{listing(s.listing_cpu)}; bare walk {listing(s.walk)}. On a loaded machine the wall time is mostly "
        "waiting for a core: compare the CPU time, and the load average above.",
        f"Reconcile: keep list of {keep:,} vm ids, `older_than=600`, {s.released:,} clones released per round (one "
        "in ten made the seed's way); each release takes the VM's lock without waiting, re-checks age and use "
        "under it, renames into the trash (one fsync) and deletes. Baseline: the same clones, written again, "
        "released by a loop of `release(vm, force=True)` that knows which ones leaked. Samples (ms): reconcile "
        f"{listing(s.reconcile)}; direct {listing(s.direct)}; dry run {listing(s.dry_run)}.",
        f"Release pairs: {len(s.checked)} clones released with the check and {len(s.forced)} with `force`, "
        "alternating which goes first; each clone made just before by `clone_for_vm`. The ratio is the median of "
        "each pair's ratio (two releases a few ms apart see the same machine load); the columns are medians. "
        "The check is one open, fstat, F_SETSIG and F_SETLEASE/F_UNLCK on the disk, the lease probe timed below "
        "(µs), against a release of milliseconds (rename into the trash, one fsync, delete): the rest is noise. "
        f"Samples (ms), with check: {_spread(s.checked)}; with force: {_spread(s.forced)}.",
        f"In-use check: a free file probed with `inuse.usage` (lease; mean of 200 calls per sample) against one "
        f"`inuse.find_holders` scan of every process's fds and maps, {s.processes} processes on the host "
        f"(`sleep` children added to reach it). Lease samples (µs): "
        f"{', '.join(f'{v * 1e6:.1f}' for v in s.lease)}; scan samples (ms): {listing(s.scan)}. Hence the lease is "
        "the gate and the scan only names the holders of a disk the lease found held.",
    ]

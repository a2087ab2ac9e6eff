"""2 and 3. One clone, ours against the seed's way (`cp` then `sync FILE`), on ext4 and on reflink XFS.

Both sides end with the clone on disk: ours fsyncs before it reports (and stamps and renames), so the `cp`
baseline is followed by `sync FILE`. The seed spawns both processes for every clone; on a reflink
filesystem those two process starts are most of its cost, which is why the XFS target is so much tighter.
Three diagnostics run in the same rotation and explain the numbers: the bare copy (clone_fd and one
fsync), the registry's durability steps as bare syscalls (four flushes one after another, today's two ordered
groups, the same groups from two threads at once), and the registry's clone without the read lease.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from bench import fsync_order
from bench.common import (
    GIB,
    MIB,
    CallCount,
    Context,
    Row,
    Section,
    Target,
    counting_fsyncs,
    fmt_bytes,
    median,
    ms,
    ratio,
    run,
    timed,
)
from worker.core import cloning, lease
from worker.core.config import RootfsConfig
from worker.core.registry import RootfsRegistry
from worker.dev.mounts import MountUnavailable, xfs_reflink
from worker.dev.templates import write_sparse

STACK = "big"
TEMPLATE_SIZE = 2 * GIB
TEMPLATE_DATA = 64 * MIB
XFS_IMAGE_SIZE = 4 * GIB


@dataclass
class _Samples:
    """Seconds (and st_blocks) of each repetition per contender, and one fsync-counted registry clone."""

    template_blocks: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)
    bare_copy: list[float] = field(default_factory=list)
    ours_blocks: list[int] = field(default_factory=list)
    cp_blocks: list[int] = field(default_factory=list)
    methods: set[str] = field(default_factory=set)
    fsyncs: CallCount = field(default_factory=CallCount)
    profiled: float = 0.0
    lease_seconds: float = 0.0

    def add(self, name: str, seconds: float) -> None:
        self.seconds.setdefault(name, []).append(seconds)

    def med(self, name: str) -> float:
        return median(self.seconds[name])


@dataclass(frozen=True)
class _Setup:
    template: Path
    template_fd: int
    registry: RootfsRegistry
    scratch: Path
    reflink: str


def run_ext4(ctx: Context) -> Section:
    """2: no reflink, so both sides copy the 64 MiB of data (and only that, if they keep the holes)."""
    section = Section("Clone on ext4")
    root = ctx.workdir / "clone-ext4"
    fs = _fstype(ctx.workdir)
    s = _compare(ctx, root, reflink="auto", reps=ctx.reps(full=7, quick=2))
    measure = f"Clone on {fs} (no reflink), 2 GiB sparse / 64 MiB data: time / `cp --reflink=auto` + `sync FILE`"
    section.rows += [_time_row(s, measure, Target("<=", 1.5), on_loop=False), _blocks_row(s)]
    section.notes += _notes(s, fs)
    return section


def run_xfs(ctx: Context) -> Section:
    """3: reflink, so a clone is a metadata operation and the fixed costs (processes, fsyncs) are all."""
    section = Section("Clone on XFS with reflink")
    measure = (
        "Clone on XFS reflink (loop device), 2 GiB sparse / 64 MiB data: time / `cp --reflink=always` + `sync FILE`"
    )
    try:
        with xfs_reflink(ctx.workdir, size=XFS_IMAGE_SIZE) as mount:
            s = _compare(ctx, mount, reflink="always", reps=ctx.reps(full=41, quick=5))
    except MountUnavailable as exc:
        section.rows.append(Row(measure, "—", "—", None, Target("<=", 0.25), skipped=str(exc)))
        return section
    section.rows.append(_time_row(s, measure, Target("<=", 0.25), on_loop=True))
    section.notes += _notes(s, "xfs (reflink=1, on a loop device over a sparse image on the work dir)")
    return section


def _compare(ctx: Context, root: Path, *, reflink: str, reps: int) -> _Samples:
    """All contenders in rotating order, `reps` times after one untimed warm-up round; medians reported."""
    tdir = root / "templates"
    template = write_sparse(tdir / STACK / "rootfs.ext4", size=TEMPLATE_SIZE, data=TEMPLATE_DATA)
    registry = RootfsRegistry(RootfsConfig(tdir, root / "clones"))
    registry.warm()  # the hash is section 4's subject; here only the clone is timed
    (root / "scratch").mkdir()
    fd = os.open(template, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setup = _Setup(template, fd, registry, root / "scratch", reflink)
        s = _Samples(template_blocks=os.stat(template).st_blocks)
        orders = [name for name in fsync_order.ORDERS if reflink == "always" or name not in fsync_order.REFLINK_ONLY]
        steps = [_ours, _cp, _bare, *(_order(name) for name in orders), _ours_without_lease]
        for i in range(reps + 1):
            if i % 5 == 0:
                ctx.log(f"clone ({root.name}): repetition {i}/{reps}")
            shift = i % len(steps)
            for step in steps[shift:] + steps[:shift]:
                step(setup, i, s if i > 0 else _Samples())  # round 0 warms up; its samples are dropped
        _profile(registry, s)
        s.lease_seconds = _lease_cost(template)
    finally:
        os.close(fd)
    return s


def _ours(setup: _Setup, i: int, s: _Samples) -> None:
    vm_id = f"bench-vm-{i}"
    seconds, rootfs = timed(lambda: setup.registry.clone_for_vm(vm_id, STACK))
    s.add("ours", seconds)
    s.ours_blocks.append(os.stat(rootfs.path).st_blocks)
    setup.registry.release(vm_id)


def _ours_without_lease(setup: _Setup, i: int, s: _Samples) -> None:
    """The same clone with lease.take answering "no leases here": what the read lease costs a clone."""
    vm_id = f"bench-vm-nolease-{i}"
    with mock.patch.object(lease, "take", lambda fd, path: False):
        seconds, _ = timed(lambda: setup.registry.clone_for_vm(vm_id, STACK))
    s.add("no-lease", seconds)
    setup.registry.release(vm_id)


def _cp(setup: _Setup, i: int, s: _Samples) -> None:
    dst = setup.scratch / f"cp-{i}.img"

    def copy() -> None:
        run(["cp", f"--reflink={setup.reflink}", str(setup.template), str(dst)])
        run(["sync", str(dst)])

    s.add("cp", timed(copy)[0])
    s.cp_blocks.append(os.stat(dst).st_blocks)
    dst.unlink()


def _bare(setup: _Setup, i: int, s: _Samples) -> None:
    """cloning.clone_fd and one fsync: the copy itself, without any of the registry's steps."""
    dst = setup.scratch / f"bare-{i}.img"
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        src, dst_name = str(setup.template), str(dst)
        copy_s, method = timed(lambda: cloning.clone_fd(setup.template_fd, out, src_path=src, dst_path=dst_name))
        sync_s, _ = timed(lambda: os.fsync(out))
    finally:
        os.close(out)
        dst.unlink()
    s.add("bare", copy_s + sync_s)
    s.bare_copy.append(copy_s)
    s.methods.add(method)


def _order(name: str) -> Callable[[_Setup, int, _Samples], None]:
    """The registry's syscalls in fsync_order's `name` order, timed, then deleted."""

    def step(setup: _Setup, i: int, s: _Samples) -> None:
        vm_dir = setup.scratch / f"{name}-{i}"
        s.add(name, timed(lambda: fsync_order.ORDERS[name](setup.template_fd, vm_dir))[0])
        shutil.rmtree(vm_dir)

    return step


def _lease_cost(template: Path, n: int = 20000) -> float:
    """Seconds the read lease adds to one clone: take it, check it twice (after the hash, after the copy),
    drop it with the close; against open and close alone, same file, alternating batches."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    path = str(template)

    def batch(leased: bool) -> float:
        start = time.perf_counter()
        for _ in range(n // 10):
            fd = os.open(template, flags)
            if leased:
                lease.take(fd, path)
                lease.check(fd, path)
                lease.check(fd, path)
            os.close(fd)
        return (time.perf_counter() - start) / (n // 10)

    with_lease, without = [], []
    for _ in range(10):
        with_lease.append(batch(True))
        without.append(batch(False))
    return median(with_lease) - median(without)


def _profile(registry: RootfsRegistry, s: _Samples) -> None:
    """One more clone, not in the table, with every fsync counted: where the registry's time goes."""
    with counting_fsyncs() as count:
        s.profiled, _ = timed(lambda: registry.clone_for_vm("bench-vm-profiled", STACK))
    registry.release("bench-vm-profiled")
    s.fsyncs = count


def _time_row(s: _Samples, measure: str, target: Target, *, on_loop: bool) -> Row:
    ours, cp = s.med("ours"), s.med("cp")
    row = Row(measure, ms(ours), ms(cp), ratio(ours, cp), target)
    if row.met is False:
        row.why = _time_why(s, target, on_loop=on_loop)
    return row


def _blocks_row(s: _Samples) -> Row:
    ours = median(s.ours_blocks)
    row = Row(
        "Clone on ext4: allocated blocks of the clone / of the template",
        fmt_bytes(ours * 512),
        fmt_bytes(s.template_blocks * 512),
        ratio(ours, s.template_blocks),
        Target("<=", 1.0),
    )
    if row.met is False:
        row.why = (
            f"the clone allocates {fmt_bytes((ours - s.template_blocks) * 512)} more than the template: holes were "
            "written out as data, or the copy's extents are more fragmented than the template's (each extent "
            f"tree block counts). `cp --reflink=auto` allocated {fmt_bytes(median(s.cp_blocks) * 512)} for the "
            "same file."
        )
    return row


def _notes(s: _Samples, fs: str) -> list[str]:
    samples = "; ".join(f"{name} {_list(values)}" for name, values in s.seconds.items())
    return [
        f"Clone on {fs}: template {fmt_bytes(TEMPLATE_SIZE)} sparse with {fmt_bytes(TEMPLATE_DATA)} of data in 8 "
        "extents, fsynced after writing (its data stays in the page cache); the registry's hash cache warmed before "
        f"timing; {len(s.seconds['ours'])} repetitions after one untimed warm-up round, all contenders in "
        "rotating order, medians. Ours is `RootfsRegistry.clone_for_vm` in the benchmark process (lock, records, "
        "copy, stamp, rename, fsyncs: on XFS after a reflink the stamp is a reflink too and only the two "
        "directories are flushed, after the rename), released untimed after each repetition; `cp` "
        "and `sync` are spawned as processes, as the seed does.",
        f"Samples (ms): {samples}. `bare` = `cloning.clone_fd` (by {', '.join(sorted(s.methods))}) and one "
        "fsync, no registry; `sequential` / `ordered` / `paired` = the registry's syscalls alone with the four "
        "flushes one after another (the protocol before issue 10), in two groups ordered so one journal "
        "commit serves each (stamp before data, VM dir before clones dir: today's protocol off XFS), and in the "
        "same groups issued from two threads at once"
        + (
            "; `one-trip` = today's protocol on XFS, the stamp a reflink too and only the two directories "
            "flushed, after the rename"
            if "one-trip" in s.seconds
            else ""
        )
        + " (bench/fsync_order.py); `no-lease` = ours without the template's read lease.",
        f"Read lease cost: {s.lease_seconds * 1e6:.1f} µs per clone (F_SETSIG + F_SETLEASE, two F_GETLEASE "
        "checks and the release at close, against open and close alone, medians of 10 alternating batches of "
        f"2,000); in the rotation, ours {ms(s.med('ours'))} against {ms(s.med('no-lease'))} without the lease "
        f"({(s.med('ours') - s.med('no-lease')) * 1e6:+.0f} µs, within noise). The flushes alone: "
        f"`sequential` {ms(s.med('sequential'))}, `ordered` {ms(s.med('ordered'))}, `paired` {ms(s.med('paired'))}"
        + (f", `one-trip` {ms(s.med('one-trip'))}." if "one-trip" in s.seconds else "."),
        f"Diagnostics: the copy call alone {ms(median(s.bare_copy))}; one more registry clone with its fsyncs "
        f"counted took {ms(s.profiled)}, of which {s.fsyncs.calls} fsyncs {ms(s.fsyncs.seconds)}; allocated: "
        f"template {fmt_bytes(s.template_blocks * 512)}, ours {fmt_bytes(median(s.ours_blocks) * 512)}, "
        f"cp {fmt_bytes(median(s.cp_blocks) * 512)}.",
    ]


def _time_why(s: _Samples, target: Target, *, on_loop: bool) -> str:
    ours, cp, bare = s.med("ours"), s.med("cp"), s.med("bare")
    sequential, ordered, paired = s.med("sequential"), s.med("ordered"), s.med("paired")
    per_fsync = s.fsyncs.seconds / max(s.fsyncs.calls, 1)
    return (
        f"the copy itself with one fsync takes {ms(bare)} ({bare / cp:.2f}x the baseline); the registry's "
        f"clone {ms(ours)}. A registry clone with its fsyncs counted made {s.fsyncs.calls} of them "
        f"({ms(s.fsyncs.seconds)} of its {ms(s.profiled)}, {ms(per_fsync)} each on average), "
        + (
            "in one group (the two directories after the rename: one wait), "
            if s.fsyncs.calls <= 2
            else "in two groups ordered so that one journal commit serves each, "
        )
        + "where the baseline's `sync FILE` makes one. Each group waits for the disk"
        + (": a log force, and on this loop device a write and a flush of the image file" if on_loop else "")
        + f". The syscalls alone take {ms(ordered)} ordered ({ordered / cp:.2f}x), {ms(sequential)} in the "
        f"order before issue 10 ({sequential / cp:.2f}x), {ms(paired)} from two threads ({paired / cp:.2f}x)"
        + (f", {ms(s.med('one-trip'))} in one trip ({s.med('one-trip') / cp:.2f}x)" if "one-trip" in s.seconds else "")
        + " (bench/fsync_order.py); the rest is the registry's Python (locks, path checks, opens, the lease). "
        "Times on a loaded machine also include waits for a CPU and for the shared disk. "
        f"Target here: {ms(cp * target.limit)}."
    )


def _fstype(path: Path) -> str:
    """The filesystem type of `path` as findmnt names it (ext4, xfs, tmpfs, ...)."""
    try:
        return run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)]).stdout.strip() or "unknown"
    except (RuntimeError, OSError):
        return "unknown"


def _list(values: list[float]) -> str:
    return ", ".join(f"{v * 1e3:.2f}" for v in values)

"""5. End to end through Celery and Redis: enqueue-to-result latency and jobs per second.

The floor is `rootfs.ping`, a task that does nothing, on the same app, worker and Redis in the same run:
what is left above it is what the clone and the release themselves cost. Latency is one job at a time;
throughput sends a burst and then collects it, so several jobs are in flight and both pool processes work.

Measured with the templates and clones on an XFS loop mount (reflink: a clone is one FICLONE plus the
stamp and its flushes, the configuration a fleet host runs and the one the targets are for), and again on
the work dir's ext4, which has no reflink, so every clone also copies and flushes the template's data: those
rows carry no target and show what a host without a reflink filesystem pays.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from kombu import Queue
from kombu.utils.json import loads as kombu_loads

from bench.celery_host import Host, celery_host, default_concurrency
from bench.common import (
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
    percentile,
    ratio,
)
from bench.machine import ext4_without_journal
from worker.client import JobHandle
from worker.core.config import RootfsConfig
from worker.core.registry import RootfsRegistry
from worker.dev.mounts import MountUnavailable, xfs_reflink
from worker.dev.templates import write_sparse
from worker.service.envelope import Limits, check_task_message, parse_item
from worker.service.queues import host_queues

HOST = "bench-e2e"
STACK = "small"
TEMPLATE_SIZE = 64 * MIB
#: Small: the clone's own copy is a minor part, so the gap to the empty task is the per-job overhead.
TEMPLATE_DATA = 1 * MIB
TIMEOUT = 60.0
KINDS = ("ping", "clone", "release")


@dataclass
class _Samples:
    latency: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    rate: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    hashed_bytes: int = 0
    not_released: int = 0
    #: The diagnostic: the same calls on the registry in this process, interleaved with the latency rounds.
    in_process: dict[str, list[float]] = field(default_factory=lambda: {"clone": [], "release": []})
    fsyncs: dict[str, CallCount] = field(default_factory=lambda: {"clone": CallCount(), "release": CallCount()})
    #: Median microseconds to create an empty file in the clones dir, at the start and at the end.
    create_us: dict[str, float] = field(default_factory=dict)
    no_journal: bool = False
    concurrency: int = 2
    #: "xfs" (reflink; the rows with targets) or "ext4" (the work dir: copies; no targets).
    fs: str = "xfs"
    #: Median seconds per message: the worker's queue-item check, and kombu's own parse it replaces.
    check_s: float = 0.0
    kombu_parse_s: float = 0.0


#: The XFS image: the templates and a few hundred reflinked clones need little.
XFS_IMAGE_SIZE = 1 << 30


def run_section(ctx: Context) -> Section:
    """The whole measure on XFS (reflink) at the worker's default concurrency and at 2 (one pool process per
    core), then on the work dir's ext4 (no reflink) at the default concurrency."""
    section = Section("End to end through Celery and Redis")
    runs = [("xfs", c) for c in dict.fromkeys((default_concurrency(), 2))] + [("ext4", default_concurrency())]
    for fs, concurrency in runs:
        if fs == "xfs":
            try:
                with xfs_reflink(ctx.workdir / f"xfs-c{concurrency}", size=XFS_IMAGE_SIZE) as mount:
                    rows, notes = _run_at(ctx, mount, concurrency, fs)
            except MountUnavailable as exc:
                rows = [Row(f"`clone_for_vm` through the queue on XFS, `--concurrency {concurrency}`", "—", "—", None,
                            None, skipped=f"no XFS loop mount here: {exc}")]  # fmt: skip
                notes = []
        else:
            rows, notes = _run_at(ctx, ctx.workdir, concurrency, fs)
        section.rows += rows
        section.notes += notes
    return section


def _run_at(ctx: Context, parent: Path, concurrency: int, fs: str) -> tuple[list[Row], list[str]]:
    root = parent / f"queue-{fs}-c{concurrency}"
    ctx.log(f"queue: worker at --concurrency {concurrency}, clones on {fs}")
    with celery_host(root, HOST, concurrency=concurrency) as host:
        write_sparse(host.template_dir / STACK / "rootfs.ext4", size=TEMPLATE_SIZE, data=TEMPLATE_DATA, chunks=1)
        s = _Samples(no_journal=ext4_without_journal(host.template_dir) is True, concurrency=concurrency, fs=fs)
        s.create_us["start"] = _create_cost(host.clones_dir)
        _warm_up(host)
        registry = RootfsRegistry(RootfsConfig(host.template_dir, host.clones_dir))
        _latency(ctx, host, registry, s, rounds=ctx.reps(full=150, quick=30))
        _throughput(ctx, host, s, rounds=ctx.reps(full=3, quick=1), burst=ctx.reps(full=150, quick=40))
        s.create_us["end"] = _create_cost(host.clones_dir)
        s.check_s, s.kombu_parse_s = _check_cost(host, rounds=ctx.reps(full=20, quick=5))
        leftovers = _clones_left(host.clones_dir)
    return _rows(s), [*_notes(s, leftovers), _log_note(host.log)]


def _warm_up(host: Host) -> None:
    """Hash the template once (the cache is then warm on disk for both pool processes) and let both pool
    processes, the client's connections and its result subscription settle before anything is timed."""
    for i in range(6):
        for job in _round_jobs(host, f"warm-up-{i}"):
            job().result(timeout=TIMEOUT)


def _round_jobs(host: Host, vm_id: str) -> list[Callable[[], JobHandle]]:
    c, name = host.client, host.name
    return [
        lambda: c.ping(host=name),
        lambda: c.clone(host=name, vm_id=vm_id, stack=STACK),
        lambda: c.release(host=name, vm_id=vm_id),
    ]


def _latency(ctx: Context, host: Host, registry: RootfsRegistry, s: _Samples, *, rounds: int) -> None:
    """One job at a time, ping / clone / release interleaved, so drift hits all three alike; each round
    ends with the same clone and release called directly on the registry (the diagnostic), so that it
    sees the same state of the machine and of the filesystem as the jobs."""
    ctx.log(f"queue: {rounds} latency rounds")
    for i in range(rounds):
        for kind, job in zip(KINDS, _round_jobs(host, f"lat-{i}"), strict=True):
            start = time.perf_counter()
            result = job().result(timeout=TIMEOUT)
            s.latency[kind].append(time.perf_counter() - start)
            _check(kind, result, s)
        _in_process(registry, f"in-process-{i}", s)


def _in_process(registry: RootfsRegistry, vm_id: str, s: _Samples) -> None:
    """Clone and release without Celery or Redis, fsyncs counted: the part of a job that is filesystem work."""
    for kind, call in (
        ("clone", lambda: registry.clone_for_vm(vm_id, STACK)),
        ("release", lambda: registry.release(vm_id)),
    ):
        with counting_fsyncs() as count:
            start = time.perf_counter()
            call()
            s.in_process[kind].append(time.perf_counter() - start)
        s.fsyncs[kind].calls += count.calls
        s.fsyncs[kind].seconds += count.seconds


def _create_cost(clones_dir: Path, n: int = 50) -> float:
    """Median microseconds to create (and close) an empty file beside the VM directories. On an ext4 without
    a journal, inode allocation skips inodes deleted in the last minute or so, one by one, so this grows with
    the create/delete churn of clones and releases; a clone creates four files, an empty task none."""
    clones_dir.mkdir(parents=True, exist_ok=True)
    paths = [clones_dir / f".bench-create-{i}" for i in range(n)]
    times = []
    for path in paths:
        start = time.perf_counter()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        times.append(time.perf_counter() - start)
    for path in paths:
        path.unlink()
    return median(times) * 1e6


def _throughput(ctx: Context, host: Host, s: _Samples, *, rounds: int, burst: int) -> None:
    """Send `burst` jobs, then collect them all; the ping burst alternates between before and after the
    clone/release pair (a release burst must follow its clones)."""
    for r in range(rounds):
        ctx.log(f"queue: throughput round {r + 1}/{rounds} ({burst} jobs per kind)")
        sends = _burst_senders(host, [f"tp-{r}-{j}" for j in range(burst)])
        order = KINDS if r % 2 == 0 else ("clone", "release", "ping")
        for kind in order:
            s.rate[kind].append(_burst(kind, sends[kind], burst, s))


def _burst_senders(host: Host, vm_ids: list[str]) -> dict[str, Callable[[int], JobHandle]]:
    """Per kind, a function sending job number j of a burst; clone j and release j share vm_ids[j]."""
    c, name = host.client, host.name
    return {
        "ping": lambda _j: c.ping(host=name),
        "clone": lambda j: c.clone(host=name, vm_id=vm_ids[j], stack=STACK),
        "release": lambda j: c.release(host=name, vm_id=vm_ids[j]),
    }


def _burst(kind: str, send: Callable[[int], JobHandle], n: int, s: _Samples) -> float:
    start = time.perf_counter()
    handles = [send(j) for j in range(n)]
    for handle in handles:
        _check(kind, handle.result(timeout=TIMEOUT), s)
    return n / (time.perf_counter() - start)


def _check(kind: str, result: Any, s: _Samples) -> None:
    """Count what would make the numbers lie: a clone that hashed (cache not warm), a release that found
    nothing to release (the clone did not happen)."""
    if kind == "clone":
        s.hashed_bytes += int(result["hashed_bytes"])
    elif kind == "release" and not result["released"]:
        s.not_released += 1


def _check_cost(host: Host, *, rounds: int, per_round: int = 2000) -> tuple[float, float]:
    """Seconds per message of the transport's queue-item check (worker/service/envelope.py) on a clone job
    exactly as RootfsClient sends it, against kombu's `loads` of the same item, which the check replaces (the
    worker parses the envelope once either way; the check also decodes the body, which Celery decodes again)."""
    # An unconsumed queue holds the client's exact bytes for us to read back.
    parked = "bench.unconsumed"
    host.client._app.send_task(
        "rootfs.clone_for_vm",
        kwargs={"vm_id": "vm-check", "stack": STACK, "host": host.name},
        queue=Queue(parked),
        expires=600,
    )
    conn = redis.Redis.from_url(str(host.client._app.conf.broker_url))
    try:
        item = conn.rpop(parked)
    finally:
        conn.close()
    assert isinstance(item, bytes)
    queue, limits = host_queues(host.name).fast, Limits(max_time_limit=1800, max_eta_ahead=360)
    checks, parses = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            check_task_message(parse_item(item), queue, limits)
        checks.append((time.perf_counter() - start) / per_round)
        start = time.perf_counter()
        for _ in range(per_round):
            kombu_loads(item)
        parses.append((time.perf_counter() - start) / per_round)
    return median(checks), median(parses)


def _clones_left(clones_dir: Path) -> int:
    """VM directories still present after the run (dot-names are the registry's own)."""
    return sum(1 for entry in os.scandir(clones_dir) if not entry.name.startswith("."))


def _log_note(log: Path) -> str:
    """Warnings in the worker's log: a job that succeeded while something went wrong still costs time."""
    lines = log.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if "WARNING/" in line or "ERROR/" in line]
    trash = sum(1 for line in warnings if "could not delete released clone" in line)
    note = f"Worker log: {len(warnings)} warnings or errors"
    if trash:
        note += (
            f', {trash} of them "could not delete released clone ... No such file or directory": concurrent '
            "releases in the two pool processes each sweep the whole `.trash` (RootfsRegistry._empty_trash), "
            "delete each other's entries and log the loser's failure"
        )
    return note + "."


def _rows(s: _Samples) -> list[Row]:
    lat, rate = s.latency, s.rate
    ping50, ping99, ping_rate = median(lat["ping"]), percentile(lat["ping"], 99), median(rate["ping"])
    rows: list[Row] = []
    at = f", `--concurrency {s.concurrency}`, {_fs_label(s)}"
    with_target = s.fs == "xfs"
    for kind, task in (("clone", "clone_for_vm"), ("release", "release_vm")):
        p50, p99, jobs = median(lat[kind]), percentile(lat[kind], 99), median(rate[kind])
        rows += [
            Row(
                f"`{task}` p50 enqueue→result / `rootfs.ping` p50{at}",
                ms(p50),
                ms(ping50),
                ratio(p50, ping50),
                Target("<=", 1.5) if with_target else None,
            ),
            Row(f"`{task}` p99 enqueue→result / `rootfs.ping` p99{at}", ms(p99), ms(ping99), ratio(p99, ping99), None),
            Row(
                f"`{task}` throughput / `rootfs.ping` throughput{at}",
                f"{jobs:.0f} jobs/s",
                f"{ping_rate:.0f} jobs/s",
                ratio(jobs, ping_rate),
                Target(">=", 0.6) if with_target else None,
            ),
        ]
    rows.append(
        Row(
            f"queue-item check per clone message (worker/service/envelope.py) / `rootfs.ping` p50{at}",
            f"{s.check_s * 1e6:.1f} µs",
            ms(ping50),
            ratio(s.check_s, ping50),
            Target("<=", 0.02),
        )
    )
    for row in rows:
        if row.met is False:
            row.why = _why(row, s)
    return rows


def _fs_label(s: _Samples) -> str:
    return "XFS (reflink)" if s.fs == "xfs" else "ext4 (no reflink: copies)"


def _per_call(s: _Samples, kind: str) -> str:
    """Fsyncs of one in-process call: how many, and how long they took together."""
    n = max(len(s.in_process[kind]), 1)
    count = s.fsyncs[kind]
    return f"{count.calls / n:.0f} fsync(s), {ms(count.seconds / n)}"


def _why(row: Row, s: _Samples) -> str:
    own = {kind: median(s.in_process[kind]) for kind in ("clone", "release")}
    registry = (
        "Called directly on the registry in this process, interleaved with the jobs, a clone takes "
        f"{ms(own['clone'])} ({_per_call(s, 'clone')}) and a release {ms(own['release'])} "
        f"({_per_call(s, 'release')}). A clone ({_fs_label(s)}) gets the template's {fmt_bytes(TEMPLATE_DATA)} "
        "of data, creates four files and flushes them in two groups, ordered so that one journal commit "
        "serves each (an ext4 without a journal cannot merge them); a release takes the VM's lock, renames "
        "into the trash, flushes both directories, then deletes the tree. Creating a file in the clones dir took "
        f"{s.create_us['start']:.0f} µs at the start of this section and {s.create_us['end']:.0f} µs at its end"
        + (
            ": on an ext4 without a journal, as here, inode allocation skips, one by one, inodes deleted in the "
            "last minute or so, and every clone/release cycle deletes five. "
            if s.no_journal and s.create_us["end"] > 2 * s.create_us["start"]
            else ". "
        )
    )
    closing = (
        "What would close it: less filesystem work per job (the clone sections' account), more pool processes "
        "than cores, which overlaps the fsync waits, and a reflink filesystem for the clones dir, where the "
        "copy is one FICLONE."
    )
    return registry + (_throughput_why(s) if "throughput" in row.measure else _latency_why(s)) + closing


def _latency_why(s: _Samples) -> str:
    ping = median(s.latency["ping"])
    gaps = {kind: median(s.latency[kind]) - ping for kind in ("clone", "release")}
    return (
        f"Through the queue, at the median, a clone adds {ms(gaps['clone'])} to the empty task's {ms(ping)} and "
        f"a release {ms(gaps['release'])}, close to the registry's own time: Celery adds little of its own. "
        f"The 1.5x target leaves {ms(ping * 0.5)} for a job's real work here, because the floor itself is only "
        "a few Redis round trips on this machine. "
    )


def _throughput_why(s: _Samples) -> str:
    held = {kind: s.concurrency / median(s.rate[kind]) for kind in KINDS}
    return (
        f"Under a burst each job holds one of the {s.concurrency} pool processes for {ms(held['clone'])} "
        f"(clone) and {ms(held['release'])} (release) against {ms(held['ping'])} for the empty task: more than "
        "the registry's time alone, because on 2 cores the client, Redis and both pool processes share the "
        "CPU, and the bursts create and delete files fastest, which is when creates slow down most. A pool "
        "process waiting for an fsync is idle, so more pool processes than cores (the worker's default is 4) "
        f"would overlap those waits; this run used `--concurrency {s.concurrency}`. "
    )


def _ping50(s: _Samples) -> float:
    return median(s.latency["ping"])


def _notes(s: _Samples, leftovers: int) -> list[str]:
    lat, rate = s.latency, s.rate
    return [
        f"End to end at `--concurrency {s.concurrency}` on {_fs_label(s)}: our own redis-server (no persistence) "
        "and one `celery worker` "
        f"(prefork) on this machine; templates and clones on {_fs_label(s)}; template "
        f"{fmt_bytes(TEMPLATE_SIZE)} sparse with {fmt_bytes(TEMPLATE_DATA)} of data, its hash cached before "
        f"timing (the timed clones hashed {s.hashed_bytes} bytes in all). Latency: {len(lat['ping'])} rounds "
        "of ping, clone, release one at a time, each from before the send to the result in hand (p50 = "
        f"median). Throughput: {len(rate['ping'])} rounds of a burst of each kind, sent all at once and then "
        "collected; jobs/s is the median round. Every clone used its own vm id and was released "
        f"({s.not_released} releases found nothing; {leftovers} VM directories left at the end). The empty "
        "task touches no disk, so filesystem stalls (other work on this shared machine, the create cost "
        "below) land on the clone and release side of these ratios only.",
        f"End to end samples (`--concurrency {s.concurrency}`, {_fs_label(s)}): latency p50/p99 (ms): "
        + "; ".join(f"{k} {median(lat[k]) * 1e3:.2f}/{percentile(lat[k], 99) * 1e3:.2f}" for k in KINDS)
        + "; throughput per round (jobs/s): "
        + "; ".join(f"{k} " + ", ".join(f"{v:.0f}" for v in rate[k]) for k in KINDS)
        + ".",
        f"Diagnostics (`--concurrency {s.concurrency}`, {_fs_label(s)}): the same clone and release called "
        "directly on the "
        "registry in the benchmark process, "
        f"once per latency round, medians: clone {ms(median(s.in_process['clone']))} ({_per_call(s, 'clone')}), "
        f"release {ms(median(s.in_process['release']))} ({_per_call(s, 'release')}). Creating an empty file "
        f"in the clones dir: {s.create_us['start']:.0f} µs (median) before the first job, "
        f"{s.create_us['end']:.0f} µs after the last.",
        f"Queue-item check: {s.check_s * 1e6:.1f} µs per clone message (median of rounds of 2000, in the "
        "benchmark process, on the bytes RootfsClient sends), of which kombu's own parse of the item, which the "
        f"check replaces, is {s.kombu_parse_s * 1e6:.1f} µs: the check adds "
        f"{(s.check_s - s.kombu_parse_s) * 1e6:.1f} µs to a job whose empty-task floor is {ms(_ping50(s))}.",
    ]

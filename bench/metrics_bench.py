"""6. What metrics cost a clone: the same clone job attempt with metrics on and off, side by side.

The attempt is `worker.service.jobs.observe` around `RootfsRegistry.clone_for_vm`, as a pool process runs
it (without Celery and Redis, whose cost is the same either way and only adds noise): what the caller waits
for. The recording itself happens after the result is stored (`jobs.flush`, from RootfsTask.after_return);
it is timed on its own, right after each attempt, as the pool process's time per job. "On" records into
prometheus_client's multiprocess mode, memory-mapped files in a directory as in a worker with
ROOTFS_METRICS_PORT set; "off" is the same call with no recorder, as in a worker without. It runs in a
fresh interpreter because prometheus_client picks its multiprocess value class when first imported.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import MIB, Context, Row, Section, Target, median, ms, run_child
from worker.dev.mounts import MountUnavailable, xfs_reflink
from worker.dev.templates import write_sparse

STACK = "small"
TEMPLATE_SIZE = 64 * MIB
TEMPLATE_DATA = 1 * MIB
TARGET = Target("<=", 1.03)


def run_section(ctx: Context) -> Section:
    section = Section("Metrics overhead")
    reps = ctx.reps(full=401, quick=21)
    ext4 = _measure(ctx, ctx.workdir / "ext4", reps)
    section.rows.append(_row(ext4, "copy (no reflink) on the work dir's filesystem"))
    section.notes.append(_note(ext4, "copy"))
    measure = "Clone job attempt, metrics on / off: reflink on XFS (loop device)"
    try:
        with xfs_reflink(ctx.workdir, size=512 * MIB) as mount:
            xfs = _measure(ctx, mount, reps)
    except MountUnavailable as exc:
        section.rows.append(Row(measure, "—", "—", None, TARGET, skipped=str(exc)))
        return section
    section.rows.append(_row(xfs, "reflink on XFS (loop device)"))
    section.notes.append(_note(xfs, "reflink"))
    return section


def _measure(ctx: Context, root: Path, reps: int, mdir: Path | None = None) -> dict[str, Any]:
    tdir, cdir = root / "templates", root / "clones"
    mdir = mdir or ctx.workdir / f"metrics-{root.name}"
    write_sparse(tdir / STACK / "rootfs.ext4", size=TEMPLATE_SIZE, data=TEMPLATE_DATA, chunks=1)
    mdir.mkdir(parents=True, exist_ok=True)
    ctx.log(f"metrics: {reps} rounds on {root.name}")
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(mdir),
        "ROOTFS_HOST": "bench",
        "MICROVM_ROOTFS_TEMPLATE_DIR": str(tdir),
        "MICROVM_ROOTFS_CLONES_DIR": str(cdir),
    }
    return run_child("metrics-overhead", str(reps), env=env, timeout=1200)


def _paired(r: dict[str, Any]) -> tuple[float, float, float]:
    """(median on, median off, ratio): the ratio is 1 + the median of the per-round differences over the
    median off. Each round times on and off back to back, so the difference cancels the drift of a shared
    machine, which moves both medians by more than the few µs measured here."""
    on, off = r["on"], r["off"]
    gap = median([a - b for a, b in zip(on, off, strict=True)])
    return median(on), median(off), 1 + gap / median(off)


def _row(r: dict[str, Any], where: str) -> Row:
    on, off, paired = _paired(r)
    row = Row(f"Clone job attempt, metrics on / off: {where}", ms(on), ms(off), paired, TARGET)
    if row.met is False:
        row.why = (
            f"the attempt with metrics on does no more than without (one list append; the recording, "
            f"{median(r['flush']) * 1e6:.0f} µs, comes after the result is stored), so the gap is the spread of "
            "the attempt itself (fsync waits on a shared disk), which pairing the rounds does not fully cancel."
        )
    return row


def _note(r: dict[str, Any], method: str) -> str:
    return (
        f"Metrics overhead ({method}, methods seen: {', '.join(r['methods'])}): {len(r['on'])} attempts per side "
        f"after one untimed round, on and off alternating which goes first, each clone released untimed; "
        f"template {TEMPLATE_SIZE // MIB} MiB sparse with {TEMPLATE_DATA // MIB} MiB of data, hash warm. "
        f"Recording a clone job's metrics alone (the duration histogram, the hash-cache counter, two reads "
        f"of the registry's hash work) costs {r['record_us']:.1f} µs "
        f"(mean of {r['record_n']}); after each attempt, where the worker records it (after the result is "
        f"stored), {median(r['flush']) * 1e6:.1f} µs (median), {median(r['flush']) / median(r['off']):.1%} of the "
        "attempt: pool-process time per job, not time the caller waits. "
        f"Medians: on {ms(median(r['on']))}, off {ms(median(r['off']))} (ratio of "
        f"medians {median(r['on']) / median(r['off']):.3f}; the table's ratio is paired by round). The metric "
        "files are on the work dir's filesystem, as the worker's default ROOTFS_RUN_DIR under /tmp is."
    )


def child_overhead(reps_text: str) -> dict[str, Any]:
    """Runs in `bench.child`: needs PROMETHEUS_MULTIPROC_DIR and the ROOTFS_/MICROVM_ variables set."""
    from worker.core.models import HashWork
    from worker.service import jobs, metrics, runtime

    reps = int(reps_text)
    registry = runtime.registry()
    registry.warm()
    recorder = metrics.JobMetrics("bench")
    samples: dict[str, list[float]] = {"on": [], "off": [], "flush": []}
    methods: set[str] = set()
    for i in range(reps + 1):
        for side in ("on", "off") if i % 2 == 0 else ("off", "on"):
            vm_id = f"{side}-{i}"
            chosen: metrics.JobMetrics | None = recorder if side == "on" else None
            with mock.patch.object(metrics, "for_this_process", return_value=chosen):
                start = time.perf_counter()
                rootfs = jobs.observe(
                    functools.partial(registry.clone_for_vm, vm_id, STACK),
                    task="rootfs.clone_for_vm",
                    host="bench",
                    task_id=str(uuid.uuid4()),
                    attempt=0,
                    vm_id=vm_id,
                    stack=STACK,
                )
                seconds = time.perf_counter() - start
                flush_start = time.perf_counter()
                jobs.flush()  # as RootfsTask.after_return does, once the result is stored
                flushed = time.perf_counter() - flush_start
            methods.add(rootfs.method)
            if i > 0 and side == "on":
                samples["flush"].append(flushed)
            if i > 0:
                samples[side].append(seconds)
            registry.release(vm_id)
    n = 5000
    start = time.perf_counter()
    for _ in range(n):
        before = registry.hash_work
        recorder.clone(0.001, method="copy", outcome="ok")
        recorder.hashing(registry.hash_work - before + HashWork(hits=1))
    record_us = (time.perf_counter() - start) / n * 1e6
    assert os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]), "metrics were not in multiprocess mode"
    return {**samples, "methods": sorted(methods), "record_us": record_us, "record_n": n}

"""The Celery tasks: thin views over the registry.

Each task checks its arguments, calls the core and maps errors: a transient RootfsError is retried with
capped exponential backoff and jitter, anything else fails at once with its type and message in the result
backend. No filesystem logic lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task
from kombu import Queue

from worker.celery import app
from worker.core.names import safe_vm_id
from worker.core.reconcile import DEFAULT_OLDER_THAN
from worker.errors import InvalidArgument, RootfsError
from worker.service import jobs, runtime
from worker.service.hosts import live_hosts
from worker.service.queues import host_queues
from worker.service.retry import backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Progress updates go to Redis at most this often; a hash reports every 64 MiB, which can be 20x a second.
PROGRESS_EVERY_S = 0.25


class _Progress:
    """Forwards hash progress to the result backend as PROGRESS, and counts what this job had to hash."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self._last = 0.0
        self.hashed: dict[str, int] = {}

    def __call__(self, stack: str, done: int, total: int) -> None:
        self.hashed[stack] = done
        now = time.monotonic()
        if self._task.request.id and (now - self._last >= PROGRESS_EVERY_S or done == total):
            self._last = now
            try:
                self._task.update_state(state="PROGRESS", meta={"stack": stack, "done": done, "total": total})
            except Exception as exc:  # noqa: BLE001 - progress is best effort: never fail a clone over it
                log.warning("progress update for %s failed: %s", self._task.request.id, exc)

    @property
    def hashed_bytes(self) -> int:
        return sum(self.hashed.values())


def _check_host(host: object) -> str:
    """Refuse a job meant for another host: a clone must land where its VM boots."""
    mine = runtime.settings().host
    if host is not None and host != mine:
        raise InvalidArgument("host", repr(host)[:80], f"this worker serves host {mine!r}")
    return mine


def _run(task: Task, call: Callable[[], T], *, vm_id: object = None, stack: object = None) -> T:
    """One attempt, observed (metrics and the job's log line: worker.service.jobs), with the retry policy."""
    req = task.request
    return jobs.observe(
        lambda: _attempt(task, call),
        task=task.name,
        host=runtime.settings().host,
        task_id=req.id,
        attempt=req.retries or 0,
        vm_id=vm_id,
        stack=stack,
    )


def _attempt(task: Task, call: Callable[[], T]) -> T:
    try:
        return call()
    except RootfsError as exc:
        s = runtime.settings()
        attempt = task.request.retries or 0
        if not exc.transient or attempt >= s.retry_max:
            log.warning("%s failed for good after %d retries: %s: %s", task.name, attempt, type(exc).__name__, exc)
            raise
        delay = backoff(attempt, base=s.retry_base, cap=s.retry_cap)
        log.info(
            "%s: transient %s (%s); retry %d/%d in %.1fs",
            task.name,
            type(exc).__name__,
            exc,
            attempt + 1,
            s.retry_max,
            delay,
        )
        raise task.retry(exc=exc, countdown=delay, max_retries=s.retry_max) from exc


@app.task(bind=True, name="rootfs.scan_stacks", throws=(RootfsError,))
def scan_stacks(self: Task, host: str | None = None) -> list[dict[str, Any]]:
    _check_host(host)
    progress = _Progress(self)
    stacks = _run(self, lambda: runtime.registry().stacks(progress=progress))
    return [s.to_dict() for s in stacks]


@app.task(bind=True, name="rootfs.clone_for_vm", throws=(RootfsError,))
def clone_for_vm(self: Task, vm_id: str, stack: str, host: str | None = None) -> dict[str, Any]:
    mine = _check_host(host)
    progress = _Progress(self)
    started = time.monotonic()
    rootfs = _run(
        self, lambda: runtime.registry().clone_for_vm(vm_id, stack, progress=progress), vm_id=vm_id, stack=stack
    )
    return {
        **rootfs.to_dict(),
        "host": mine,
        "hashed_bytes": progress.hashed_bytes,
        "seconds": round(time.monotonic() - started, 6),
    }


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(name, repr(value)[:80], "must be true or false")
    return value


@app.task(bind=True, name="rootfs.release_vm", throws=(RootfsError,))
def release_vm(self: Task, vm_id: str, host: str | None = None, force: bool = False) -> dict[str, Any]:
    """Refused with CloneInUse while a process holds the disk open, unless `force`."""
    mine = _check_host(host)
    _check_flag("force", force)
    released = _run(self, lambda: runtime.registry().release(vm_id, force=force), vm_id=vm_id)
    return {"vm_id": safe_vm_id(vm_id), "released": released, "host": mine}


@app.task(bind=True, name="rootfs.list_clones", throws=(RootfsError,))
def list_clones(self: Task, host: str | None = None) -> list[dict[str, Any]]:
    """Every VM directory on this host (worker.core.inventory): no lock held, nothing hashed."""
    _check_host(host)
    return [c.to_dict() for c in _run(self, lambda: runtime.registry().clones())]


@app.task(bind=True, name="rootfs.reconcile", throws=(RootfsError,))
def reconcile(
    self: Task,
    keep: list[str],
    older_than: float = DEFAULT_OLDER_THAN,
    dry_run: bool = True,
    host: str | None = None,
) -> dict[str, Any]:
    """Release the clones not in `keep` (worker.core.reconcile); a dry run unless `dry_run` is false."""
    mine = _check_host(host)
    _check_flag("dry_run", dry_run)
    report = _run(self, lambda: runtime.registry().reconcile(keep, older_than=older_than, dry_run=dry_run))
    return {**report.to_dict(), "host": mine}


@app.task(bind=True, name="rootfs.warm_hashes", throws=(RootfsError,))
def warm_hashes(self: Task, host: str | None = None) -> dict[str, Any]:
    mine = _check_host(host)
    report = _run(self, lambda: runtime.registry().warm(progress=_Progress(self)))
    return {**report.to_dict(), "host": mine}


@app.task(bind=True, name="rootfs.fanout_warm", throws=(RootfsError,))
def fanout_warm(self: Task) -> dict[str, Any]:
    """Send one warm-up to each live host's own bulk queue; it expires if the host does not take it in time."""
    s = runtime.settings()
    hosts = [str(h["host"]) for h in live_hosts(runtime.redis_client())]
    for host in hosts:
        self.app.send_task(
            "rootfs.warm_hashes", kwargs={"host": host}, queue=Queue(host_queues(host).bulk), expires=s.warm_interval
        )
    return {"sent": hosts}


@app.task(name="rootfs.ping")
def ping(host: str | None = None) -> dict[str, Any]:
    """Does nothing but answer: the floor against which the other tasks' latency is measured."""
    return {"host": _check_host(host)}

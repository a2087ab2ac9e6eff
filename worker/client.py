"""What a VM scheduler calls: send a job to a host's queue, wait for its JSON result or its error.

    client = RootfsClient(app)
    rootfs = client.clone(host="hv-12", vm_id="vm-42", stack="node-20").result(timeout=60)

A failure comes back as the worker's own RootfsError subclass (same type name, same message and data);
a failure that is not ours (a crash, a time limit) as RemoteError; no answer in time as TaskTimeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu import Queue
from kombu.exceptions import OperationalError

from worker.errors import RemoteError, RootfsError, TaskTimeout
from worker.service.hosts import live_hosts
from worker.service.queues import host_queues

#: Pause before waiting again when Redis dropped the connection under a waiting client.
RECONNECT_PAUSE_S = 0.5

#: Default expiry of a clone job, seconds (see RootfsClient.clone).
CLONE_EXPIRES_S = 600.0

#: Called with the meta of each PROGRESS update: {"stack", "done", "total"}.
ProgressHandler = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class JobHandle:
    """One job sent to one host."""

    result_handle: AsyncResult
    task: str
    host: str

    @property
    def id(self) -> str:
        return str(self.result_handle.id)

    def result(self, *, timeout: float | None = None, on_progress: ProgressHandler | None = None) -> Any:
        """The job's JSON result; raises its error, or TaskTimeout when none came within `timeout`."""

        def on_message(body: dict[str, Any]) -> None:
            if on_progress is not None and body.get("status") == "PROGRESS" and isinstance(body.get("result"), dict):
                on_progress(body["result"])

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self.result_handle.get(
                    timeout=remaining, propagate=True, on_message=on_message, disable_sync_subtasks=False
                )
            except CeleryTimeout:
                raise TaskTimeout(self.id, float(timeout or 0)) from None
            except RootfsError:
                raise
            except (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError) as exc:
                # Redis went away while we waited: the job goes on and its result will be stored once Redis is
                # back, so keep waiting until our own deadline.
                if deadline is not None and time.monotonic() + RECONNECT_PAUSE_S >= deadline:
                    raise TaskTimeout(self.id, float(timeout or 0)) from exc
                time.sleep(RECONNECT_PAUSE_S)
            except Exception as exc:
                raise RemoteError(type(exc).__name__, str(exc)) from exc


class RootfsClient:
    def __init__(self, app: Celery) -> None:
        self._app = app

    def clone(self, *, host: str, vm_id: str, stack: str, expires: float | None = CLONE_EXPIRES_S) -> JobHandle:
        """A clone not started within `expires` seconds is dropped by the worker: a scheduler that waited
        that long has given up, and a late clone would only leave a disk for a VM that never booted."""
        return self._send("rootfs.clone_for_vm", host=host, kwargs={"vm_id": vm_id, "stack": stack}, expires=expires)

    def release(self, *, host: str, vm_id: str, force: bool = False) -> JobHandle:
        """Refused with CloneInUse while a process (a running VM) holds the disk open, unless `force`."""
        kwargs: dict[str, Any] = {"vm_id": vm_id}
        if force:
            kwargs["force"] = True  # only when asked: an older worker still takes the plain message
        return self._send("rootfs.release_vm", host=host, kwargs=kwargs)

    def clones(self, *, host: str) -> JobHandle:
        """Every VM directory on the host: [{vm_id, dir, stack, source_sha256, stale, size_bytes,
        allocated_bytes, created, modified, in_use, pids, state}]."""
        return self._send("rootfs.list_clones", host=host, kwargs={})

    def reconcile(self, *, host: str, keep: list[str], older_than: float = 600.0, dry_run: bool = True) -> JobHandle:
        """Release the host's clones whose vm id is not in `keep` (a dry run unless `dry_run=False`):
        {released, kept, in_use, too_young, failed: {vm_id: error}, dry_run, host}."""
        kwargs = {"keep": keep, "older_than": older_than, "dry_run": dry_run}  # the worker checks it
        # The bulk queue: a sweep of thousands of releases is not latency-critical and must not hold a pool
        # process that a clone is waiting for.
        return self._send("rootfs.reconcile", host=host, kwargs=kwargs, bulk=True)

    def stacks(self, *, host: str) -> JobHandle:
        return self._send("rootfs.scan_stacks", host=host, kwargs={})

    def warm(self, *, host: str) -> JobHandle:
        return self._send("rootfs.warm_hashes", host=host, kwargs={}, bulk=True)

    def ping(self, *, host: str) -> JobHandle:
        return self._send("rootfs.ping", host=host, kwargs={})

    def hosts(self) -> list[dict[str, Any]]:
        """Hosts whose workers announced themselves within their heartbeat TTL, each with its inventory for
        placement: free_bytes, total_bytes, reflink, clones, stacks {name: sha256 or None when cold}."""
        client = redis.Redis.from_url(str(self._app.conf.broker_url), socket_connect_timeout=5, socket_timeout=10)
        try:
            return live_hosts(client)
        finally:
            client.close()

    def _send(
        self, task: str, *, host: str, kwargs: dict[str, Any], bulk: bool = False, expires: float | None = None
    ) -> JobHandle:
        queues = host_queues(host)
        handle = self._app.send_task(
            task,
            kwargs={**kwargs, "host": host},
            # A Queue, not a name: a name must be in this app's task_queues, and must not be added there
            # (task_create_missing_queues is off so that no process ever starts consuming another host's).
            queue=Queue(queues.bulk if bulk else queues.fast),
            expires=expires,
        )
        return JobHandle(handle, task, host)

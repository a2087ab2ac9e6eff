"""What a VM scheduler calls: send a job to a host's queue, wait for its JSON result or its error.

    client = RootfsClient(app)
    rootfs = client.clone(host="hv-12", vm_id="vm-42", stack="node-20").result(timeout=60)

A failure comes back as the worker's own RootfsError subclass (same type name, same message and data);
a failure that is not ours (a crash, a time limit) as RemoteError; no answer in time as TaskTimeout.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from celery.states import READY_STATES
from kombu import Queue
from kombu.exceptions import OperationalError

from worker.errors import RemoteError, RootfsError, TaskTimeout
from worker.service.connection import close_redis, redis_for_app, scheme
from worker.service.hosts import live_hosts
from worker.service.preflight import diagnose
from worker.service.queues import host_queues

#: While waiting for a result, look for it in Redis this often too, seconds (see JobHandle._wait).
STORED_CHECK_S = 1.0

#: Pause before waiting again when Redis dropped the connection under a waiting client.
RECONNECT_PAUSE_S = 0.5

#: How long a send keeps trying while Redis is unreachable (a restart, a Sentinel failover), seconds.
SEND_RETRY_S = 20.0
SEND_RETRY_PAUSE_S = 0.5

#: Default expiry of a clone job, seconds (see RootfsClient.clone).
CLONE_EXPIRES_S = 600.0

#: Called with the meta of each PROGRESS update: {"stack", "done", "total"}.
ProgressHandler = Callable[[dict[str, Any]], None]


@dataclass
class JobHandle:
    """One job sent to one host."""

    result_handle: AsyncResult
    task: str
    host: str
    #: Sends the same job again, under the same id (see `result(resubmit=...)`); None: not resubmittable.
    resend: Callable[[], object] | None = field(default=None, repr=False, compare=False)
    #: How many times `result` sent this job again.
    resubmitted: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        return str(self.result_handle.id)

    def result(
        self, *, timeout: float | None = None, on_progress: ProgressHandler | None = None, resubmit: int = 0
    ) -> Any:
        """The job's JSON result; raises its error, or TaskTimeout when none came within `timeout`.

        With `resubmit=N`, a job whose result has not come within `timeout` is sent again, up to N times (so the
        wait is at most (N + 1) x timeout). Redis replicates asynchronously: after a failover the new master may
        have lost a job, or a result, that the old one had acknowledged; sending it again is safe for an
        idempotent job (a clone: the per-VM lock and the stamp make a duplicate converge on one disk). The job
        keeps its id, so whichever copy answers first is the result."""
        for attempt in range(resubmit + 1):
            try:
                return self._wait(timeout, on_progress)
            except TaskTimeout:
                if attempt == resubmit or self.resend is None:
                    raise
                self.resend()
                self.resubmitted += 1
        raise AssertionError("unreachable")

    def _wait(self, timeout: float | None, on_progress: ProgressHandler | None) -> Any:
        on_message = _progress_forwarder(on_progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # In slices: a result whose Pub/Sub message was missed (published while the subscription was being
            # re-made, as in a failover) is in Redis all the same; one GET per slice finds it.
            # Never 0: Celery reads a timeout of 0 as "no timeout" and would wait for ever.
            step = STORED_CHECK_S if remaining is None else max(0.01, min(STORED_CHECK_S, remaining))
            try:
                return self.result_handle.get(
                    timeout=step, propagate=True, on_message=on_message, disable_sync_subtasks=False
                )
            except CeleryTimeout:
                if self._stored():
                    continue  # now cached on the handle: the next get() returns (or raises) it at once
                if deadline is not None and time.monotonic() >= deadline:
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

    def _stored(self) -> bool:
        """Is the job's final state in the result backend? (Reads it with one GET, and caches it on the handle.)"""
        try:
            return str(self.result_handle.state) in READY_STATES
        except (redis.RedisError, OperationalError, OSError):
            return False


def _progress_forwarder(on_progress: ProgressHandler | None) -> Callable[[dict[str, Any]], None]:
    """Celery's on_message callback: hands the meta of each PROGRESS update to `on_progress`."""

    def on_message(body: dict[str, Any]) -> None:
        if on_progress is not None and body.get("status") == "PROGRESS" and isinstance(body.get("result"), dict):
            on_progress(body["result"])

    return on_message


class RootfsClient:
    def __init__(self, app: Celery) -> None:
        self._app = app
        self._redis_checked = False

    def _check_redis(self) -> None:
        """Before the first send, one PING to the broker and the result backend with the app's settings: a refused
        password, ACL or certificate is raised at once as OperationalError with a clear sentence, instead of
        after Celery's reconnection retries (minutes: the result backend subscribes before the job is sent)."""
        if self._redis_checked:
            return
        conf = self._app.conf
        for url, tls, transport in (
            (conf.broker_url, conf.broker_use_ssl, conf.broker_transport_options),
            (conf.result_backend, conf.redis_backend_use_ssl, conf.result_backend_transport_options),
        ):
            if scheme(str(url)) in ("redis", "rediss", "sentinel"):
                problem = diagnose(str(url), tls=tls or None, master_name=(transport or {}).get("master_name"))
                if problem is not None:
                    raise OperationalError(problem)
        self._redis_checked = True

    def gather(self, handles: list[JobHandle], *, timeout: float, resubmit: int = 0) -> list[Any]:
        """The results of many jobs, in order: like `handle.result(timeout=..., resubmit=...)` for each, but the
        `timeout` is shared by all the jobs of a round, so a burst costs at most (resubmit + 1) x timeout however
        many jobs were lost: each round waits for all, then sends every job still unanswered again at once."""
        results: dict[int, Any] = {}
        for attempt in range(resubmit + 1):
            deadline = time.monotonic() + timeout
            for i, handle in enumerate(handles):
                if i in results:
                    continue
                try:
                    results[i] = handle._wait(max(0.0, deadline - time.monotonic()), None)
                except TaskTimeout:
                    continue
            missing = [h for i, h in enumerate(handles) if i not in results]
            if not missing:
                break
            if attempt == resubmit or any(h.resend is None for h in missing):
                raise TaskTimeout(missing[0].id, float(timeout))
            for handle in missing:
                assert handle.resend is not None
                handle.resend()
                handle.resubmitted += 1
        return [results[i] for i in range(len(handles))]

    def clone(self, *, host: str, vm_id: str, stack: str, expires: float | None = CLONE_EXPIRES_S) -> JobHandle:
        """A clone not started within `expires` seconds is dropped by the worker: a scheduler that waited
        that long has given up, and a late clone would only leave a disk for a VM that never booted.

        Idempotent, so its handle can resubmit it: `.result(timeout=..., resubmit=N)`."""
        handle = self._send("rootfs.clone_for_vm", host=host, kwargs={"vm_id": vm_id, "stack": stack}, expires=expires)
        handle.resend = lambda: self._send(
            "rootfs.clone_for_vm", host=host, kwargs={"vm_id": vm_id, "stack": stack}, expires=expires, job_id=handle.id
        )
        return handle

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
        client = redis_for_app(self._app.conf)
        try:
            return live_hosts(client)
        finally:
            close_redis(client)

    def _send(
        self,
        task: str,
        *,
        host: str,
        kwargs: dict[str, Any],
        bulk: bool = False,
        expires: float | None = None,
        job_id: str | None = None,
    ) -> JobHandle:
        self._check_redis()
        queues = host_queues(host)
        # The id is chosen here so that a send retried after a lost reply is the same job, not a second one.
        job_id = job_id or str(uuid.uuid4())
        deadline = time.monotonic() + SEND_RETRY_S
        while True:
            try:
                handle = self._app.send_task(
                    task,
                    kwargs={**kwargs, "host": host},
                    # A Queue, not a name: a name must be in this app's task_queues, and must not be added there
                    # (task_create_missing_queues is off so that no process ever starts consuming another host's).
                    queue=Queue(queues.bulk if bulk else queues.fast),
                    expires=expires,
                    task_id=job_id,
                )
                return JobHandle(handle, task, host)
            except OperationalError as exc:
                # kombu retries a publish only briefly, and not at all when the connection was already lost by a
                # previous send; a Sentinel failover takes seconds. Keep trying until our own deadline, unless
                # Redis said the settings are wrong (password, ACL, certificate): that will not pass.
                if time.monotonic() >= deadline or _misconfigured(exc):
                    raise
                time.sleep(SEND_RETRY_PAUSE_S)


def _misconfigured(exc: BaseException) -> bool:
    """Whether a send failed on our settings (refused credentials or rights, a certificate), not on an outage."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, (redis.AuthenticationError, redis.exceptions.NoPermissionError, ssl.SSLError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False

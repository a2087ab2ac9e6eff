"""Around every job attempt: its metrics and one log line a machine can read.

The tasks call `observe(...)` once, around the call into the core; everything a metric or the log needs
comes from the core (`VmRootfs.method`, a `WarmReport`, the registry's running `HashWork`, whose difference
across the job counts also the hashing of an attempt that failed afterwards) or from the exception, so
neither the tasks nor the core know about metrics.

The log line is logfmt (`key=value`, values quoted as JSON strings when they hold spaces, quotes, `=` or
are empty), always the same keys in the same order, `-` for a value that does not apply:

    job task=clone_for_vm vm_id=vm-42 stack=node-20 method=copy outcome=ok seconds=0.004213 host=hv-12 ...

so that `grep 'job .* vm_id=vm-42 '` gives one VM's history. `outcome` is `ok`, `permanent` (a retry
cannot help; the job failed) or `transient` (with `retry=yes` when another attempt follows).

The metrics of an attempt are recorded once its result is on its way, not before: `observe` leaves them in
this process's pending list, and RootfsTask.after_return (which Celery calls after storing the result, and
before the pool process tells the worker the job ended) records them with `flush`. Recording costs tens
of microseconds, a few percent of a reflink clone that takes about a millisecond, and the caller need not
wait for it; a scrape still sees every attempt once the worker counts no job in progress.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery.exceptions import Retry

from worker.core.models import HashWork, VmRootfs, WarmReport
from worker.errors import RootfsError
from worker.service import metrics, runtime

T = TypeVar("T")

log = logging.getLogger("rootfs.jobs")

FIELDS = ("task", "vm_id", "stack", "method", "outcome", "seconds", "host", "attempt", "retry", "error", "id")
#: A vm id or stack comes from the message as sent: a hostile one must not flood the log.
MAX_VALUE = 256
_PLAIN = re.compile(r"[^\s\"=\\]+")


def logfmt(values: dict[str, Any]) -> str:
    """`key=value ...` in FIELDS order; a value that would not read back as one token is JSON-quoted."""
    parts = []
    for key in FIELDS:
        value = values.get(key)
        text = "-" if value is None else str(value)[:MAX_VALUE]
        if not _PLAIN.fullmatch(text) or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


#: Recordings of finished attempts, made by `flush` once the attempt's result is stored.
_pending: list[Callable[[], None]] = []


def flush() -> None:
    """Record the metrics that finished attempts left; never raises (a metric must not fail a job)."""
    while _pending:
        record = _pending.pop(0)
        try:
            record()
        except Exception:  # logged; the job's outcome stands
            log.exception("recording a job's metrics failed")


def observe(
    call: Callable[[], T],
    *,
    task: str,
    host: str,
    task_id: str | None,
    attempt: int,
    vm_id: object = None,
    stack: object = None,
) -> T:
    """Run one attempt of a job (`call` raises Celery's Retry when a retry was scheduled) and record it."""
    name = task.rpartition(".")[2]
    flush()  # what an attempt before left, had nothing flushed it (a caller outside a Celery task)
    recorder = metrics.for_this_process()
    line: dict[str, Any] = {
        "task": name,
        "vm_id": vm_id,
        "stack": stack,
        "host": host,
        "attempt": attempt,
        "id": task_id,
    }
    hashed_before = runtime.registry().hash_work if recorder is not None else HashWork()
    started = time.perf_counter()
    try:
        value = call()
    except BaseException as exc:
        seconds = time.perf_counter() - started
        retrying = isinstance(exc, Retry)
        reason = getattr(exc, "exc", None) if retrying else None
        cause = reason if isinstance(reason, BaseException) else exc
        transient = isinstance(cause, RootfsError) and cause.transient
        outcome = "transient" if transient else "permanent"
        if recorder is not None:
            hashed = runtime.registry().hash_work - hashed_before
            error = type(cause).__name__
            _pending.append(
                functools.partial(_record_failure, recorder, name, seconds, outcome, error, retrying, hashed)
            )
        line.update(outcome=outcome, seconds=f"{seconds:.6f}", retry="yes" if retrying else "no")
        line["error"] = type(cause).__name__
        log.warning("job %s", logfmt(line))
        raise
    seconds = time.perf_counter() - started
    method = value.method if isinstance(value, VmRootfs) else None
    if recorder is not None:
        hashed = runtime.registry().hash_work - hashed_before
        warmed = time.time() if isinstance(value, WarmReport) and not value.busy and not value.failed else None
        _pending.append(functools.partial(_record_success, recorder, name, seconds, method or "none", hashed, warmed))
    line.update(method=method, outcome="ok", seconds=f"{seconds:.6f}", retry="no")
    log.info("job %s", logfmt(line))
    return value


def _record_success(
    recorder: metrics.JobMetrics, task: str, seconds: float, method: str, hashed: HashWork, warmed: float | None
) -> None:
    _durations(recorder, task, seconds, "ok", method)
    recorder.hashing(hashed)
    if warmed is not None:
        recorder.warm_succeeded(warmed)


def _record_failure(
    recorder: metrics.JobMetrics,
    task: str,
    seconds: float,
    outcome: str,
    error_type: str,
    retrying: bool,
    hashed: HashWork,
) -> None:
    recorder.error(task, error_type, transient=outcome == "transient")
    if retrying:
        recorder.retry(task)
    _durations(recorder, task, seconds, outcome, "none")
    recorder.hashing(hashed)


def _durations(recorder: metrics.JobMetrics, task: str, seconds: float, outcome: str, method: str) -> None:
    if task == "clone_for_vm":
        recorder.clone(seconds, method=method, outcome=outcome)
    elif task == "release_vm":
        recorder.release(seconds, outcome=outcome)

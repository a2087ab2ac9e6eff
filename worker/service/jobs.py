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
"""

from __future__ import annotations

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
            recorder.error(name, type(cause).__name__, transient=transient)
            if retrying:
                recorder.retry(name)
            _durations(recorder, name, seconds, outcome, "none")
            recorder.hashing(runtime.registry().hash_work - hashed_before)
        line.update(outcome=outcome, seconds=f"{seconds:.6f}", retry="yes" if retrying else "no")
        line["error"] = type(cause).__name__
        log.warning("job %s", logfmt(line))
        raise
    seconds = time.perf_counter() - started
    method = value.method if isinstance(value, VmRootfs) else None
    if recorder is not None:
        _durations(recorder, name, seconds, "ok", method or "none")
        recorder.hashing(runtime.registry().hash_work - hashed_before)
        if isinstance(value, WarmReport) and not value.busy and not value.failed:
            recorder.warm_succeeded(time.time())
    line.update(method=method, outcome="ok", seconds=f"{seconds:.6f}", retry="no")
    log.info("job %s", logfmt(line))
    return value


def _durations(recorder: metrics.JobMetrics, task: str, seconds: float, outcome: str, method: str) -> None:
    if task == "clone_for_vm":
        recorder.clone(seconds, method=method, outcome=outcome)
    elif task == "release_vm":
        recorder.release(seconds, outcome=outcome)

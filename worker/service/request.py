"""How a worker turns a message from Redis into a job: the defences a stock Celery 5.7 request lacks.

The first line is the transport (worker/service/transport.py), which refuses any item that is not a task
message this worker can run before Celery reads it. SafeRequest is the second: should a message that passed
still fail to unpack, it is refused here with the same outcome (a FAILURE under its id), not a dead worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.request import Request

from worker.service import jobs
from worker.service.refusals import store_refusal

log = logging.getLogger(__name__)


class SafeRequest(Request):  # type: ignore[misc]
    """Celery 5.7 unpacks a JSON body that is not `[args, kwargs, embed]` (or lacks an `id`) outside its
    own error handling, and the ValueError/KeyError ends the worker, or loops it on reconnects; the message
    goes back to the queue and kills the next worker too. As InvalidTaskError it is logged and dropped."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            reason = f"malformed task message: {exc!r}"
            headers = kwargs.get("headers") or getattr(message, "headers", None)
            task_id = headers.get("id") if isinstance(headers, dict) else None
            app = kwargs.get("app")
            if isinstance(task_id, str) and task_id and app is not None:
                try:
                    store_refusal(app, task_id, reason)
                except Exception as store_exc:  # noqa: BLE001 - best effort; the refusal itself must go on
                    log.warning("could not store the FAILURE of refused message %s: %r", task_id, store_exc)
            raise InvalidTaskError(reason) from exc


class RootfsTask(Task):  # type: ignore[misc]
    Request = "worker.service.request:SafeRequest"

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        """The result is stored: now record the attempt's metrics (worker.service.jobs), off the caller's path."""
        jobs.flush()

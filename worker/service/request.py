"""How a worker turns a message from Redis into a job: the defences a stock Celery 5.7 request lacks."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.request import Request


class SafeRequest(Request):  # type: ignore[misc]
    """Celery 5.7 unpacks a JSON body that is not `[args, kwargs, embed]` (or lacks an `id`) outside its
    own error handling, and the ValueError/KeyError ends the worker, or loops it on reconnects; the message
    goes back to the queue and kills the next worker too. As InvalidTaskError it is logged and dropped."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidTaskError(f"malformed task message: {exc!r}") from exc


class RootfsTask(Task):  # type: ignore[misc]
    Request = "worker.service.request:SafeRequest"

"""What becomes of a queue item the worker refuses: a FAILURE under its id and a `task-failed` event.

The transport (worker/service/transport.py) refuses the item but has no app; this consumer step hands it a
handler bound to the running consumer, so that the FAILURE goes through the app's result backend (a waiting
client learns the reason at once) and the event through the consumer's own dispatcher (Flower and
`celery events` show the refusal, as Celery does for a job naming an unknown task).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps

from worker.errors import InvalidMessage
from worker.service import transport


def store_refusal(app: Celery, task_id: str, reason: str) -> None:
    """Store FAILURE(InvalidMessage) under `task_id`: a client waiting on it gets the reason, not a timeout."""
    app.backend.mark_as_failure(task_id, InvalidMessage(task_id, reason), request=None, call_errbacks=False)


def report_refusal(consumer: Any, _queue: str, task_id: str, reason: str) -> None:
    store_refusal(consumer.app, task_id, reason)
    dispatcher = consumer.event_dispatcher
    if dispatcher is not None and dispatcher.enabled:
        error = InvalidMessage(task_id, reason)
        dispatcher.send("task-failed", uuid=task_id, exception=repr(error), traceback=None)


class RefusalReporting(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: while the consumer runs, refused items are reported through it."""

    requires = ("celery.worker.consumer.events:Events",)

    def start(self, c: Any) -> None:
        transport.set_drop_handler(lambda queue, task_id, reason: report_refusal(c, queue, task_id, reason))

    def shutdown(self, c: Any) -> None:
        transport.set_drop_handler(None)

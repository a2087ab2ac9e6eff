"""`python -m tests.send_job TASK QUEUE KWARGS_JSON`: send one job with the settings of the environment and exit.

A separate process, because Celery's signing serializer is global to a process: the signed test client, an
intruder signing with its own key and an unsigned sender cannot share one.
"""

from __future__ import annotations

import json
import sys

from kombu import Queue

from worker.celery import create_app
from worker.service.settings import Settings


def main(argv: list[str]) -> None:
    task, queue, kwargs = argv
    app = create_app(Settings.from_env())
    print(app.send_task(task, kwargs=json.loads(kwargs), queue=Queue(queue)).id)


if __name__ == "__main__":
    main(sys.argv[1:])

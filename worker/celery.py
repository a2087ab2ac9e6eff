"""The Celery app, found by `celery -A worker worker|beat`.

Its configuration is built from `Settings.from_env(os.environ)` the first time Celery reads it (lazily, via
`add_defaults`), so importing this module reads nothing. Every value below was checked against Celery/kombu
5.7's source; the reasons are the comments.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from kombu import Queue

from worker.service import connection, observability, signing
from worker.service.queues import FANOUT_QUEUE, host_queues, worker_queue_names
from worker.service.refusals import RefusalReporting
from worker.service.request import RootfsTask
from worker.service.settings import Settings

TASK_MODULES = ["tasks.rootfs"]


def celery_config(settings: Settings) -> dict[str, Any]:
    s = settings
    transport = {
        # Redis hands an unacknowledged job to another worker after this long: it must exceed the longest
        # a job can run or wait for its retry ETA (Settings.check enforces it).
        "visibility_timeout": s.visibility_timeout,
        # How often a worker sweeps for jobs of dead workers (kombu 5.7: interval x throttle).
        "unacked_restore_interval": s.restore_interval,
        "unacked_restore_throttle": 1,
        # Notice a Redis that vanished without closing the socket, and reconnect.
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
        # Read by worker.service.transport: items of these queues must be task messages this worker can run
        # (anything else is dropped before Celery reads it); a message may not ask for a longer time limit
        # than the worker's, nor an eta so far ahead that the visibility sweep would hand it out again.
        "rootfs_task_queues": worker_queue_names(s.host),
        "rootfs_max_time_limit": s.time_limit,
        "rootfs_max_eta_ahead": s.visibility_timeout - s.time_limit,
        # With signing on, only signed task messages pass the envelope check (worker/service/signing.py).
        "rootfs_content_type": signing.content_type(s),
    }
    conf = {
        "broker_url": s.broker_url,
        # Our transport mends a kombu defect (see transport.py); a sentinel:// broker needs its Sentinel twin.
        "broker_transport": "worker.service.transport:"
        + ("SentinelTransport" if connection.scheme(s.broker_url) == "sentinel" else "Transport"),
        "result_backend": s.result_backend,
        # JSON only, everywhere: with pickle, anyone who can write to Redis runs code on every host.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # A job is acknowledged when it ends, not when it starts: a worker killed mid-clone leaves it queued.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": s.concurrency,
        # Checked in 5.7's source and on a real outage: on a lost connection the worker first tries to
        # requeue its unacknowledged jobs, then (if this is True) kills the running ones. With Redis down
        # the requeue fails, so a killed clone would only come back after the visibility timeout. False lets
        # a running clone finish and store its result once Redis is back; a requeued duplicate is harmless
        # (per-VM lock, idempotent clone), and a stale one past the client's `expires` is dropped.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {**transport, **connection.sentinel_transport_options(s, s.broker_url)},
        "result_backend_transport_options": {
            "visibility_timeout": s.visibility_timeout,
            "retry_policy": {"max_retries": 30, "interval_start": 0, "interval_step": 1, "interval_max": 5},
            **connection.sentinel_transport_options(s, s.result_backend),
        },
        # Storing a result reads the old one first, outside the backend's retry_policy: without these a
        # clone that finishes while Redis restarts is lost as "Exception raised outside body".
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_base_sleep_between_retries_ms": 200,
        "result_backend_max_sleep_between_retries_ms": 5000,
        "redis_socket_connect_timeout": 5,
        "redis_socket_keepalive": True,
        "redis_retry_on_timeout": True,
        "result_expires": s.result_expires,
        "result_extended": True,
        "task_track_started": True,
        "task_time_limit": s.time_limit,
        "task_soft_time_limit": s.soft_time_limit,
        # This host's queues only; anything sent without a queue goes to this host's fast queue.
        "task_queues": [Queue(name) for name in worker_queue_names(s.host)],
        "task_default_queue": host_queues(s.host).fast,
        "task_create_missing_queues": False,
        "task_routes": {"rootfs.fanout_warm": {"queue": FANOUT_QUEUE}},
        # Events on, so Flower and `celery events` show every job.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": {
            "warm-every-live-host": {
                "task": "rootfs.fanout_warm",
                "schedule": s.warm_interval,
                "options": {"queue": FANOUT_QUEUE, "expires": s.warm_interval},
            }
        },
        "timezone": "UTC",
    }
    # TLS (broker_use_ssl, redis_backend_use_ssl) and message signing (the auth serializer), when configured.
    return {**conf, **connection.celery_options(s), **signing.celery_options(s)}


def create_app(settings: Settings | None = None) -> Celery:
    """An app configured from `settings`, or lazily from the environment when none is given."""
    app = Celery("rootfs", include=TASK_MODULES, set_as_current=settings is None, task_cls=RootfsTask)
    # Queue items the transport refuses get a FAILURE under their id and a task-failed event.
    app.steps["consumer"].add(RefusalReporting)
    if settings is None:
        app.add_defaults(lambda: celery_config(Settings.from_env(os.environ)))
    else:
        app.conf.update(celery_config(settings))
    signing.install(app)
    observability.install(app)  # heartbeat file, readiness, metrics server: worker.service.observability
    return app


app = create_app()

# Worker lifecycle hooks (heartbeat, warm-up on start) are connected by importing the module.
import worker.service.lifecycle  # noqa: E402
import worker.service.preflight  # noqa: E402,F401  (start-up check of the Redis settings)

"""A scheduler's client written from docs/protocol.md alone: the `redis` package, json and base64, no Celery.

It is what a Go, Rust or Node scheduler would write, kept in Python so the suite can run it; nothing here
imports worker, celery or kombu. The hostile-message tests use it to write raw items too.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

#: States after which a result no longer changes (docs/protocol.md, "Waiting for the result").
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def queue_for(host: str, task: str) -> str:
    """docs/protocol.md, "Queues": warm-ups and reconcile go to the bulk queue, the rest to the fast queue."""
    bulk = task in ("rootfs.warm_hashes", "rootfs.reconcile")
    return f"rootfs.host.{host}.bulk" if bulk else f"rootfs.host.{host}"


def envelope(
    task: str,
    kwargs: dict[str, Any],
    *,
    queue: str,
    task_id: str | None = None,
    expires_in: float | None = 600.0,
    args: list[Any] | None = None,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """docs/protocol.md, "The message": the envelope of a protocol 2 task message, ready for LPUSH."""
    task_id = task_id or str(uuid.uuid4())
    body = [args or [], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    expires = None
    if expires_in is not None:
        expires = (datetime.now(UTC) + timedelta(seconds=expires_in)).isoformat()
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "go",
            "task": task,
            "id": task_id,
            "expires": expires,
            # Informational only: what Flower shows as the job's arguments.
            "argsrepr": json.dumps(args or []),
            "kwargsrepr": json.dumps(kwargs),
            **(headers or {}),
        },
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": queue},
        },
    }


class RawClient:
    """Send a job with LPUSH, wait for `celery-task-meta-<id>`."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url)

    def close(self) -> None:
        self.redis.close()

    def send(self, host: str, task: str, kwargs: dict[str, Any], **options: Any) -> str:
        queue = queue_for(host, task)
        message = envelope(task, {**kwargs, "host": host}, queue=queue, **options)
        self.push(queue, json.dumps(message).encode())
        return str(message["headers"]["id"])

    def push(self, queue: str, item: bytes) -> None:
        self.redis.lpush(queue, item)

    def meta(self, task_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"celery-task-meta-{task_id}")
        return None if raw is None else dict(json.loads(raw))

    def wait(self, task_id: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """Subscribe first, then read: a result stored between the two is not missed (docs/protocol.md)."""
        key = f"celery-task-meta-{task_id}"
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(key)
        try:
            deadline = time.monotonic() + timeout
            while True:
                meta = self.meta(task_id)
                if meta is not None and meta["status"] in READY_STATES:
                    return meta
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result for {task_id} within {timeout:g}s (last: {meta})")
                pubsub.get_message(timeout=min(left, 1.0))
        finally:
            pubsub.close()

    def call(self, host: str, task: str, kwargs: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait(self.send(host, task, kwargs), timeout=timeout)

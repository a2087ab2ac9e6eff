"""kombu's Redis transport with the defects that let Redis' contents end a worker mended.

Selected with `broker_transport` (worker/celery.py); the broker URL stays `redis://`.

1. **Any queue item.** kombu 5.7 pops an item with BRPOP and hands `json.loads(item)` to Celery, whose
   reading of the envelope and headers is only partly guarded: a non-JSON item, a JSON list, a missing field or
   a header of the wrong type ends the worker, and a message already taken comes back from the `unacked` set
   to end the next one. Here every item read from a task queue is checked first (worker/service/envelope.py);
   one that fails is logged once with its reason and dropped (it is already off the list and was never in
   `unacked`), and a FAILURE is stored under its id when it has one. Items of other queues (replies, the
   control broadcast) get kombu's envelope check only. Should anything still raise while Celery takes a
   message, the message is dropped the same way instead of ending the worker.
2. **The unacked set.** An entry there that is not `[envelope, exchange, routing_key]` is dropped when it is
   restored, instead of raising inside the restore sweep.
3. **A lost connection.** When Redis goes away while a late-acknowledged job is running, prefetched or waiting
   for its retry ETA, the consumer closes its channel after the connection's client is already gone; the
   channel then builds connection parameters from `None`, and the AttributeError ends the worker. Raising a
   connection error there instead lets kombu's own handling take over: the worker reconnects, and the
   messages, still in Redis' unacked set, come back through the visibility sweep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from worker.service.envelope import (
    CONTENT_TYPE,
    BadMessage,
    Limits,
    check_envelope,
    check_task_message,
    parse_item,
)

log = logging.getLogger(__name__)

#: Called for every dropped item that has a usable task id, with (queue, task id, reason): the worker stores
#: a FAILURE under the id.
DropHandler = Callable[[str, str, str], None]

_drop_handler: DropHandler | None = None

#: How much of a dropped item the log shows.
LOG_ITEM_BYTES = 200


def set_drop_handler(handler: DropHandler | None) -> None:
    """Installed once by the worker at start (it needs the app's result backend; the transport has no app)."""
    global _drop_handler
    _drop_handler = handler


def _dropped(queue: str, task_id: str | None, reason: str, item: Any) -> None:
    shown = item if isinstance(item, bytes | str) else repr(item)
    log.error(
        "dropped a message from %s (task id %s): %s; item starts %r",
        queue,
        task_id,
        reason,
        shown[:LOG_ITEM_BYTES],
    )
    handler = _drop_handler
    if handler is not None and task_id is not None:
        try:
            handler(queue, task_id, reason)
        except Exception as exc:  # noqa: BLE001 - storing the FAILURE is best effort; the worker must go on
            log.warning("could not store the FAILURE of dropped message %s: %r", task_id, exc)


def _unacked_entry(raw: bytes | str) -> tuple[dict[str, Any], str, str] | None:
    """An unacked-set entry as kombu writes it, or None (logged) when it is anything else."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        entry = None
    if (
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], dict)
        and isinstance(entry[1], str)
        and isinstance(entry[2], str)
    ):
        return entry[0], entry[1], entry[2]
    log.error("dropped an unacked entry that is not [envelope, exchange, routing_key]: %r", raw[:LOG_ITEM_BYTES])
    return None


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu 5.7's, with an entry it cannot read removed instead of raising (in the restore sweep)."""

        def restore_transaction(pipe: Any) -> None:
            raw = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if raw:
                entry = _unacked_entry(raw)
                if entry is not None:
                    self.channel._do_restore_message(*entry, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as conn:
            conn.transaction(restore_transaction, self.unacked_key)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS

    #: Set from broker_transport_options (worker/celery.py): the queues whose items must be task messages,
    #: and what the worker can honour.
    rootfs_task_queues: tuple[str, ...] | list[str] = ()
    rootfs_max_time_limit: float | None = None
    rootfs_max_eta_ahead: float | None = None
    #: application/json, or the signing serializer's type when signing is on (worker/service/signing.py).
    rootfs_content_type: str = CONTENT_TYPE

    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "rootfs_task_queues",
        "rootfs_max_time_limit",
        "rootfs_max_eta_ahead",
        "rootfs_content_type",
    )

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("broker connection already closed")
        return super()._connparams(asynchronous=asynchronous)

    # -- reading items -------------------------------------------------------------------------------------

    def admit(self, item: bytes | str, queue: str) -> dict[str, Any] | None:
        """The envelope to deliver, or None when the item was dropped (logged, FAILURE stored)."""
        task_id = None
        try:
            payload = parse_item(item)
            if queue in self.rootfs_task_queues:
                limits = Limits(
                    max_time_limit=self.rootfs_max_time_limit,
                    max_eta_ahead=self.rootfs_max_eta_ahead,
                    content_type=self.rootfs_content_type,
                )
                return check_task_message(payload, queue, limits, now=datetime.now(UTC))
            return check_envelope(payload)
        except BadMessage as exc:
            task_id = exc.task_id
            _dropped(queue, task_id, exc.reason, item)
        return None

    def _deliver_admitted(self, payload: dict[str, Any], queue: str) -> None:
        """Hand a checked envelope to Celery; whatever still raises drops that message, not the worker."""
        try:
            self.connection._deliver(payload, queue)
        except self.connection_errors:
            raise
        except Exception as exc:
            tag = payload["properties"]["delivery_tag"]
            headers = payload.get("headers") or {}
            task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
            log.exception("taking message %s from %s failed", task_id or tag, queue)
            self.qos.reject(tag, requeue=False)
            _dropped(queue, task_id, f"the worker could not take it: {type(exc).__name__}: {exc}", json.dumps(payload))

    def _brpop_read(self, **options: Any) -> bool:
        """kombu 5.7's `_brpop_read`, with the item admitted before it is delivered (tests/service pin the
        copied source: a kombu upgrade that changes the original fails there and brings you here)."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                payload = self.admit(item, dest)
                if payload is None:
                    raise Empty()
                self._deliver_admitted(payload, dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _get(self, queue: str) -> dict[str, Any]:
        """kombu 5.7's `_get` (the polling path), admitting the item first; a dropped item reads as Empty."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    payload = self.admit(item, queue)
                    if payload is None:
                        raise Empty()
                    return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        """The control broadcast (PUBLISH): kombu parsed it as JSON; check the envelope before building on it."""
        queue = self._fanout_to_queue.get(exchange)
        try:
            if queue is None:
                raise BadMessage(f"no consumer for exchange {exchange!r}")
            check_envelope(message)
        except BadMessage as exc:
            _dropped(queue or exchange, None, exc.reason, repr(message))
            raise Empty() from None
        self._deliver_admitted(message, queue)
        return True

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        """kombu 5.7's, with an unreadable unacked entry removed instead of raising."""
        if not self.ack_emulation:
            super()._restore(message, leftmost)
            return
        tag = message.delivery_tag

        def restore_transaction(pipe: Any) -> None:
            raw = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            pipe.hdel(self.unacked_key, tag)
            if raw:
                entry = _unacked_entry(raw)
                if entry is not None:
                    self._do_restore_message(*entry, pipe, leftmost)

        with self.conn_or_acquire() as client:
            client.transaction(restore_transaction, self.unacked_key)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


# Sentinel (issue 13): a `sentinel://` broker URL needs kombu's SentinelChannel, which finds the master through
# the sentinels. Ours is both: the mended Channel above first in the MRO, so every fix made to it applies to
# Sentinel too, then kombu's SentinelChannel for the pool. Selected in worker/celery.py by the URL's scheme.
class SentinelChannel(Channel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    # Both lists: ours (rootfs_*) come first in the MRO and would hide master_name, sentinel_kwargs...
    from_transport_options = tuple(
        dict.fromkeys((*Channel.from_transport_options, *kombu_redis.SentinelChannel.from_transport_options))
    )


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel

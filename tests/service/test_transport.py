"""The transport's last line, on its own (fast tier): whatever still raises while Celery takes a message that
passed the check drops that message, reported like any refused item, and never ends the worker."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from tests.service.raw_client import envelope
from worker.service import transport
from worker.service.transport import Channel, _unacked_entry


class _Qos:
    def __init__(self) -> None:
        self.rejected: list[tuple[str, bool]] = []

    def reject(self, tag: str, requeue: bool = False) -> None:
        self.rejected.append((tag, requeue))


def _channel(deliver: Any) -> Any:
    return SimpleNamespace(
        connection=SimpleNamespace(_deliver=deliver), connection_errors=(ConnectionError,), qos=_Qos()
    )


@pytest.fixture
def reported() -> Any:
    seen: list[tuple[str, str, str]] = []
    transport.set_drop_handler(lambda queue, task_id, reason: seen.append((queue, task_id, reason)))
    yield seen
    transport.set_drop_handler(None)


def test_a_message_celery_fails_to_take_is_rejected_and_reported(reported: Any) -> None:
    """An exception from Celery's side rejects (without requeue) that message and stores its FAILURE."""

    def deliver(payload: Any, queue: str) -> None:
        raise TypeError("something Celery did not expect")

    message = envelope("rootfs.ping", {"host": "a"}, queue="rootfs.host.a")
    chan = _channel(deliver)
    Channel._deliver_admitted(chan, message, "rootfs.host.a")
    assert chan.qos.rejected == [(message["properties"]["delivery_tag"], False)]
    assert reported == [
        (
            "rootfs.host.a",
            message["headers"]["id"],
            "the worker could not take it: TypeError: something Celery did not expect",
        )
    ]


def test_connection_errors_still_reach_kombu(reported: Any) -> None:
    """A lost connection is kombu's to handle (reconnect, restore): it is re-raised, nothing is rejected."""

    def deliver(payload: Any, queue: str) -> None:
        raise ConnectionError("gone")

    chan = _channel(deliver)
    with pytest.raises(ConnectionError):
        Channel._deliver_admitted(chan, envelope("rootfs.ping", {}, queue="q"), "q")
    assert chan.qos.rejected == [] and reported == []


def test_a_message_taken_normally_is_not_touched(reported: Any) -> None:
    """The positive case: delivered once, not rejected, nothing reported."""
    got: list[str] = []
    chan = _channel(lambda payload, queue: got.append(queue))
    Channel._deliver_admitted(chan, envelope("rootfs.ping", {}, queue="q"), "q")
    assert got == ["q"] and chan.qos.rejected == [] and reported == []


def test_unacked_entries_are_read_only_in_kombus_shape() -> None:
    """[envelope, exchange, routing_key] is restored; anything else in the unacked set is dropped."""
    good = [envelope("rootfs.ping", {}, queue="q"), "", "q"]
    assert _unacked_entry(json.dumps(good).encode()) == (good[0], "", "q")
    for bad in (b"not json", b"[1, 2, 3]", b'{"a": 1}', json.dumps([good[0], 5, "q"]).encode()):
        assert _unacked_entry(bad) is None

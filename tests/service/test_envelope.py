"""The queue-item check on its own (fast tier): what it admits, what it refuses and why, and that it never
raises anything but BadMessage. The same check with a real worker is in test_hostile_messages.py."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from kombu.transport import redis as kombu_redis

from tests.service.hostile_items import HOSTILE, ITEMS
from tests.service.raw_client import envelope
from worker.service.envelope import BadMessage, Limits, check_envelope, check_task_message, parse_item

QUEUE = "rootfs.host.a"
LIMITS = Limits(max_time_limit=1800, max_eta_ahead=360)


def _check(message: Any) -> dict[str, Any]:
    return check_task_message(parse_item(json.dumps(message).encode()), QUEUE, LIMITS)


def _ping(**headers: Any) -> dict[str, Any]:
    return envelope("rootfs.ping", {"host": "a"}, queue=QUEUE, headers=headers)


def test_a_minimal_message_is_admitted_and_routed_back_to_its_queue() -> None:
    """The documented minimal message passes; its delivery_info is rewritten to the queue it came from."""
    message = _ping()
    message["properties"]["delivery_info"] = {"exchange": "elsewhere", "routing_key": "rootfs.host.b"}
    admitted = _check(message)
    assert admitted["headers"]["task"] == "rootfs.ping"
    assert admitted["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE, "redelivered": False}


@pytest.mark.parametrize(("name", "make"), HOSTILE, ids=[name for name, _ in HOSTILE])
def test_every_named_hostile_item_is_refused_with_its_id(name: str, make: Any) -> None:
    """Each named hostile item raises BadMessage carrying the id the worker stores its FAILURE under."""
    item, task_id = make()
    with pytest.raises(BadMessage) as info:
        check_task_message(parse_item(item), QUEUE, LIMITS)
    assert info.value.task_id == task_id
    assert info.value.reason


def test_timelimit_is_hard_then_soft_and_bounded_by_the_workers() -> None:
    """[hard, soft] each null or in (0, worker limit]; anything else names the offending limit."""
    assert _check(_ping(timelimit=[60, 30]))["headers"]["timelimit"] == [60, 30]
    assert _check(_ping(timelimit=[None, None]))
    assert _check(_ping(timelimit=[1800, None]))
    with pytest.raises(BadMessage, match="hard limit 1801s exceeds"):
        _check(_ping(timelimit=[1801, None]))
    with pytest.raises(BadMessage, match="soft limit must be a number > 0"):
        _check(_ping(timelimit=[10, "5"]))


def test_eta_may_not_outlast_the_visibility_timeout() -> None:
    """An eta within visibility timeout - time limit is admitted; a later one would be redelivered, so not."""
    soon = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    late = (datetime.now(UTC) + timedelta(seconds=600)).isoformat()
    assert _check(_ping(eta=soon))["headers"]["eta"] == soon
    with pytest.raises(BadMessage, match="ahead; at most 360s"):
        _check(_ping(eta=late))
    assert _check(_ping(eta="2001-01-01T00:00:00"))  # past and naive (UTC): runs at once


def test_extension_headers_pass_but_worker_fields_do_not() -> None:
    """A custom header is carried; one that would overwrite the task's request context is refused."""
    assert _check(_ping(**{"x-trace": {"span": "abc"}}))["headers"]["x-trace"] == {"span": "abc"}
    with pytest.raises(BadMessage, match="'delivery_info' is reserved"):
        _check(_ping(delivery_info={"routing_key": "x"}))


def test_other_queues_get_the_envelope_check_only() -> None:
    """A reply or control message needs no task headers, but still the shape kombu builds a Message from."""
    reply = {"body": base64.b64encode(b'{"ok": 1}').decode(), "headers": {}, "properties": {}}
    reply["properties"] = {"delivery_tag": "t", "delivery_info": {"exchange": "x", "routing_key": "y"}}
    assert check_envelope(reply) is reply
    with pytest.raises(BadMessage, match="delivery_tag"):
        check_envelope({"properties": {"delivery_info": {"exchange": "", "routing_key": ""}}})


@settings(max_examples=400, deadline=None, database=None)
@given(item=ITEMS)
def test_the_check_raises_nothing_but_bad_message(item: bytes) -> None:
    """Any generated item either comes out as an envelope Celery can read or as BadMessage, nothing else."""
    try:
        admitted = check_task_message(parse_item(item), QUEUE, LIMITS)
    except BadMessage as exc:
        assert exc.reason
        return
    args, kwargs, embed = json.loads(base64.b64decode(admitted["body"]))
    assert isinstance(args, list) and isinstance(kwargs, dict) and (embed is None or isinstance(embed, dict))
    assert isinstance(admitted["headers"]["id"], str) and admitted["headers"]["task"].startswith("rootfs.")


#: The kombu 5.7 methods worker/service/transport.py copies or overrides, by hash of their source. When a kombu
#: upgrade changes one, this fails: compare the new original with our copy before updating the hash.
PINNED = {
    "Channel._brpop_read": "c42518699709f2df",
    "Channel._get": "be26a9f1eb4cf8da",
    "Channel._restore": "92e63e38835b6592",
    "Channel._deliver_fanout_message": "06662335a70a5b62",
    "QoS.restore_by_tag": "58e161d81b6fe18d",
    "Channel._connparams": "e9a4295085a8fb90",
}


@pytest.mark.parametrize("qualname", sorted(PINNED))
def test_kombu_methods_we_copy_are_unchanged(qualname: str) -> None:
    """The originals of the transport's copied methods are the ones the copies were made from."""
    cls_name, method = qualname.split(".")
    source = inspect.getsource(getattr(getattr(kombu_redis, cls_name), method))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == PINNED[qualname]

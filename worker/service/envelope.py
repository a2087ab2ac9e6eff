"""The one check every queue item passes before kombu or Celery touch it.

kombu 5.7 reads a Redis queue item with `json.loads` and builds its Message from the result; Celery 5.7 then
indexes the headers, unpacks `timelimit`, parses `eta`/`expires`, and splits the body into `[args, kwargs,
embed]`. Many of those steps run outside any error handling: an item that is not JSON, a JSON list, a missing
`properties`, a `timelimit` of `5`, an unhashable `task`... ends the worker ("Unrecoverable error"), and
since a taken job waits in Redis' `unacked` set, it comes back after a restart and ends the next worker too.

So the item is checked here against protocol 2 as this worker speaks it (docs/protocol.md), strictly, in one
pass over already-parsed JSON: anything the worker could misread is refused with a reason, never read
leniently. In particular a `timelimit` it cannot use is refused: a clone must never run under limits the
worker did not understand. What passes is safe for every later step; what fails is dropped by the transport.

The check costs a few tens of microseconds per message (bench/queue_bench.py measures it).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware
from kombu.utils.json import loads as kombu_loads

#: Largest queue item accepted. A clone job is well under 1 KiB; this bounds what one item can cost.
MAX_ITEM_BYTES = 1 << 20

#: Deepest nesting of lists/objects in the body or an extension header. The worker re-serialises these
#: (unacked set, events, results) deeper in its stack than we parse them; a bound keeps that from recursing out.
MAX_DEPTH = 32

#: A task id names the result key `celery-task-meta-<id>`; a delivery tag names a field of the unacked set.
#: Both must be 1 to 255 printable characters (no control characters, no lone surrogates Redis cannot take).
MAX_ID_CHARS = 255

#: Task names this worker runs. Celery's own built-ins (`celery.group`, `celery.chord_unlock`...) are not jobs
#: a scheduler may send; an unknown `rootfs.*` name is left to Celery, which stores NotRegistered.
TASK_NAME_RE = re.compile(r"rootfs\.[a-z_][a-z0-9_]{0,63}")

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
BODY_ENCODING = "base64"

#: The four canvas slots of a protocol 2 body. Workflows are not part of this protocol: each must be null.
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})

_OPTIONAL_STR_HEADERS = (
    "lang",
    "shadow",
    "group",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
)

#: Names a header must not take: Celery copies headers into the task's request context, where these are the
#: worker's own fields (or set by it), or the canvas slots the body's `embed` owns.
_RESERVED_HEADERS = frozenset(
    {
        "args",
        "kwargs",
        "callbacks",
        "errbacks",
        "chain",
        "chord",
        "called_directly",
        "is_eager",
        "delivery_info",
        "properties",
        "reply_to",
        "correlation_id",
        "hostname",
        "headers",
        "loglevel",
        "logfile",
        "time_limit",
        "soft_time_limit",
        "utc",
        "taskset",
        "meth",
    }
)

_KNOWN_HEADERS = frozenset(
    {
        "task",
        "id",
        "eta",
        "expires",
        "retries",
        "timelimit",
        "group_index",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
        "redelivered",
        "compression",
        *_OPTIONAL_STR_HEADERS,
    }
)


class BadMessage(ValueError):
    """An item the worker refuses: `reason` says why; `task_id` is set when the item names a usable id."""

    def __init__(self, reason: str, task_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id


@dataclass(frozen=True)
class Limits:
    """What the worker can honour, from its settings (passed through broker_transport_options)."""

    #: The worker's own hard time limit: a message may ask for less, never more (the visibility timeout is
    #: sized for it). None: no bound (a process that does not run tasks).
    max_time_limit: float | None = None
    #: How far ahead an `eta` may be, seconds: a job held longer than visibility timeout - time limit would be
    #: handed to a second worker while the first still holds it. None: no bound.
    max_eta_ahead: float | None = None
    #: The content type task messages must have: JSON, or with message signing on (issue 13) the `auth`
    #: serializer's, whose body is then checked by the signature verification in Celery, not here.
    content_type: str = CONTENT_TYPE


def parse_item(item: bytes | str) -> Any:
    """The item's JSON, or BadMessage: plain `json`, without kombu's `__type__` hooks on the envelope."""
    if len(item) > MAX_ITEM_BYTES:
        raise BadMessage(f"item of {len(item)} bytes exceeds {MAX_ITEM_BYTES}")
    try:
        return json.loads(item)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadMessage(f"item is not JSON: {_short(exc)}") from None


def check_envelope(payload: Any) -> dict[str, Any]:
    """The shape kombu's virtual transport needs to build a Message and track it in the unacked set."""
    if not isinstance(payload, dict):
        raise BadMessage(f"envelope is a JSON {_json_type(payload)}, not an object")
    props = payload.get("properties")
    if not isinstance(props, dict):
        raise BadMessage(f"properties is {_json_type(props)}, not an object")
    tag = props.get("delivery_tag")
    if not _is_id(tag):
        raise BadMessage(
            f"properties.delivery_tag must be 1 to {MAX_ID_CHARS} printable characters, got {_short_value(tag)}"
        )
    info = props.get("delivery_info")
    if not (
        isinstance(info, dict) and isinstance(info.get("exchange"), str) and isinstance(info.get("routing_key"), str)
    ):
        raise BadMessage("properties.delivery_info must be an object with string exchange and routing_key")
    encoding = props.get("body_encoding")
    if encoding is not None and (not isinstance(encoding, str) or encoding.lower() not in ("base64", "utf-8")):
        raise BadMessage(f"properties.body_encoding {_short_value(encoding)} is not base64")
    if not isinstance(props.get("priority"), int | None):
        raise BadMessage("properties.priority must be an integer")
    for key, kind, what in _ENVELOPE_FIELDS:
        if not isinstance(payload.get(key), kind):
            raise BadMessage(f"{key} must be {what}")
    return payload


#: Top-level envelope fields kombu reads, and the JSON types it can read them as.
_ENVELOPE_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("content-type", str | None, "a string"),
    ("content-encoding", str | None, "a string"),
    ("headers", dict | None, "an object"),
    ("body", str | None, "a string"),
)


def check_task_message(payload: Any, queue: str, limits: Limits, *, now: datetime | None = None) -> dict[str, Any]:
    """A protocol 2 task message this worker can run, normalised; BadMessage (with the id when usable) if not.

    The returned envelope's delivery_info names the queue the item was read from: a restore or a retry goes
    back to this host's queue whatever routing the sender wrote.
    """
    task_id = _usable_id(payload)
    try:
        envelope = check_envelope(payload)
        headers = envelope.get("headers")
        if not isinstance(headers, dict):
            raise BadMessage("headers missing: protocol 2 carries the task in headers")
        _check_headers(headers, limits, now)
        _check_properties(envelope["properties"])
        if envelope.get("content-type") != limits.content_type:
            raise BadMessage(
                f"content-type must be {limits.content_type!r}, got {_short_value(envelope.get('content-type'))}"
            )
        if envelope.get("content-encoding") != CONTENT_ENCODING:
            raise BadMessage(
                f"content-encoding must be {CONTENT_ENCODING!r}, got {_short_value(envelope.get('content-encoding'))}"
            )
        if envelope["properties"].get("body_encoding") != BODY_ENCODING:
            raise BadMessage(f"properties.body_encoding must be {BODY_ENCODING!r}")
        if limits.content_type == CONTENT_TYPE:
            _check_body(envelope.get("body"))
        elif not isinstance(envelope.get("body"), str) or not envelope.get("body"):
            raise BadMessage("body must be a non-empty base64 string")
    except BadMessage as exc:
        raise BadMessage(exc.reason, task_id) from None
    props = envelope["properties"]
    info = props["delivery_info"]
    props["delivery_info"] = {"exchange": "", "routing_key": queue, "redelivered": info.get("redelivered") is True}
    return envelope


def _usable_id(payload: Any) -> str | None:
    if isinstance(payload, dict):
        headers = payload.get("headers")
        if isinstance(headers, dict):
            task_id = headers.get("id")
            if _is_id(task_id):
                return str(task_id)
    return None


def _check_headers(headers: dict[str, Any], limits: Limits, now: datetime | None) -> None:
    task = headers.get("task")
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task):
        raise BadMessage(f"header task must name a rootfs.* task, got {_short_value(task)}")
    if not _is_id(headers.get("id")):
        raise BadMessage(
            f"header id must be 1 to {MAX_ID_CHARS} printable characters, got {_short_value(headers.get('id'))}"
        )
    for names, valid, what in _HEADER_TYPES:
        for name in names:
            value = headers.get(name)
            if value is not None and not valid(value):
                raise BadMessage(f"header {name} must be {what} or null, got {_short_value(value)}")
    _check_timelimit(headers.get("timelimit"), limits)
    _check_time(headers, "expires", None)
    _check_time(headers, "eta", limits.max_eta_ahead, now)
    _check_extension_headers(headers)


def _check_extension_headers(headers: dict[str, Any]) -> None:
    """Headers outside the protocol are carried into the task's context: never over the worker's own fields."""
    for name, value in headers.items():
        if name in _KNOWN_HEADERS:
            continue
        if name in _RESERVED_HEADERS or name.startswith("_"):
            raise BadMessage(f"header {name!r} is reserved for the worker")
        if not _depth_ok(value):
            raise BadMessage(f"header {name!r} nests deeper than {MAX_DEPTH}")


def _is_count(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= 1_000_000


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


#: Protocol headers by type: (names, check of a non-null value, what the check wants).
_HEADER_TYPES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (_OPTIONAL_STR_HEADERS, lambda v: isinstance(v, str), "a string"),
    (("retries", "replaced_task_nesting", "group_index"), _is_count, "an integer from 0 to 1000000"),
    (("ignore_result", "redelivered"), lambda v: isinstance(v, bool), "true, false"),
    (("stamped_headers",), _is_str_list, "a list of strings"),
    (("stamps",), lambda v: isinstance(v, dict) and _depth_ok(v), "an object"),
    (("compression",), lambda v: False, "absent (compressed bodies are not supported)"),
)


def _check_timelimit(value: Any, limits: Limits) -> None:
    """[hard, soft] seconds as Celery 5.7 reads them (its protocol page says (soft, hard)); each null or > 0."""
    if value is None:
        return
    if not isinstance(value, list) or len(value) != 2:
        raise BadMessage(f"header timelimit must be [hard, soft] (numbers or null), got {_short_value(value)}")
    for which, limit in zip(("hard", "soft"), value, strict=True):
        if limit is None:
            continue
        if not _is_number(limit) or not math.isfinite(limit) or limit <= 0:
            raise BadMessage(f"header timelimit: {which} limit must be a number > 0 or null, got {_short_value(limit)}")
        if limits.max_time_limit is not None and limit > limits.max_time_limit:
            raise BadMessage(
                f"header timelimit: {which} limit {limit:g}s exceeds the worker's time limit {limits.max_time_limit:g}s"
            )


def _check_time(headers: Mapping[str, Any], name: str, max_ahead: float | None, now: datetime | None = None) -> None:
    """An ISO 8601 date Celery's own parser reads (a naive one is UTC)."""
    value = headers.get(name)
    if value is None:
        return
    if not isinstance(value, str):
        raise BadMessage(f"header {name} must be an ISO 8601 string or null, got {_short_value(value)}")
    if not value:  # Celery reads "" as no date
        return
    try:
        try:
            when: datetime | None = datetime.fromisoformat(value)  # C, ~50x faster; same result where both parse
        except ValueError:
            when = maybe_iso8601(value)  # Celery's own parser (dateutil), for the forms fromisoformat lacks
        if when is None:
            return
        when = maybe_make_aware(when, UTC)
        when.astimezone(UTC)  # Celery converts it: an offset that leaves years 1..9999 raises here, not there
        ahead = (when - (now or datetime.now(UTC))).total_seconds()
    except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        raise BadMessage(f"header {name} {_short_value(value)} is not a date: {_short(exc)}") from None
    if max_ahead is not None and ahead > max_ahead:
        raise BadMessage(f"header {name} is {ahead:.0f}s ahead; at most {max_ahead:g}s is allowed")


def _check_properties(props: dict[str, Any]) -> None:
    for name in ("correlation_id", "reply_to", "expiration"):
        if not isinstance(props.get(name), str | None):
            raise BadMessage(f"properties.{name} must be a string or null")
    mode = props.get("delivery_mode")
    if mode is not None and not _is_int(mode):
        raise BadMessage("properties.delivery_mode must be an integer")
    priority = props.get("priority")
    if priority is not None and (not _is_int(priority) or not 0 <= priority <= 255):
        raise BadMessage("properties.priority must be an integer from 0 to 255")
    if not _depth_ok(props):
        raise BadMessage(f"properties nest deeper than {MAX_DEPTH}")


def _check_body(body: Any) -> None:
    """Decoded exactly as the worker will decode it: base64, UTF-8, kombu's JSON (with its type hooks)."""
    if not isinstance(body, str) or not body:
        raise BadMessage("body must be a non-empty base64 string")
    try:
        decoded = kombu_loads(base64.b64decode(body.encode()).decode("utf-8"))
    except (ValueError, TypeError, RecursionError, binascii.Error, OverflowError, ArithmeticError) as exc:
        raise BadMessage(f"body is not base64 of JSON: {_short(exc)}") from None
    if not isinstance(decoded, list) or len(decoded) != 3:
        raise BadMessage("body must be the JSON array [args, kwargs, embed]")
    args, kwargs, embed = decoded
    if not isinstance(args, list):
        raise BadMessage(f"body args must be an array, got {_json_type(args)}")
    if not isinstance(kwargs, dict):
        raise BadMessage(f"body kwargs must be an object, got {_json_type(kwargs)}")
    if embed is not None:
        if not isinstance(embed, dict) or not embed.keys() <= EMBED_KEYS:
            raise BadMessage("body embed must be null or an object with callbacks, errbacks, chain, chord")
        if any(v not in (None, []) for v in embed.values()):
            raise BadMessage("callbacks, errbacks, chains and chords are not supported: each must be null")
    if not _depth_ok(decoded):
        raise BadMessage(f"body nests deeper than {MAX_DEPTH}")


def _depth_ok(value: Any, limit: int = MAX_DEPTH) -> bool:
    """No list/object nested deeper than `limit`. Recursive, but only `limit` deep; scalars cost nothing."""
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return True
    if limit <= 0:
        return False
    return all(_depth_ok(child, limit - 1) for child in children if isinstance(child, dict | list))


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."

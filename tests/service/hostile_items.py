"""Hostile queue items, named and generated, shared by the validator's fast tests and the real-worker tests.

Everything here is built with json and base64 only (through tests/service/raw_client.py): no kombu.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from tests.service.raw_client import envelope

QUEUE = "rootfs.host.a"


def valid(task: str = "rootfs.ping", kwargs: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    return envelope(task, {"host": "a"} if kwargs is None else kwargs, queue=QUEUE, **options)


def _with(path: str, value: Any, *, delete: bool = False) -> Callable[[], tuple[bytes, str | None]]:
    """A valid ping whose field at `path` ("headers.timelimit", "properties.delivery_tag"...) is `value`."""

    def make() -> tuple[bytes, str | None]:
        message = valid()
        *parents, leaf = path.split(".")
        node = message
        for key in parents:
            node = node[key]
        if delete:
            node.pop(leaf, None)
        else:
            node[leaf] = value
        task_id = message["headers"].get("id") if isinstance(message.get("headers"), dict) else None
        usable = task_id if isinstance(task_id, str) and 0 < len(task_id) <= 255 and task_id.isprintable() else None
        return json.dumps(message).encode(), usable

    return make


def _body(raw: bytes) -> Callable[[], tuple[bytes, str | None]]:
    """A valid ping whose body is base64 of `raw`."""

    def make() -> tuple[bytes, str | None]:
        message = valid()
        message["body"] = base64.b64encode(raw).decode()
        return json.dumps(message).encode(), message["headers"]["id"]

    return make


def _raw(item: bytes) -> Callable[[], tuple[bytes, str | None]]:
    return lambda: (item, None)


def _text(edit: Callable[[str], str]) -> Callable[[], tuple[bytes, str | None]]:
    """A valid ping whose JSON text is edited (for what json.dumps cannot write: NaN, lone surrogates)."""

    def make() -> tuple[bytes, str | None]:
        message = valid()
        return edit(json.dumps(message)).encode(), message["headers"]["id"]

    return make


EMBED_NULL = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

#: Every item here must be refused: (name, maker of (item bytes, the id a FAILURE must be stored under)).
HOSTILE: list[tuple[str, Callable[[], tuple[bytes, str | None]]]] = [
    ("empty item", _raw(b"")),
    ("not utf-8", _raw(b"\xff\xfe\x00garbage")),
    ("not json", _raw(b"this is not json")),
    ("truncated json", _raw(b'{"body": "W10=", "headers": {')),
    ("json list", _raw(b"[1, 2, 3]")),
    ("json null", _raw(b"null")),
    ("json number", _raw(b"42")),
    ("json string", _raw(b'"rootfs.clone_for_vm"')),
    ("empty object", _raw(b"{}")),
    ("nested 100000 deep", _raw(b"[" * 100_000 + b"]" * 100_000)),
    ("2 MiB item", _raw(json.dumps({"pad": "x" * (2 << 20)}).encode())),
    ("huge integer", _raw(b'{"n": ' + b"9" * 5000 + b"}")),
    ("properties missing", _with("properties", None, delete=True)),
    ("properties a list", _with("properties", [1, 2])),
    ("delivery_tag missing", _with("properties.delivery_tag", None, delete=True)),
    ("delivery_tag a number", _with("properties.delivery_tag", 7)),
    ("delivery_tag an object", _with("properties.delivery_tag", {"a": 1})),
    ("delivery_info missing", _with("properties.delivery_info", None, delete=True)),
    ("routing_key a number", _with("properties.delivery_info.routing_key", 5)),
    ("body_encoding unknown", _with("properties.body_encoding", "rot13")),
    ("priority a string", _with("properties.priority", "high")),
    ("priority out of range", _with("properties.priority", 1000)),
    ("correlation_id a number", _with("properties.correlation_id", 5)),
    ("headers missing", _with("headers", None, delete=True)),
    ("headers a list", _with("headers", ["task", "rootfs.ping"])),
    ("body missing", _with("body", None, delete=True)),
    ("body empty", _with("body", "")),
    ("body a number", _with("body", 12)),
    ("body not base64", _with("body", "!!!not base64!!!")),
    ("body base64 of text", _body(b"hello")),
    ("body base64 of latin-1", _body(b"\xe9\xe8")),
    ("body an object", _body(b'{"args": [], "kwargs": {}}')),
    ("body short", _body(b"[[], {}]")),
    ("body args a string", _body(b'["vm-1", {}, null]')),
    ("body kwargs a list", _body(b"[[], [], null]")),
    ("body embed a list", _body(b"[[], {}, [1]]")),
    ("body with a callback", _body(json.dumps([[], {}, {**EMBED_NULL, "callbacks": [{"task": "x"}]}]).encode())),
    ("body with a chord", _body(json.dumps([[], {}, {**EMBED_NULL, "chord": {"task": "x"}}]).encode())),
    ("body bad type hook", _body(b'[[{"__type__": "datetime", "__value__": "never"}], {}, null]')),
    ("body unknown type hook", _body(b'[[{"__type__": "pickle", "__value__": "x"}], {}, null]')),
    ("body nested 200 deep", _body(b"[" + b"[" * 200 + b"]" * 200 + b", {}, null]")),
    ("content-type pickle", _with("content-type", "application/x-python-serialize")),
    ("content-type a number", _with("content-type", 5)),
    ("content-encoding binary", _with("content-encoding", "binary")),
    ("id missing", _with("headers.id", None, delete=True)),
    ("id a number", _with("headers.id", 5)),
    ("id a list", _with("headers.id", ["a"])),
    ("id empty", _with("headers.id", "")),
    ("id too long", _with("headers.id", "x" * 300)),
    ("id with a newline", _with("headers.id", "a\nb")),
    ("task missing", _with("headers.task", None, delete=True)),
    ("task a number", _with("headers.task", 5)),
    ("task a list", _with("headers.task", ["rootfs.ping"])),
    ("task an object", _with("headers.task", {"a": 1})),
    ("task a celery built-in", _with("headers.task", "celery.group")),
    ("timelimit a number", _with("headers.timelimit", 5)),
    ("timelimit a word", _with("headers.timelimit", "fast")),
    ("timelimit words", _with("headers.timelimit", ["x", "y"])),
    ("timelimit of one", _with("headers.timelimit", [1])),
    ("timelimit of three", _with("headers.timelimit", [1, 2, 3])),
    ("timelimit negative", _with("headers.timelimit", [-1, None])),
    ("timelimit zero", _with("headers.timelimit", [0, None])),
    ("timelimit booleans", _with("headers.timelimit", [True, False])),
    ("timelimit beyond the worker's", _with("headers.timelimit", [10**9, None])),
    ("timelimit NaN", _text(lambda t: t.replace('"lang": "go"', '"lang": "go", "timelimit": [NaN, null]'))),
    ("timelimit an object", _with("headers.timelimit", {"hard": 1})),
    ("eta a number", _with("headers.eta", 5)),
    ("eta a word", _with("headers.eta", "tomorrow")),
    ("eta impossible date", _with("headers.eta", "2026-13-45T00:00:00")),
    ("eta year 9999", _with("headers.eta", "9999-12-31T23:59:59+00:00")),
    ("eta underflows", _with("headers.eta", "0001-01-01T00:00:00+23:59")),
    ("eta centuries ahead", _with("headers.eta", "2999-01-01T00:00:00+00:00")),
    ("eta an hour ahead", lambda: _with("headers.eta", (datetime.now(UTC) + timedelta(hours=1)).isoformat())()),
    ("expires a number", _with("headers.expires", 600)),
    ("expires a word", _with("headers.expires", "soon")),
    ("expires a list", _with("headers.expires", [])),
    ("expires underflows", _with("headers.expires", "0001-01-01T00:00:00+23:59")),
    ("retries a string", _with("headers.retries", "x")),
    ("retries negative", _with("headers.retries", -1)),
    ("retries a float", _with("headers.retries", 1.5)),
    ("retries a boolean", _with("headers.retries", True)),
    ("retries huge", _with("headers.retries", 10**20)),
    ("argsrepr a number", _with("headers.argsrepr", 5)),
    ("kwargsrepr an object", _with("headers.kwargsrepr", {})),
    ("root_id a list", _with("headers.root_id", [])),
    ("parent_id a number", _with("headers.parent_id", 1)),
    ("shadow an object", _with("headers.shadow", {})),
    ("group a number", _with("headers.group", 1)),
    ("group_index a string", _with("headers.group_index", "x")),
    ("origin a number", _with("headers.origin", 5)),
    ("lang a list", _with("headers.lang", [])),
    ("ignore_result a string", _with("headers.ignore_result", "yes")),
    ("stamped_headers a string", _with("headers.stamped_headers", "x")),
    ("stamps a list", _with("headers.stamps", [])),
    ("compression zlib", _with("headers.compression", "zlib")),
    ("redelivered a string", _with("headers.redelivered", "x")),
    ("header callbacks", _with("headers.callbacks", [{"task": "rootfs.release_vm"}])),
    ("header chord", _with("headers.chord", {"task": "x"})),
    ("header is_eager", _with("headers.is_eager", True)),
    ("header _private", _with("headers._private", 1)),
    ("extension header nested 100 deep", _with("headers.x-deep", json.loads("[" * 100 + "]" * 100))),
    ("lone surrogate in the body field", _text(lambda t: t.replace('"body": "', '"body": "\\ud800', 1))),
]


# -- generated items -------------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
DATES = st.one_of(
    st.datetimes(max_value=datetime(2020, 1, 1)).map(lambda d: d.isoformat()),
    st.just("9999-12-31T23:59:59+00:00"),
    st.text(max_size=25),
)
HEADER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(st.uuids().map(str), JSON_VALUES),
    "task": st.sampled_from(["rootfs.ping", "rootfs.clone_for_vm", "rootfs.release_vm", "rootfs.nope"]) | JSON_VALUES,
    "timelimit": st.one_of(
        st.lists(st.one_of(st.none(), st.floats(min_value=-10, max_value=1e12), JSON_VALUES), max_size=3),
        JSON_VALUES,
    ),
    "eta": DATES | JSON_VALUES,
    "expires": DATES | JSON_VALUES,
    "retries": st.integers(min_value=-5, max_value=10**7) | JSON_VALUES,
    "argsrepr": JSON_VALUES,
    "kwargsrepr": JSON_VALUES,
    "root_id": JSON_VALUES,
    "parent_id": JSON_VALUES,
    "group": JSON_VALUES,
    "group_index": JSON_VALUES,
    "shadow": JSON_VALUES,
    "origin": JSON_VALUES,
    "lang": JSON_VALUES,
    "stamped_headers": JSON_VALUES,
    "stamps": JSON_VALUES,
    "replaced_task_nesting": JSON_VALUES,
    "compression": JSON_VALUES,
    "redelivered": JSON_VALUES,
    "callbacks": JSON_VALUES,
    "chord": JSON_VALUES,
    "x-custom": JSON_VALUES,
}
ENVELOPE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "body": st.one_of(st.text(max_size=30), JSON_VALUES),
    "content-type": st.sampled_from(["application/json", "application/x-python-serialize"]) | JSON_VALUES,
    "content-encoding": st.sampled_from(["utf-8", "binary"]) | JSON_VALUES,
    "headers": JSON_VALUES,
    "properties": JSON_VALUES,
    "properties.delivery_tag": st.uuids().map(str) | JSON_VALUES,
    "properties.delivery_info": JSON_VALUES,
    "properties.body_encoding": st.sampled_from(["base64", "utf-8"]) | JSON_VALUES,
    "properties.priority": JSON_VALUES,
}
BODIES = st.one_of(
    st.tuples(JSON_VALUES, JSON_VALUES, st.one_of(st.just(EMBED_NULL), JSON_VALUES)).map(list),
    # Well-formed bodies with arbitrary arguments: these run, and fail (or not) inside the task.
    st.tuples(
        st.lists(JSON_VALUES, max_size=3),
        st.dictionaries(st.sampled_from(["vm_id", "stack", "host", "x"]), JSON_VALUES, max_size=3),
        st.just(EMBED_NULL),
    ).map(list),
)


@st.composite
def _envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid job (a ping or a clone) with a few of its fields replaced by generated values or removed."""
    task = draw(st.sampled_from(["rootfs.ping", "rootfs.clone_for_vm"]))
    kwargs = {"host": "a"} if task == "rootfs.ping" else {"host": "a", "vm_id": "vm-gen", "stack": "base"}
    message = valid(task, kwargs)
    if draw(st.booleans()):
        message["body"] = base64.b64encode(json.dumps(draw(BODIES)).encode()).decode()
    for name in draw(st.lists(st.sampled_from(sorted(HEADER_VALUES)), max_size=3, unique=True)):
        if draw(st.booleans()):
            message["headers"][name] = draw(HEADER_VALUES[name])
        else:
            message["headers"].pop(name, None)
    for path in draw(st.lists(st.sampled_from(sorted(ENVELOPE_VALUES)), max_size=2, unique=True)):
        *parents, leaf = path.split(".")
        node: Any = message
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if draw(st.booleans()):
                node[leaf] = draw(ENVELOPE_VALUES[path])
            else:
                node.pop(leaf, None)
    return message


ITEMS = st.one_of(
    st.binary(max_size=40),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    _envelopes().map(lambda m: json.dumps(m).encode()),
    _envelopes().map(lambda m: json.dumps(m).encode()),
    _envelopes().map(lambda m: json.dumps(m).encode()),
)


def usable_id(item: bytes) -> str | None:
    """The id a result must appear under: a 1..255 printable-character id in an object's headers."""
    try:
        message = json.loads(item)
    except ValueError:
        return None
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    ok = isinstance(task_id, str) and 0 < len(task_id) <= 255 and task_id.isprintable()
    if not ok or headers.get("ignore_result") is True:  # type: ignore[union-attr]
        return None
    return str(task_id)

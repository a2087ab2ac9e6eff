"""docs/protocol.md is what foreign schedulers code against: its error table must match worker/errors.py."""

from __future__ import annotations

import dataclasses
import errno
import re
from pathlib import Path

import worker.errors as errors_mod
from worker.errors import TRANSIENT_ERRNOS, RootfsError

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _error_rows() -> dict[str, tuple[list[str], str]]:
    """`exc_type` -> (fields in the documented order, the transient column), from the doc's error table."""
    rows: dict[str, tuple[list[str], str]] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| `\[([^\]]*)\]` \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = ([f.strip() for f in m.group(2).split(",")], m.group(3).strip())
    return rows


def _subclasses() -> list[type[RootfsError]]:
    return [
        obj
        for obj in vars(errors_mod).values()
        if isinstance(obj, type) and issubclass(obj, RootfsError) and obj is not RootfsError
    ]


def test_every_error_type_is_documented_with_its_fields_in_order() -> None:
    """Each RootfsError subclass has a row whose exc_message positions are its fields, in order."""
    rows = _error_rows()
    assert len(_subclasses()) >= 11
    for cls in _subclasses():
        assert cls.__name__ in rows, f"{cls.__name__} missing from docs/protocol.md"
        assert rows[cls.__name__][0] == [f.name for f in dataclasses.fields(cls)], cls.__name__


def test_documented_transience_matches_the_code() -> None:
    """'yes'/'no' agree with `.transient`; FilesystemError lists exactly the transient errnos."""
    rows = _error_rows()
    samples = {cls.__name__: cls(*["x"] * len(dataclasses.fields(cls))) for cls in _subclasses()}
    for name, exc in samples.items():
        if name == "FilesystemError":
            continue
        assert rows[name][1] == ("yes" if exc.transient else "no"), name
    listed = set(re.findall(r"\b(E[A-Z]+) \((\d+)\)", rows["FilesystemError"][1]))
    assert listed == {(errno.errorcode[e], str(e)) for e in TRANSIENT_ERRNOS}

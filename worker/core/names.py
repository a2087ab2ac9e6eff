"""Validation of the two names callers send: stack names and vm ids.

Both become path components, so both are checked before any filesystem access.
"""

from __future__ import annotations

from worker.errors import InvalidStackName, InvalidVmId

#: Longest file name Linux filesystems accept, in bytes.
MAX_NAME_BYTES = 255
#: Safe vm ids also name lock files and trash entries (`<id>.lock`, `<id>.<hex>`), so they leave room.
MAX_VM_ID_CHARS = 200


def safe_vm_id(vm_id: str) -> str:
    """The seed's mapping, kept exactly: the Rust runtime finds clones by this name."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in vm_id)


def check_vm_id(vm_id: object) -> str:
    """The safe id for a caller's vm id, or InvalidVmId."""
    if not isinstance(vm_id, str):
        raise InvalidVmId("vm_id", _short(vm_id), f"must be a string, not {type(vm_id).__name__}")
    safe = safe_vm_id(vm_id)
    if not safe:
        raise InvalidVmId("vm_id", _short(vm_id), "sanitises to an empty string")
    if len(safe) > MAX_VM_ID_CHARS:
        raise InvalidVmId("vm_id", _short(vm_id), f"longer than {MAX_VM_ID_CHARS} characters")
    return safe


def check_stack_name(name: object) -> str:
    """The name itself when it is one plain path component, else InvalidStackName."""
    if not isinstance(name, str):
        raise InvalidStackName("stack", _short(name), f"must be a string, not {type(name).__name__}")
    reason = _stack_name_problem(name)
    if reason:
        raise InvalidStackName("stack", _short(name), reason)
    return name


def is_valid_stack_name(name: str) -> bool:
    return _stack_name_problem(name) is None


def _stack_name_problem(name: str) -> str | None:
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a relative directory reference"
    if "/" in name:
        return "contains '/'"
    if "\0" in name:
        return "contains a NUL byte"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def _short(value: object, limit: int = 80) -> str:
    """A printable, bounded rendering of hostile input for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

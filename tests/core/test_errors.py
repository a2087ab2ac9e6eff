"""The errors callers and foreign clients read: exact messages, fields, JSON form and which ones are transient."""

from __future__ import annotations

import errno
import json

import pytest

from worker.errors import (
    TRANSIENT_ERRNOS,
    CloneInUse,
    FilesystemError,
    InsufficientSpace,
    InvalidArgument,
    InvalidMessage,
    InvalidStackName,
    InvalidVmId,
    RemoteError,
    RootfsError,
    StackNotFound,
    StampMismatch,
    TaskTimeout,
    TemplateChanged,
    VmBusy,
    VmIdConflict,
)

#: (error, its message, transient): the text clients see in `exc_message` and print to operators.
CASES: list[tuple[RootfsError, str, bool]] = [
    (
        InvalidArgument("host", "'b'", "this worker serves host 'a'"),
        "invalid host 'b': this worker serves host 'a'",
        False,
    ),
    (
        InvalidStackName("stack", "'..'", "is a relative directory reference"),
        "invalid stack '..': is a relative directory reference",
        False,
    ),
    (
        InvalidVmId("vm_id", "''", "sanitises to an empty string"),
        "invalid vm_id '': sanitises to an empty string",
        False,
    ),
    (StackNotFound("ghost", "/t"), "stack 'ghost' not found under /t", False),
    (
        StampMismatch("vm-1", "base", "a" * 64, "b" * 64),
        f"vm 'vm-1' clone stamp mismatch (stamp={'a' * 64}, template={'b' * 64}) — release the VM before rotating"
        " stack 'base'",
        False,
    ),
    (
        VmIdConflict("vm:1", "vm_1", "vm/1"),
        "vm id 'vm:1' maps to clone directory 'vm_1', which belongs to vm id 'vm/1'",
        False,
    ),
    (
        TemplateChanged("/t/base/rootfs.ext4", "size 1 -> 2"),
        "template /t/base/rootfs.ext4 changed while being read (size 1 -> 2); retry once it is stable",
        True,
    ),
    (
        FilesystemError("copy", "/c/x.partial", errno.ENOSPC, "No space left on device"),
        "copy /c/x.partial: No space left on device (ENOSPC)",
        True,
    ),
    (FilesystemError("read", "/t/x", errno.ENOENT, "No such file"), "read /t/x: No such file (ENOENT)", False),
    (FilesystemError("read", "/t/x", 99999, "odd"), "read /t/x: odd (99999)", False),
    (TaskTimeout("abc-123", 2.5), "no result for task abc-123 within 2.5s", True),
    (TaskTimeout("abc-123", 60.0), "no result for task abc-123 within 60s", True),
    (RemoteError("TimeLimitExceeded", "hard limit"), "TimeLimitExceeded: hard limit", False),
    (
        CloneInUse("vm-1", [12, 345]),
        "vm 'vm-1' clone is in use (held open by 12, 345); stop the VM first or release with force",
        False,
    ),
    (
        CloneInUse("vm-1", []),
        "vm 'vm-1' clone is in use (held open by a process this worker cannot see); stop the VM first or release"
        " with force",
        False,
    ),
    (
        InsufficientSpace("/c", 100, 50, 10),
        "not enough space on /c: a clone needs 100 bytes, 50 are free and 10 must stay free (ROOTFS_MIN_FREE)",
        True,
    ),
    (VmBusy("vm-1"), "vm 'vm-1' is being cloned or released by another operation", True),
    (InvalidMessage("abc-123", "not JSON"), "message abc-123 refused: not JSON", False),
]


@pytest.mark.parametrize(("error", "message", "transient"), CASES, ids=lambda v: type(v).__name__)
def test_each_error_has_its_message_and_transience(error: RootfsError, message: str, transient: bool) -> None:
    """str(), transient and the JSON form are exactly what clients and operators are documented to read."""
    assert str(error) == message
    assert error.transient is transient
    data = error.to_dict()
    # RemoteError's own `message` field (the remote text) takes the key; its type is in `type_name`.
    shown = error.message if isinstance(error, RemoteError) else message
    assert data["type"] == type(error).__name__ and data["message"] == shown and data["transient"] is transient
    assert json.loads(json.dumps(data)) == data
    again = type(error)(*error.args)  # how Celery's JSON backend rebuilds it
    assert str(again) == message and again.args == error.args


def test_fields_are_the_args_in_order() -> None:
    """Foreign clients read exc_message positionally: the fields, in declaration order, are the args."""
    assert StampMismatch("vm", "stack", "s", "t").args == ("vm", "stack", "s", "t")
    assert FilesystemError("op", "/p", 5, "EIO").args == ("op", "/p", 5, "EIO")
    assert InvalidVmId("vm_id", "'x'", "why").to_dict() == {
        "type": "InvalidVmId",
        "message": "invalid vm_id 'x': why",
        "transient": False,
        "field": "vm_id",
        "value": "'x'",
        "reason": "why",
    }
    assert isinstance(InvalidStackName("s", "v", "r"), InvalidArgument)


def test_from_os_keeps_errno_and_message() -> None:
    """An OSError becomes a FilesystemError with its errno and strerror, or 0 and its text when it has none."""
    full = FilesystemError.from_os(OSError(errno.EIO, "Input/output error"), op="read", path="/t")
    assert (full.op, full.path, full.errno, full.strerror) == ("read", "/t", errno.EIO, "Input/output error")
    bare = FilesystemError.from_os(OSError("odd failure"), op="copy", path="/c")
    assert (bare.errno, bare.strerror) == (0, "odd failure")
    assert not bare.transient


@pytest.mark.parametrize(
    "code",
    [
        "EIO",
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "ENOSPC",
        "EDQUOT",
        "ETIMEDOUT",
        "ESTALE",
        "ENOMEM",
        "ENFILE",
        "EMFILE",
        "ENOLCK",
        "ETXTBSY",
        "ECONNRESET",
        "ECONNREFUSED",
        "EHOSTUNREACH",
        "ENETUNREACH",
    ],
)
def test_conditions_that_pass_are_transient(code: str) -> None:
    """A filesystem error whose errno may pass on its own is retried."""
    assert FilesystemError("op", "/p", getattr(errno, code), code).transient


@pytest.mark.parametrize("code", ["ENOENT", "EACCES", "EPERM", "EINVAL", "EISDIR", "ELOOP", "EROFS", "EEXIST"])
def test_facts_a_retry_will_not_change_are_permanent(code: str) -> None:
    """A filesystem error whose errno states a fact is reported at once, not retried."""
    assert getattr(errno, code) not in TRANSIENT_ERRNOS
    assert not FilesystemError("op", "/p", getattr(errno, code), code).transient


def test_the_root_is_permanent_and_named_by_its_type() -> None:
    """A bare RootfsError (no data) reads as its type name and is not retried."""
    assert str(RootfsError()) == "RootfsError" and not RootfsError().transient
    assert RootfsError().to_dict() == {"type": "RootfsError", "message": "RootfsError", "transient": False}

"""One error root for the whole project.

Every error carries its data as fields and says whether a retry may succeed (`transient`). The fields are
also the exception's `args`, in order, and are JSON values: Celery's JSON result backend stores `args` and
rebuilds the exception with `cls(*args)`, so a client gets back the same type with the same data.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass, fields
from typing import Any

#: Errnos that describe a condition that may pass on its own (I/O hiccup, full disk being cleaned, lock
#: contention, stale NFS handle). Everything else (ENOENT, EACCES, EINVAL, ...) is a fact a retry won't change.
TRANSIENT_ERRNOS: frozenset[int] = frozenset(
    {
        errno_mod.EIO,
        errno_mod.EAGAIN,
        errno_mod.EBUSY,
        errno_mod.EINTR,
        errno_mod.ENOSPC,
        errno_mod.EDQUOT,
        errno_mod.ETIMEDOUT,
        errno_mod.ESTALE,
        errno_mod.ENOMEM,
        errno_mod.ENFILE,
        errno_mod.EMFILE,
        errno_mod.ENOLCK,
        errno_mod.ETXTBSY,
        errno_mod.ECONNRESET,
        errno_mod.ECONNREFUSED,
        errno_mod.EHOSTUNREACH,
        errno_mod.ENETUNREACH,
    }
)


@dataclass(eq=False)
class RootfsError(Exception):
    """Root of every error this project raises."""

    def __post_init__(self) -> None:
        self.args = tuple(getattr(self, f.name) for f in fields(self))

    @property
    def transient(self) -> bool:
        """True when the same call may succeed later; the task layer retries exactly these."""
        return False

    def describe(self) -> str:
        return type(self).__name__

    def __str__(self) -> str:
        return self.describe()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for CLI output and logs."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"type": type(self).__name__, "message": str(self), "transient": self.transient, **data}


@dataclass(eq=False)
class InvalidArgument(RootfsError):
    """A request that can never succeed as sent: wrong type, wrong shape."""

    field: str
    value: str
    reason: str

    def describe(self) -> str:
        return f"invalid {self.field} {self.value}: {self.reason}"


@dataclass(eq=False)
class InvalidStackName(InvalidArgument):
    """A stack name that is not one plain path component."""


@dataclass(eq=False)
class InvalidVmId(InvalidArgument):
    """A vm id that cannot name a clone directory."""


@dataclass(eq=False)
class StackNotFound(RootfsError):
    stack: str
    template_dir: str

    def describe(self) -> str:
        return f"stack {self.stack!r} not found under {self.template_dir}"


@dataclass(eq=False)
class StampMismatch(RootfsError):
    """The VM's clone was made from other template bytes than the stack holds now."""

    vm_id: str
    stack: str
    stamp: str
    template_sha256: str

    def describe(self) -> str:
        return (
            f"vm {self.vm_id!r} clone stamp mismatch (stamp={self.stamp}, template={self.template_sha256})"
            f" — release the VM before rotating stack {self.stack!r}"
        )


@dataclass(eq=False)
class VmIdConflict(RootfsError):
    """Two vm ids sanitise to one directory; the second must not get the first one's disk."""

    vm_id: str
    safe_id: str
    owner: str

    def describe(self) -> str:
        return f"vm id {self.vm_id!r} maps to clone directory {self.safe_id!r}, which belongs to vm id {self.owner!r}"


@dataclass(eq=False)
class TemplateChanged(RootfsError):
    """The template changed while it was read: what was read has no trustworthy hash. Retry later."""

    path: str
    detail: str

    @property
    def transient(self) -> bool:
        return True

    def describe(self) -> str:
        return f"template {self.path} changed while being read ({self.detail}); retry once it is stable"


@dataclass(eq=False)
class TemplateBusy(RootfsError):
    """Some process holds the template open for writing (an in-place `cp`, a loop mount, an editor): what it
    holds now may be half written, so it is neither hashed nor cloned. Retry once the writer is done; publish
    templates by writing beside them and renaming over them, which never makes a template busy."""

    path: str
    detail: str

    @property
    def transient(self) -> bool:
        return True

    def describe(self) -> str:
        return f"template {self.path} is open for writing ({self.detail}); retry once the writer has closed it"


@dataclass(eq=False)
class FilesystemError(RootfsError):
    """An OSError with the operation and path it hit; transient when its errno may pass."""

    op: str
    path: str
    errno: int
    strerror: str

    @classmethod
    def from_os(cls, exc: OSError, *, op: str, path: os.PathLike[str] | str) -> FilesystemError:
        code = exc.errno if exc.errno is not None else 0
        return cls(op, os.fspath(path), code, exc.strerror or str(exc))

    @property
    def transient(self) -> bool:
        return self.errno in TRANSIENT_ERRNOS

    def describe(self) -> str:
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        return f"{self.op} {self.path}: {self.strerror} ({name})"


@dataclass(eq=False)
class TaskTimeout(RootfsError):
    """The client gave up waiting; the job may still run."""

    task_id: str
    timeout: float

    @property
    def transient(self) -> bool:
        return True

    def describe(self) -> str:
        return f"no result for task {self.task_id} within {self.timeout:g}s"


@dataclass(eq=False)
class RemoteError(RootfsError):
    """A failure on the worker that is not one of ours (a crash, a time limit, a bad message)."""

    type_name: str
    message: str

    def describe(self) -> str:
        return f"{self.type_name}: {self.message}"


@dataclass(eq=False)
class CloneInUse(RootfsError):
    """A process holds the VM's disk open (read-write, read-only or mapped): deleting it would pull the disk
    from under a running VM. Permanent: the caller must stop the VM first, or release with force."""

    vm_id: str
    pids: list[int]

    def describe(self) -> str:
        who = ", ".join(map(str, self.pids)) if self.pids else "a process this worker cannot see"
        return f"vm {self.vm_id!r} clone is in use (held open by {who}); stop the VM first or release with force"


@dataclass(eq=False)
class InsufficientSpace(RootfsError):
    """A copy would leave less free space on the clones filesystem than the reserve. Transient: space may be
    freed (released clones), so a retry later may succeed; nothing was written."""

    path: str
    needed: int
    free: int
    reserve: int

    @property
    def transient(self) -> bool:
        return True

    def describe(self) -> str:
        return (
            f"not enough space on {self.path}: a clone needs {self.needed} bytes, {self.free} are free and "
            f"{self.reserve} must stay free (ROOTFS_MIN_FREE)"
        )


@dataclass(eq=False)
class VmBusy(RootfsError):
    """Another clone or release of this VM holds its lock; a caller that must not wait (a reconcile sweep)
    leaves the VM alone. Transient: the other operation ends."""

    vm_id: str

    @property
    def transient(self) -> bool:
        return True

    def describe(self) -> str:
        return f"vm {self.vm_id!r} is being cloned or released by another operation"


@dataclass(eq=False)
class InvalidMessage(RootfsError):
    """The worker refused a queue item before running it (not JSON, wrong shape, a header it cannot honour);
    stored under the item's task id so that whoever sent it learns why. Sending it again will not help."""

    task_id: str
    reason: str

    def describe(self) -> str:
        return f"message {self.task_id} refused: {self.reason}"

"""rootfs-worker: per-VM root filesystem clones of template stacks, served over a Celery queue.

The names exported here are the pure core: importing them imports no Celery. The Celery app lives in
`worker.celery` (found by `celery -A worker`), the tasks in the `tasks` package.
"""

from worker.core.config import RootfsConfig
from worker.core.models import StackInfo, VmRootfs, WarmReport
from worker.core.names import safe_vm_id
from worker.core.registry import RootfsRegistry
from worker.errors import (
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
    TemplateBusy,
    TemplateChanged,
    VmBusy,
    VmIdConflict,
)

__all__ = [
    "CloneInUse",
    "FilesystemError",
    "InsufficientSpace",
    "InvalidArgument",
    "InvalidMessage",
    "InvalidStackName",
    "InvalidVmId",
    "RemoteError",
    "RootfsConfig",
    "RootfsError",
    "RootfsRegistry",
    "StackInfo",
    "StackNotFound",
    "StampMismatch",
    "TaskTimeout",
    "TemplateBusy",
    "TemplateChanged",
    "VmBusy",
    "VmIdConflict",
    "VmRootfs",
    "WarmReport",
    "safe_vm_id",
]

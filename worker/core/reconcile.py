"""Release the clones a scheduler no longer knows about (a scheduler that crashed between clone and boot
leaks a disk forever otherwise).

The scheduler sends the vm ids it keeps; every other clone is released, except one younger than
`older_than` seconds (it may have been made after the scheduler took its list), one in use (a VM runs on
it, whatever the list says), and our private directories (never VM directories). A clone that cannot be
released is reported and the sweep goes on (containerd #3923: one failure must not stop a GC).

Each release re-checks, under the VM's lock and without waiting for it, what the listing saw without a
lock: the clone's age (a clone released and made again since the listing is young) and its use. A VM
whose lock is held is being cloned or released right now: left alone, counted as in use.

A dry run takes no lock and writes nothing: it only lists and classifies.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.core import inventory
from worker.core.names import check_vm_id
from worker.core.records import read_record
from worker.errors import CloneInUse, InvalidArgument, InvalidVmId, RootfsError, VmBusy

if TYPE_CHECKING:
    from worker.core.registry import RootfsRegistry

log = logging.getLogger(__name__)

MAX_KEEP = 100_000
DEFAULT_OLDER_THAN = 600.0


@dataclass
class ReconcileReport:
    """Vm ids by outcome (in a dry run, `released` is what would be released)."""

    released: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)
    too_young: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dry_run: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "released": list(self.released),
            "kept": list(self.kept),
            "in_use": list(self.in_use),
            "too_young": list(self.too_young),
            "failed": dict(self.failed),
            "dry_run": self.dry_run,
        }


class _Young(Exception):
    """Raised under the VM's lock to spare a clone made since the listing; never leaves this module."""


def check_keep(keep: object) -> set[str]:
    """The safe ids of `keep`: a list of at most MAX_KEEP vm ids, else InvalidArgument (nothing touched).

    Compared by safe id, the directory's name: two vm ids that sanitise alike share one directory, and
    keeping either keeps it (the conservative reading)."""
    if not isinstance(keep, list | tuple):
        raise InvalidArgument("keep", repr(keep)[:80], f"must be a list of vm ids, not {type(keep).__name__}")
    if len(keep) > MAX_KEEP:
        raise InvalidArgument("keep", f"<{len(keep)} ids>", f"at most {MAX_KEEP} vm ids")
    safe: set[str] = set()
    for i, vm_id in enumerate(keep):
        try:
            safe.add(check_vm_id(vm_id))
        except InvalidVmId as exc:
            raise InvalidArgument(f"keep[{i}]", exc.value, exc.reason) from None
    return safe


def check_older_than(older_than: object) -> float:
    if isinstance(older_than, bool) or not isinstance(older_than, int | float):
        raise InvalidArgument("older_than", repr(older_than)[:80], "must be a number of seconds")
    if not math.isfinite(older_than) or older_than < 0:
        raise InvalidArgument("older_than", repr(older_than)[:80], "must be a finite number of seconds, >= 0")
    return float(older_than)


def reconcile(
    registry: RootfsRegistry,
    keep: Sequence[str],
    *,
    older_than: float = DEFAULT_OLDER_THAN,
    dry_run: bool = True,
    now: float | None = None,
) -> ReconcileReport:
    """Release every clone not in `keep` that is old enough and not in use; see the module's docstring."""
    kept_ids = check_keep(keep)
    min_age = check_older_than(older_than)
    if not isinstance(dry_run, bool):
        raise InvalidArgument("dry_run", repr(dry_run)[:80], "must be true or false")
    report = ReconcileReport(dry_run=dry_run)
    started = time.time() if now is None else now
    for clone in registry.clones(pids=False):
        if clone.dir in kept_ids:
            report.kept.append(clone.vm_id)
        elif _age(clone.created, started) < min_age:
            report.too_young.append(clone.vm_id)
        elif clone.in_use:
            report.in_use.append(clone.vm_id)
        elif dry_run:
            report.released.append(clone.vm_id)
        else:
            _release(registry, clone, min_age, report)
    log.info(
        "reconcile%s: released %d, kept %d, in use %d, too young %d, failed %d",
        " (dry run)" if dry_run else "",
        len(report.released),
        len(report.kept),
        len(report.in_use),
        len(report.too_young),
        len(report.failed),
    )
    return report


def _release(registry: RootfsRegistry, clone: inventory.CloneInfo, min_age: float, report: ReconcileReport) -> None:
    def recheck(dir_fd: int, vm_dir: Path) -> None:
        record = read_record(dir_fd, vm_dir)
        created = record.get("created") if record else None
        times = [os.stat(dir_fd).st_mtime]
        if isinstance(created, int | float) and not isinstance(created, bool):
            times.append(float(created))
        if _age(max(times), time.time()) < min_age:
            raise _Young

    try:
        registry.release(clone.vm_id, wait=False, recheck=recheck)
    except _Young:
        report.too_young.append(clone.vm_id)
    except (CloneInUse, VmBusy):
        report.in_use.append(clone.vm_id)
    except RootfsError as exc:
        log.warning("reconcile could not release %s: %s: %s", clone.vm_id, type(exc).__name__, exc)
        report.failed[clone.vm_id] = f"{type(exc).__name__}: {exc}"
    except OSError as exc:  # a bug's way out of the registry; the sweep still goes on
        log.warning("reconcile could not release %s: %s", clone.vm_id, exc)
        report.failed[clone.vm_id] = f"{type(exc).__name__}: {exc}"
    else:
        report.released.append(clone.vm_id)
        log.info("reconcile released %s (%s)", clone.vm_id, clone.dir)


def _age(created: float | None, now: float) -> float:
    """Seconds since `created`; an unknown creation time counts as new (never release what we cannot date)."""
    return 0.0 if created is None else now - created

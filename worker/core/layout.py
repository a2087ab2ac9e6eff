"""The on-disk layout, shared with the Rust runtime (both ways), and the invariant it keeps.

    <template_dir>/<stack>/rootfs.ext4
    <clones_dir>/<safe_vm_id>/rootfs.ext4          the VM's writable disk
    <clones_dir>/<safe_vm_id>/rootfs.ext4.sha256   64 lowercase hex digits, no newline
    <clones_dir>/<safe_vm_id>/.vm-id               ours only: the caller's original vm id
    <clones_dir>/<safe_vm_id>/.clone.json          ours only: {vm_id, stack, created}, for the inventory

and ours only, under names no safe vm id can take (safe ids have no dots):

    <clones_dir>/.cache/hashes/   shared template-hash cache
    <clones_dir>/.cache/stamps/   one file per template hash, holding it: reflinked as stamps on XFS
    <clones_dir>/.locks/          one flock file per VM
    <clones_dir>/.trash/          released clones being deleted

The invariant: `rootfs.ext4` exists only once it is complete, stamped and on disk. Everything that writes
into a VM directory (worker.core.registry) keeps it; everything that reads one (the Rust runtime too) may
rely on it.
"""

from __future__ import annotations

TEMPLATE_ROOTFS_FILE = "rootfs.ext4"
CLONE_ROOTFS_FILE = "rootfs.ext4"
CLONE_STAMP_FILE = "rootfs.ext4.sha256"
OWNER_FILE = ".vm-id"
#: JSON {vm_id, stack, created}: what the inventory reports that the seed's two files cannot say (which stack,
#: when). `.vm-id` stays beside it, unchanged, because older workers check ownership by it alone.
CLONE_RECORD_FILE = ".clone.json"
PARTIAL_SUFFIX = ".partial"
CACHE_DIR = ".cache"
#: In CACHE_DIR: the stamp sources (worker.core.stamps).
STAMPS_DIR = "stamps"
LOCKS_DIR = ".locks"
TRASH_DIR = ".trash"
#: In LOCKS_DIR; starts with a dot, so no safe vm id can take it.
WARM_LOCK = ".warm.lock"


def partials() -> tuple[str, ...]:
    """Names an interrupted write may leave in a VM directory; never part of a complete clone."""
    return tuple(name + PARTIAL_SUFFIX for name in (CLONE_ROOTFS_FILE, CLONE_STAMP_FILE, *record_names()))


def record_names() -> tuple[str, ...]:
    """Our own records in a VM directory (the seed writes neither)."""
    return (OWNER_FILE, CLONE_RECORD_FILE)


def is_private(name: str) -> bool:
    """Our own entries of the clones dir (cache, locks, trash): no safe vm id starts with a dot."""
    return name.startswith(".")

"""Work that must run in a fresh interpreter, one command per process: `python -m bench.child CMD ARGS`.

Fresh processes because two measures are about process boundaries: peak RSS (ru_maxrss of the process
that hashed, nothing else) and warm against cold (the hash cache must carry from one process to the next
through the disk, not through memory). Each command prints one JSON object on its last line.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import metrics_bench
from bench.common import counting, counting_fsyncs
from worker.core import cloning, hashing
from worker.core.config import RootfsConfig
from worker.core.registry import RootfsRegistry


def _maxrss_kib() -> int:
    """Peak resident set of this process image, in KiB.

    VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a child forked (or vforked)
    from the benchmark process reports the benchmark's own peak (~50 MiB) whatever the child did.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # no procfs: an upper bound


def hash_rss(path: str) -> dict[str, Any]:
    """Hash one file with the registry's hasher and report the peak RSS it took."""
    start = time.perf_counter()
    digest = hashing.hash_file(path, leased=True)  # as RootfsRegistry.hash_file and every clone do
    return {"seconds": time.perf_counter() - start, "sha256": digest, "maxrss_kib": _maxrss_kib()}


def idle_rss() -> dict[str, Any]:
    """The same interpreter with the same imports, hashing nothing: the floor of the RSS measure."""
    return {"maxrss_kib": _maxrss_kib()}


def warm(template_dir: str, clones_dir: str) -> dict[str, Any]:
    """A warm-up as a worker would run it on start: hash every template into the shared disk cache."""
    registry = RootfsRegistry(RootfsConfig(Path(template_dir), Path(clones_dir)))
    start = time.perf_counter()
    report = registry.warm()
    return {"seconds": time.perf_counter() - start, **report.to_dict()}


def clone(template_dir: str, clones_dir: str, vm_id: str, stack: str) -> dict[str, Any]:
    """One clone in this process, timed around clone_for_vm only (interpreter start-up is the same for both
    sides of the ratio and is not what the cache saves); also how many bytes it had to hash."""
    registry = RootfsRegistry(RootfsConfig(Path(template_dir), Path(clones_dir)))
    hashed: dict[str, int] = {}

    def progress(name: str, done: int, total: int) -> None:
        hashed[name] = done

    with counting_fsyncs() as fsyncs, counting(cloning, "clone_fd") as copies:
        start = time.perf_counter()
        registry.clone_for_vm(vm_id, stack, progress=progress)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "hashed_bytes": sum(hashed.values()),
        "fsync_seconds": fsyncs.seconds,
        "copy_seconds": copies.seconds,
    }


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "metrics-overhead": metrics_bench.child_overhead,
    "hash-rss": hash_rss,
    "idle-rss": idle_rss,
    "warm": warm,
    "clone": clone,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m bench.child {{{','.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        return 2
    result = COMMANDS[argv[0]](*argv[1:])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

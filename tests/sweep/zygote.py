"""The fault sweep's victim side: imports the core once, then forks one child per fault point.

    python -m tests.sweep.zygote     (driven by tests.sweep.harness over stdin/stdout, one JSON line each way)

Each child is what a worker process is when a job arrives: the core imported, nothing else done. It blocks
in sigwait until the harness has attached strace to it (so every syscall the call makes is counted, and
none of the set-up), runs one registry call, and leaves its outcome in memory shared with the zygote
(writing it anywhere would be one more syscall for strace to count or fail), then exits without cleanup.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from worker.core import hashing
from worker.core.config import RootfsConfig
from worker.core.registry import RootfsRegistry
from worker.errors import RootfsError

#: The registry calls a sweep can make, by name; the harness's operation table refers to these.
CALLS: dict[str, Callable[[RootfsRegistry, dict[str, Any]], object]] = {
    "clone": lambda reg, a: reg.clone_for_vm(a["vm_id"], a["stack"]),
    "release": lambda reg, a: reg.release(a["vm_id"]),
    "warm": lambda reg, a: reg.warm(),
    # Issue 11's lifecycle operations; their sweep entries skip while the registry lacks them.
    "reconcile": lambda reg, a: cast(Any, reg).reconcile(a["keep"], older_than=0, dry_run=False),
    "fixup": lambda reg, a: cast(Any, reg).fixup(),
}

_RESULT_SIZE = 1 << 16
GO = signal.SIGUSR1


def outcome(call: Callable[[], object]) -> dict[str, Any]:
    try:
        call()
    except RootfsError as exc:
        return {"outcome": "rootfs-error", "type": type(exc).__name__, "transient": exc.transient, "message": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - exactly what the sweep is looking for
        return {"outcome": "foreign-error", "type": type(exc).__name__, "message": traceback.format_exc()[-3000:]}
    return {"outcome": "ok"}


def child(command: dict[str, Any], shared: mmap.mmap) -> None:
    strategy = command.get("strategy")
    if strategy:
        hashing.default_strategy = lambda **_: strategy
    registry = RootfsRegistry(RootfsConfig(Path(command["template_dir"]), Path(command["clones_dir"])))
    signal.sigwait({GO})
    result = outcome(lambda: CALLS[command["call"]](registry, command["args"]))
    body = json.dumps(result).encode()[: _RESULT_SIZE - 8]
    shared[:8] = len(body).to_bytes(8, "little")
    shared[8 : 8 + len(body)] = body
    os._exit(0)


def main() -> None:
    logging.getLogger().addHandler(logging.NullHandler())  # no stderr writes for strace to count
    signal.pthread_sigmask(signal.SIG_BLOCK, {GO})  # inherited: GO waits in sigwait, never kills
    shared = mmap.mmap(-1, _RESULT_SIZE)
    out = sys.stdout
    for line in sys.stdin:
        command = json.loads(line)
        shared[:8] = bytes(8)
        pid = os.fork()
        if pid == 0:
            try:
                child(command, shared)
            finally:
                os._exit(70)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        size = int.from_bytes(shared[:8], "little")
        result: dict[str, Any] = json.loads(shared[8 : 8 + size]) if size else {"outcome": "no-result"}
        if os.WIFSIGNALED(status):
            result = {"outcome": "killed", "signal": os.WTERMSIG(status)}
        elif os.WEXITSTATUS(status) != 0:
            result = {"outcome": "no-result", "status": os.WEXITSTATUS(status)}
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

"""Liveness and readiness probes from a heartbeat file: written by the worker, read without Celery or Redis.

A supervisor runs the probe every few seconds, so reading it must cost a file read, not an app import or a
broker round trip. The worker's main process therefore keeps a small JSON file in its run dir up to date:

- `written`: refreshed every heartbeat interval by a thread of the main process. A stale file means the
  process is gone or wedged (a thread cannot run). This is liveness, and it holds while Redis is down: a
  restart would not bring Redis back, and the worker reconnects on its own.
- `ready`, `queues`: set by a consumer bootstep when the consumer has connected and consumes its queues,
  cleared when the connection is lost (Celery stops the consumer's steps before reconnecting).
- `loop`: the last tick of the main process's event loop, a timer it runs while consuming. A worker that
  says it is connected but whose loop stopped ticking is hung, and not live.

Readiness is read from the worker's own consumer state rather than by pinging Redis from the probe: a ping
tests the probe's connection, not whether this worker consumes its host's queues.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["worker", "beat"]
ROLES: tuple[Role, ...] = ("worker", "beat")


def health_file(run_dir: Path, role: Role) -> Path:
    return run_dir / f"{role}.health.json"


@dataclass
class HealthState:
    """The heartbeat file's content."""

    role: str
    host: str
    pid: int
    node: str
    written: float = 0.0
    ready: bool = False
    #: Last event-loop tick while consuming (None until the first).
    loop: float | None = None
    #: When `ready` last changed, and why it is false (empty when ready).
    since: float = 0.0
    reason: str = "starting"
    queues: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: str) -> HealthState:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        state = cls(**known)
        if not isinstance(state.written, int | float) or not isinstance(state.pid, int):
            raise ValueError("bad field types")
        return state


class HealthWriter:
    """Keeps one heartbeat file fresh from a daemon thread; state changes are written at once."""

    def __init__(self, path: Path, *, role: Role, host: str, interval: float, expected: list[str]) -> None:
        self.path = path
        self._interval = interval
        self._state = HealthState(role, host, os.getpid(), socket.gethostname(), expected=list(expected))
        self._state.since = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rootfs-health-{role}", daemon=True)

    def start(self) -> HealthWriter:
        self.write()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop writing and remove the file: a worker that shut down is not live, at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def set_ready(self, queues: list[str]) -> None:
        with self._lock:
            changed = not self._state.ready
            self._state.ready, self._state.queues, self._state.reason = True, sorted(queues), ""
            self._state.loop = time.time()
            if changed:
                self._state.since = time.time()
        self.write()

    def set_not_ready(self, reason: str) -> None:
        with self._lock:
            changed = self._state.ready
            self._state.ready, self._state.queues, self._state.reason = False, [], reason
            if changed:
                self._state.since = time.time()
        self.write()

    def tick(self) -> None:
        """Called from the event loop: cheap (no I/O), the thread writes it out."""
        self._state.loop = time.time()

    @property
    def state(self) -> HealthState:
        with self._lock:
            return HealthState(**asdict(self._state))

    def write(self) -> None:
        with self._lock:
            self._state.written = time.time()
            body = json.dumps(asdict(self._state), sort_keys=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body, encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            # A full or read-only run dir: the file goes stale and the probe says so; nothing else breaks.
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.write()


@dataclass(frozen=True)
class Verdict:
    """A probe's answer: its exit status follows `ok`; `reason` is the one line a person reads."""

    ok: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, probe: str) -> dict[str, Any]:
        return {"probe": probe, "ok": self.ok, "reason": self.reason, **self.details}


def read_state(path: Path) -> HealthState | Verdict:
    try:
        return HealthState.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Verdict(False, f"no heartbeat file {path} (not started, or stopped)")
    except (OSError, ValueError, TypeError) as exc:
        return Verdict(False, f"heartbeat file {path} unreadable: {exc}")


def check_live(path: Path, *, max_age: float, now: float | None = None) -> Verdict:
    state = read_state(path)
    if isinstance(state, Verdict):
        return state
    now = time.time() if now is None else now
    age = now - state.written
    details: dict[str, Any] = {"pid": state.pid, "host": state.host, "age": round(age, 3), "ready": state.ready}
    if age > max_age:
        return Verdict(False, f"heartbeat {age:.1f}s old (max {max_age:g}s): pid {state.pid} gone or hung", details)
    if state.node == socket.gethostname() and not _pid_alive(state.pid):
        return Verdict(False, f"pid {state.pid} that wrote {path} is gone", details)
    if state.role == "beat":
        return Verdict(True, f"live: beat pid {state.pid}, heartbeat {age:.1f}s old", details)
    if state.ready:
        loop_age = now - (state.loop or state.since)
        details["loop_age"] = round(loop_age, 3)
        if loop_age > max_age:
            return Verdict(
                False, f"event loop stalled: no tick for {loop_age:.1f}s while connected (max {max_age:g}s)", details
            )
        return Verdict(True, f"live: pid {state.pid}, heartbeat {age:.1f}s old, consuming", details)
    down = now - state.since
    return Verdict(
        True, f"live: pid {state.pid}, heartbeat {age:.1f}s old; not ready for {down:.0f}s ({state.reason})", details
    )


def check_ready(path: Path, *, max_age: float, now: float | None = None) -> Verdict:
    live = check_live(path, max_age=max_age, now=now)
    if not live.ok:
        return Verdict(False, f"not ready: {live.reason}", live.details)
    state = read_state(path)
    assert isinstance(state, HealthState)
    if state.role == "beat":
        return Verdict(True, live.reason.replace("live:", "ready:", 1), live.details)
    now = time.time() if now is None else now
    details = {**live.details, "queues": state.queues}
    if not state.ready:
        return Verdict(False, f"not ready for {now - state.since:.0f}s: {state.reason}", details)
    missing = sorted(set(state.expected) - set(state.queues))
    if missing:
        return Verdict(False, f"not ready: connected but not consuming {', '.join(missing)}", details)
    return Verdict(True, f"ready: connected to the broker, consuming {', '.join(state.queues)}", details)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

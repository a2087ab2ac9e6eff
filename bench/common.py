"""What every benchmark section shares: its context, its result rows, timing and file helpers.

Ratios are always ours / baseline, so "lower is better" and "higher is better" both read off one column;
each target says which way it points.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from unittest import mock

T = TypeVar("T")

MIB = 1 << 20
GIB = 1 << 30

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Context:
    """Where a section may put its files (deleted by the runner afterwards) and how thorough to be."""

    workdir: Path
    quick: bool

    def reps(self, full: int, quick: int) -> int:
        """Repetitions: medians need several, quick mode only checks that everything runs."""
        return quick if self.quick else full

    def log(self, message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    """A bound on a ratio (or on an absolute value, for the rows that have no baseline)."""

    op: Literal["<=", ">=", "<", "=="]
    limit: float
    unit: str = "x"

    def met(self, value: float) -> bool:
        if self.op == "<=":
            return value <= self.limit
        if self.op == ">=":
            return value >= self.limit
        if self.op == "<":
            return value < self.limit
        return value == self.limit

    def text(self) -> str:
        symbol = {"<=": "≤", ">=": "≥", "<": "<", "==": "="}[self.op]
        return f"{symbol} {self.limit:g}{self.unit if self.unit == 'x' else ' ' + self.unit}"

    def shortfall(self, value: float) -> str:
        """How far a missed value is from the target, in words a reader can act on."""
        if self.limit == 0:
            return f"{value:g} {self.unit} instead of {self.limit:g}"
        if self.op in ("<=", "<"):
            return f"{value / self.limit - 1:.0%} over the target ({value:.3g} against {self.text()})"
        return f"{1 - value / self.limit:.0%} under the target ({value:.3g} against {self.text()})"


@dataclass
class Row:
    """One line of the results table; `why` explains a miss, `value` is what the target is checked on."""

    measure: str
    ours: str
    baseline: str
    ratio: float | None
    target: Target | None
    value: float | None = None
    why: str = ""
    skipped: str = ""

    @property
    def checked(self) -> float | None:
        return self.value if self.value is not None else self.ratio

    @property
    def met(self) -> bool | None:
        if self.skipped or self.target is None or self.checked is None:
            return None
        return self.target.met(self.checked)


@dataclass
class Section:
    """A section's rows plus notes: what was measured how, and diagnostics that explain the numbers."""

    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall-clock seconds of one call and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@dataclass
class CallCount:
    calls: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def counting(owner: object, name: str) -> Iterator[CallCount]:
    """Count and time every call of `owner.name` made in this process while the block runs.

    The registry calls os.fsync and cloning.clone_fd through their modules, so patching the attribute sees
    every call. For diagnostics: it shows where a clone's time goes (waiting for the disk, copying) at the
    cost of a microsecond per call.
    """
    real = getattr(owner, name)
    count = CallCount()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            count.calls += 1
            count.seconds += time.perf_counter() - start

    with mock.patch.object(owner, name, wrapper):
        yield count


def counting_fsyncs() -> contextlib.AbstractContextManager[CallCount]:
    return counting(os, "fsync")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) without numpy."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ratio(ours: float, baseline: float) -> float:
    return ours / baseline if baseline else float("inf")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def gbps(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e9:.3g} GB/s"


def fmt_bytes(nbytes: float) -> str:
    """Bytes in the unit a reader expects: GiB from 1 GiB up, else MiB."""
    return f"{nbytes / GIB:.3g} GiB" if nbytes >= GIB else f"{nbytes / MIB:.3g} MiB"


def run(argv: Sequence[str], *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its stderr when it fails: a broken baseline must not become a ratio."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def run_child(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m bench.child ARGS` in a fresh interpreter (with `env` added to the environment); its
    last stdout line is a JSON object."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(PROJECT_ROOT)},
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.child {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not isinstance(result, dict):
        raise RuntimeError(f"bench.child {args[0]} printed {result!r}, not an object")
    return result


def write_filled(path: Path, size: int) -> Path:
    """A file of `size` bytes of incompressible data, left in the page cache (not flushed).

    One random MiB repeated: SHA-256 costs the same whatever the bytes, and this writes at memory speed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(block)
    return path


def read_through(path: Path) -> None:
    """Read a file once so that the timed runs find it in the page cache."""
    with path.open("rb") as f:
        while f.read(8 * MIB):
            pass

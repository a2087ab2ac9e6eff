"""6. `scan_stacks` over 200 stacks through the worker: with a warm hash cache against a cold one.

The target is not a ratio but a count: a warm scan must hash nothing at all. It is observed from outside
the worker, two ways: the cache entries written during the scan (an entry is only ever written after a hash
was computed), and the PROGRESS updates the task sends when a hash completes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.celery_host import Host, celery_host
from bench.common import MIB, Context, Row, Section, Target, fmt_bytes, median, ms, ratio, write_filled
from worker.core.layout import CACHE_DIR

HOST = "bench-scan"
STACKS = 200
TIMEOUT = 120.0
WARM_SCANS = 3


@dataclass
class _Scan:
    seconds: float
    entries_written: int
    hashes_reported: int

    @property
    def hashed(self) -> int:
        return max(self.entries_written, self.hashes_reported)


@dataclass
class _Samples:
    cold: list[_Scan] = field(default_factory=list)
    warm: list[_Scan] = field(default_factory=list)


def run_section(ctx: Context) -> Section:
    section = Section("Scan")
    size = MIB if ctx.quick else 2 * MIB
    s = _Samples()
    with celery_host(ctx.workdir / "scan", HOST) as host:
        templates = [write_filled(host.template_dir / f"stack-{i:03d}" / "rootfs.ext4", size) for i in range(STACKS)]
        host.client.ping(host=HOST).result(timeout=TIMEOUT)
        rounds = ctx.reps(full=3, quick=1)
        for r in range(rounds):
            ctx.log(f"scan: round {r + 1}/{rounds}")
            if r > 0:
                _touch(templates)
            s.cold.append(_scan(host))
            s.warm += [_scan(host) for _ in range(WARM_SCANS)]
    section.rows += _rows(s)
    section.notes += _notes(s, size)
    return section


def _touch(templates: list[Path]) -> None:
    """Move every template's ctime: the cache key changes, so the next scan is cold again (in the worker's
    memory too), without restarting the worker."""
    for path in templates:
        os.utime(path)


def _scan(host: Host) -> _Scan:
    cache = host.clones_dir / CACHE_DIR / "hashes"
    before = _entries(cache)
    completed: set[str] = set()

    def on_progress(meta: dict[str, Any]) -> None:
        if meta.get("done") == meta.get("total"):
            completed.add(str(meta.get("stack")))

    start = time.perf_counter()
    stacks = host.client.stacks(host=host.name).result(timeout=TIMEOUT, on_progress=on_progress)
    seconds = time.perf_counter() - start
    if len(stacks) != STACKS:
        raise RuntimeError(f"scan_stacks returned {len(stacks)} stacks, expected {STACKS}")
    after = _entries(cache)
    written = sum(1 for name, ino in after.items() if before.get(name) != ino)
    return _Scan(seconds, written, len(completed))


def _entries(cache: Path) -> dict[str, int]:
    """Cache entry name -> inode: entries are replaced by rename, so a rewritten entry has a new inode."""
    try:
        return {e.name: e.inode() for e in os.scandir(cache) if e.name.endswith(".json")}
    except FileNotFoundError:
        return {}


def _rows(s: _Samples) -> list[Row]:
    warm, cold = median([x.seconds for x in s.warm]), median([x.seconds for x in s.cold])
    warm_hashed = max(x.hashed for x in s.warm)
    cold_hashed = min(x.hashed for x in s.cold)
    timing = Row(
        f"`scan_stacks` over {STACKS} stacks: warm cache / cold cache (time)",
        ms(warm),
        ms(cold),
        ratio(warm, cold),
        None,
    )
    hashing = Row(
        f"`scan_stacks` over {STACKS} stacks, warm cache: templates hashed (most in any warm scan / fewest cold)",
        str(warm_hashed),
        str(cold_hashed),
        None,
        Target("==", 0, "hashed"),
        value=float(warm_hashed),
    )
    if hashing.met is False:
        hashing.why = _why(s)
    return [timing, hashing]


def _why(s: _Samples) -> str:
    return (
        f"warm scans wrote {[x.entries_written for x in s.warm]} cache entries and reported "
        f"{[x.hashes_reported for x in s.warm]} completed hashes: the cache key (dev, inode, size, mtime, ctime) "
        "did not match between the scans, or an entry could not be written or read back; worker/hashcache.py "
        "logs a warning when it cannot persist an entry."
    )


def _notes(s: _Samples, size: int) -> list[str]:
    per_round = _list([x.seconds for x in s.cold]), _list([x.seconds for x in s.warm])
    return [
        f"Scan: {STACKS} stacks of {fmt_bytes(size)} each (random data, in the page cache), scanned through the worker "
        f"of section 5's kind (own Redis, `--concurrency 2`). {len(s.cold)} rounds of one cold scan then "
        f"{WARM_SCANS} warm ones; before each round after the first every template's ctime was moved "
        "(`os.utime`), which changes its cache key, so the cold scan misses in the workers' memory as well as "
        "on disk. Warm scans land on either pool process: the one that scanned cold answers from memory, "
        "the other from the disk cache. Hashing was counted from outside: cache entries written during the "
        "scan and PROGRESS updates of completed hashes.",
        f"Scan samples (ms): cold {per_round[0]}; warm {per_round[1]}. Hashed per scan (entries written / "
        f"hashes reported): cold {[(x.entries_written, x.hashes_reported) for x in s.cold]}; warm "
        f"{[(x.entries_written, x.hashes_reported) for x in s.warm]}.",
    ]


def _list(values: list[float]) -> str:
    return ", ".join(f"{v * 1e3:.1f}" for v in values)

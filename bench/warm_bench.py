"""4. A clone in a fresh worker process after a warm-up elsewhere, against a clone with no warm-up.

A clone must know the template's hash (it stamps the clone with it). Cold, that means reading the whole
template: 4 GiB here, though only 64 MiB of it is data. The warm-up exists so that no clone pays that, and
it only helps if its result reaches other processes: the warm-up and the clone run in separate processes,
so the cache must travel through the disk.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    GIB,
    MIB,
    Context,
    Row,
    Section,
    Target,
    fmt_bytes,
    median,
    ms,
    ratio,
    read_through,
    run_child,
    timed,
    write_sparse,
)

STACK = "big4g"
TEMPLATE_SIZE = 4 * GIB
TEMPLATE_DATA = 64 * MIB


@dataclass
class _Samples:
    warm_up: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    warm_hashed: list[int] = field(default_factory=list)
    cold_hashed: list[int] = field(default_factory=list)
    first_read: float = 0.0


def run_section(ctx: Context) -> Section:
    section = Section("Warm against cold")
    root = ctx.workdir / "warm-cold"
    tdir = root / "templates"
    template = write_sparse(tdir / STACK / "rootfs.ext4", size=TEMPLATE_SIZE, data=TEMPLATE_DATA)
    # The first read of the holes fills the page cache with zeroed pages, several times slower than hashing
    # cached data: whichever side read first would pay it. Paid here, once, and reported.
    s = _Samples(first_read=timed(lambda: read_through(template))[0])
    reps = ctx.reps(full=3, quick=1)
    for i in range(reps):
        ctx.log(f"warm-cold: repetition {i + 1}/{reps}")
        # Alternate which goes first, so neither always finds the other's leftovers in the caches.
        order = (_cold, _warm) if i % 2 == 0 else (_warm, _cold)
        for step in order:
            step(tdir, root / f"clones-{step.__name__.strip('_')}-{i}", i, s)
    section.rows.append(_row(s))
    section.notes += _notes(s)
    return section


def _cold(tdir: Path, cdir: Path, i: int, s: _Samples) -> None:
    """A fresh process clones into an empty clones dir: no cache on disk, none in memory."""
    result = _clone(tdir, cdir, i)
    s.cold.append(float(result["seconds"]))
    s.cold_hashed.append(int(result["hashed_bytes"]))


def _warm(tdir: Path, cdir: Path, i: int, s: _Samples) -> None:
    """One process warms (as a worker does on start), then another, fresh one clones."""
    warmed = run_child("warm", str(tdir), str(cdir))
    s.warm_up.append(float(warmed["seconds"]))
    result = _clone(tdir, cdir, i)
    s.warm.append(float(result["seconds"]))
    s.warm_hashed.append(int(result["hashed_bytes"]))


def _clone(tdir: Path, cdir: Path, i: int) -> dict[str, Any]:
    try:
        return run_child("clone", str(tdir), str(cdir), f"bench-vm-{i}", STACK)
    finally:
        shutil.rmtree(cdir, ignore_errors=True)


def _row(s: _Samples) -> Row:
    warm, cold = median(s.warm), median(s.cold)
    row = Row(
        "Clone of a 4 GiB sparse template (64 MiB data) in a fresh process: after a warm-up elsewhere / none",
        ms(warm),
        ms(cold),
        ratio(warm, cold),
        Target("<=", 0.05),
    )
    if row.met is False:
        row.why = (
            f"the warm clone hashed {fmt_bytes(max(s.warm_hashed))} (should be 0) and took {ms(warm)}; the cold one "
            f"hashed {fmt_bytes(max(s.cold_hashed))} in {ms(cold)}. With nothing hashed, what is left of the warm "
            "clone is the sparse copy of the 64 MiB of data and its fsync (ext4 has no reflink), whose cost is "
            "set by the disk, not the CPU: the ratio tightens with larger templates and loosens on faster CPUs. "
            "What would close it: a reflink filesystem for the clones (section 3's clone is about a "
            "millisecond), or templates with less data per GiB of image."
        )
    return row


def _notes(s: _Samples) -> list[str]:
    return [
        f"Warm/cold: template {fmt_bytes(TEMPLATE_SIZE)} sparse with {fmt_bytes(TEMPLATE_DATA)} of data on ext4, "
        "fsynced after writing and then read once in full before anything was timed, so the whole file, holes "
        "included, was in the page cache for every timed read; caches were not dropped. That first read took "
        f"{s.first_read:.2f} s, against about {median(s.cold):.2f} s for a cold clone that found it "
        "cached: on ext4 reading a hole the first time allocates and zeroes page-cache pages (system time), "
        "which a template's first hash after it lands on a host pays. "
        f"{len(s.warm)} repetitions, each with a fresh clones dir (so a fresh hash cache). Cold: one "
        "`python -m bench.child clone` process. Warm: `python -m bench.child warm` (RootfsRegistry.warm), "
        "then a second, fresh `bench.child clone` process. Times are of `clone_for_vm` inside the process "
        "(interpreter start-up excluded: the same for both).",
        f"Warm/cold samples: warm clone {_list(s.warm)} ms, hashed {_bytes(s.warm_hashed)}; cold clone "
        f"{_list(s.cold)} ms, hashed {_bytes(s.cold_hashed)}; the warm-ups themselves took {_list(s.warm_up)} ms.",
    ]


def _list(values: list[float]) -> str:
    return ", ".join(f"{v * 1e3:.1f}" for v in values)


def _bytes(values: list[int]) -> str:
    return ", ".join(fmt_bytes(v) for v in values)

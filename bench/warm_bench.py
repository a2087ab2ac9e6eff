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
    run_child,
)
from bench.machine import free_page_reporting
from worker.dev.templates import write_sparse

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
    warm_fsync: list[float] = field(default_factory=list)
    warm_copy: list[float] = field(default_factory=list)


def run_section(ctx: Context) -> Section:
    section = Section("Warm against cold")
    root = ctx.workdir / "warm-cold"
    tdir = root / "templates"
    write_sparse(tdir / STACK / "rootfs.ext4", size=TEMPLATE_SIZE, data=TEMPLATE_DATA)
    s = _Samples()
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
    s.warm_fsync.append(float(result["fsync_seconds"]))
    s.warm_copy.append(float(result["copy_seconds"]))


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
        row.why = _why(s)
    return row


def _why(s: _Samples) -> str:
    warm, cold = median(s.warm), median(s.cold)
    fsync, copy = median(s.warm_fsync), median(s.warm_copy)
    reporting = (
        " This VM reports freed memory to its host (see the machine table), so the copy's fresh page-cache "
        "pages may each fault back from the host: the likely reason the copy's speed varies between runs."
        if free_page_reporting()
        else ""
    )
    return (
        f"the warm clone hashed {fmt_bytes(max(s.warm_hashed))}: the warm-up did its job. It took {ms(warm)}: the "
        f"copy of the template's {fmt_bytes(TEMPLATE_DATA)} of data {ms(copy)} "
        f"({TEMPLATE_DATA / copy / 1e6:.0f} MB/s), fsyncs {ms(fsync)}, the rest {ms(warm - copy - fsync)}; the "
        f"cold clone hashed {fmt_bytes(max(s.cold_hashed))} in {ms(cold)}. So what is left of a warm clone on a "
        "filesystem without reflink is copying the data, and its cost is memory and disk bandwidth, not the "
        f"registry's.{reporting} What would close it: a reflink filesystem for the clones (section 3: a clone "
        "in about a millisecond, no data copied); on ext4, nothing in the registry: the copy is already one "
        "copy_file_range per data extent."
    )


def _notes(s: _Samples) -> list[str]:
    return [
        f"Warm/cold: template {fmt_bytes(TEMPLATE_SIZE)} sparse with {fmt_bytes(TEMPLATE_DATA)} of data on ext4, "
        "fsynced after writing: its data was in the page cache from the write; nothing read its holes "
        "beforehand, and caches were not dropped. "
        f"{len(s.warm)} repetitions, each with a fresh clones dir (so a fresh hash cache). Cold: one "
        "`python -m bench.child clone` process. Warm: `python -m bench.child warm` (RootfsRegistry.warm), "
        "then a second, fresh `bench.child clone` process. Times are of `clone_for_vm` inside the process "
        "(interpreter start-up excluded: the same for both).",
        f"Warm/cold samples: warm clone {_list(s.warm)} ms (copy {_list(s.warm_copy)}, fsync {_list(s.warm_fsync)}), "
        "hashed "
        f"{_bytes(s.warm_hashed)}; cold clone "
        f"{_list(s.cold)} ms, hashed {_bytes(s.cold_hashed)}; the warm-ups themselves took {_list(s.warm_up)} ms.",
    ]


def _list(values: list[float]) -> str:
    return ", ".join(f"{v * 1e3:.1f}" for v in values)


def _bytes(values: list[int]) -> str:
    return ", ".join(fmt_bytes(v) for v in values)

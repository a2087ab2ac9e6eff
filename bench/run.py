"""Run the benchmark suite (or some sections of it) and write the report.

    .venv/bin/python -m bench.run                      # everything, writes docs/benchmarks.md
    .venv/bin/python -m bench.run --only hash,clone-ext4  # writes bench/.out/benchmarks-partial.md
    .venv/bin/python -m bench.run --quick              # smoke test, writes bench/.out/benchmarks-quick.md

Only a full run replaces docs/benchmarks.md (unless --output says otherwise): a report there always
describes every measure of one run.

Big files go to a fresh temporary directory (default under /var/tmp, on the root filesystem), which is
deleted at the end, also on an error, Ctrl-C or SIGTERM. A section that fails is reported as failed and
the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make `bench` and `worker` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    clone_bench,
    hash_bench,
    lifecycle_bench,
    metrics_bench,
    queue_bench,
    report,
    scan_bench,
    signing_bench,
    warm_bench,
)
from bench.common import PROJECT_ROOT, Context, Row, Section
from bench.machine import describe

SECTIONS: dict[str, Callable[[Context], Section]] = {
    "hash": hash_bench.run_section,
    "clone-ext4": clone_bench.run_ext4,
    "clone-xfs": clone_bench.run_xfs,
    "warm-cold": warm_bench.run_section,
    "queue": queue_bench.run_section,
    "scan": scan_bench.run_section,
    "lifecycle": lifecycle_bench.run_section,
    "metrics": metrics_bench.run_section,
    "signing": signing_bench.run_section,
}

DEFAULT_OUTPUT = PROJECT_ROOT / "docs" / "benchmarks.md"
QUICK_OUTPUT = PROJECT_ROOT / "bench" / ".out" / "benchmarks-quick.md"
PARTIAL_OUTPUT = PROJECT_ROOT / "bench" / ".out" / "benchmarks-partial.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections (default: all of {','.join(SECTIONS)})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller files; a smoke test")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"report path (default: {_rel(DEFAULT_OUTPUT)} for a full run, {_rel(QUICK_OUTPUT)} with --quick, "
        f"{_rel(PARTIAL_OUTPUT)} with --only)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent of the temporary directory")
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    partial = set(args.sections) != set(SECTIONS)
    args.output = args.output or (QUICK_OUTPUT if args.quick else PARTIAL_OUTPUT if partial else DEFAULT_OUTPUT)
    return args


def _rel(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def _terminate(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` (unmount, stop workers, delete files) runs."""
    raise SystemExit(128 + signum)


def run_sections(names: list[str], ctx: Context) -> tuple[list[Section], bool]:
    """Each section in its own subdirectory; a failure becomes a row saying so, and the rest still run."""
    sections: list[Section] = []
    ok = True
    for name in names:
        ctx.log(f"== {name}")
        sub = Context(ctx.workdir / name, ctx.quick)
        sub.workdir.mkdir()
        try:
            sections.append(SECTIONS[name](sub))
        except Exception as exc:  # noqa: BLE001 - reported in the table and in the exit status
            traceback.print_exc()
            ok = False
            failed = Row(f"section `{name}`", "—", "—", None, None, skipped=f"failed: {type(exc).__name__}: {exc}")
            sections.append(Section(name, [failed]))
        finally:
            shutil.rmtree(sub.workdir, ignore_errors=True)
    return sections, ok


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="rootfs-bench-", dir=args.workdir))
    try:
        ctx = Context(workdir, args.quick)
        machine = describe(workdir)
        sections, ok = run_sections(args.sections, ctx)
        machine.append(("Load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report.render(sections, machine, quick=args.quick, seconds=time.monotonic() - started)
    report.write(args.output, text)
    print(f"bench: wrote {args.output}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

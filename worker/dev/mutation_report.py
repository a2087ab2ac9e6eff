"""The mutation score per module and the surviving mutants, read from mutmut 3's working copy (./mutants).

mutmut keeps one `<module>.py.meta` (JSON: exit code per mutant) and one `<module>.py.spans` (the line span of
every generated function in the mutated file) per source file. Reading them directly keeps this report free
of mutmut's internals and of its dependencies, so it also runs where mutmut is not installed.

Score = caught / (mutants - skipped): a mutant is caught when a test failed (killed), the tests hung (timeout;
an endless loop is a behaviour change too) or the test process crashed. Survivors and mutants no test reached
both count against the score: every mutant counts, the message and field mutants included.

    python -m worker.dev.mutation_report [--dir mutants] [--markdown] [--no-diffs] [--json FILE]
    python -m worker.dev.mutation_report --retest-untested 'tasks.*' tests/service/test_tasks.py
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: mutmut's exit codes (mutmut/stats.py), grouped the way the score counts them.
CAUGHT = {"killed": {1, 3}, "timeout": {36, 24, -24, 152, 255}, "crashed": {-11, -9}}
SURVIVED = {0}
NO_TESTS = {5, 33}
SKIPPED = {34}
#: Statuses in the order the table shows them.
STATUSES = ("killed", "timeout", "crashed", "survived", "no tests", "skipped", "other", "not checked")

_MUTANT_SUFFIX = re.compile(r"__mutmut_\d+$")


def status_of(code: int | None) -> str:
    if code is None:
        return "not checked"
    for name, codes in CAUGHT.items():
        if code in codes:
            return name
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    if code in SKIPPED:
        return "skipped"
    return "other"


@dataclass
class ModuleResult:
    module: str
    source: Path
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    survivors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def caught(self) -> int:
        return sum(self.counts[name] for name in CAUGHT)

    @property
    def checked(self) -> int:
        return self.total - self.counts["skipped"] - self.counts["not checked"]

    @property
    def score(self) -> float | None:
        return None if self.checked == 0 else 100.0 * self.caught / self.checked


def meta_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py.meta") if "tests" not in p.relative_to(root).parts)


def load(root: Path) -> list[ModuleResult]:
    results = []
    for meta in meta_files(root):
        source = meta.relative_to(root).with_suffix("")  # worker/core/locks.py
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        result = ModuleResult(".".join(source.with_suffix("").parts), source)
        for key, code in sorted(codes.items(), key=lambda kv: _natural(kv[0])):
            status = status_of(code)
            result.counts[status] += 1
            if status in ("survived", "no tests", "other"):
                result.survivors.append(key)
        results.append(result)
    return results


def _natural(key: str) -> tuple[str, int]:
    name, _, number = key.rpartition("__mutmut_")
    return (name, int(number)) if number.isdigit() else (key, 0)


def mutant_diff(root: Path, source: Path, key: str) -> str:
    """The mutated lines of one mutant, as a unified diff against the original function."""
    spans = json.loads((root / f"{source}.spans").read_text())["spans"]
    generated = key.rpartition(".")[2]
    orig = _MUTANT_SUFFIX.sub("__mutmut_orig", generated)
    if generated not in spans or orig not in spans:
        return f"  (no source span for {generated})"
    lines = (root / source).read_text().splitlines()

    def body(name: str) -> list[str]:
        start, end = spans[name]
        return [line.replace(name, "f") for line in lines[start - 1 : end]]

    diff = difflib.unified_diff(body(orig), body(generated), lineterm="", n=0)
    return "\n".join(f"  {line}" for line in list(diff)[2:] if not line.startswith("@@"))


def table(results: Sequence[ModuleResult], *, markdown: bool) -> str:
    heads = ["module", "mutants", "killed", "timeout", "crashed", "survived", "no tests", "score"]
    rows: list[list[str]] = []
    for r in [*results, _total(results)]:
        score = "-" if r.score is None else f"{r.score:.1f}%"
        c = r.counts
        numbers = [r.total, c["killed"], c["timeout"], c["crashed"], c["survived"], c["no tests"]]
        rows.append([r.module, *(str(n) for n in numbers), score])
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(v) for v in col) for col in zip(heads, *rows, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [heads, *rows])


def _total(results: Iterable[ModuleResult]) -> ModuleResult:
    total = ModuleResult("all", Path())
    for r in results:
        for name, n in r.counts.items():
            total.counts[name] += n
    return total


def retest_untested(root: Path, pattern: str, tests: Sequence[str]) -> None:
    """Run `tests` against each untested mutant matching `pattern`, selected by MUTANT_UNDER_TEST (which the
    worker processes the tests start inherit), and record the verdict where mutmut keeps it."""
    for meta in meta_files(root):
        data = json.loads(meta.read_text())
        codes: dict[str, int | None] = data["exit_code_by_key"]
        todo = [k for k, code in codes.items() if fnmatch.fnmatch(k, pattern) and code in NO_TESTS]
        for n, key in enumerate(sorted(todo, key=_natural), 1):
            env = {**os.environ, "MUTANT_UNDER_TEST": key, "PY_IGNORE_IMPORTMISMATCH": "1"}
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
            done = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            codes[key] = done.returncode
            print(f"[{n}/{len(todo)}] {key}: {status_of(done.returncode)}", flush=True)
            meta.write_text(json.dumps(data, indent=4))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("mutants"), help="mutmut's working copy")
    parser.add_argument("--markdown", action="store_true", help="the table as markdown (for docs/mutation.md)")
    parser.add_argument("--no-diffs", action="store_true", help="list surviving mutants by name only")
    parser.add_argument("--json", type=Path, help="also write the counts and survivors to this file")
    parser.add_argument("--retest-untested", metavar="PATTERN", help="run TESTS against untested mutants")
    parser.add_argument("tests", nargs="*", help="with --retest-untested: the tests to run")
    args = parser.parse_args(argv)
    root: Path = args.dir
    if not root.is_dir():
        print(f"no {root}: run `make mutation` first", file=sys.stderr)
        return 2
    if args.retest_untested:
        retest_untested(root, args.retest_untested, args.tests or ["tests/"])
        return 0
    results = load(root)
    print(table(results, markdown=args.markdown))
    for r in results:
        if not r.survivors:
            continue
        print(f"\n## {r.module}: {len(r.survivors)} not caught")
        for key in r.survivors:
            print(f"{key}  [{status_of(json.loads((root / f'{r.source}.meta').read_text())['exit_code_by_key'][key])}]")
            if not args.no_diffs:
                print(mutant_diff(root, r.source, key))
    if args.json:
        args.json.write_text(
            json.dumps(
                {r.module: {"counts": r.counts, "score": r.score, "survivors": r.survivors} for r in results}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

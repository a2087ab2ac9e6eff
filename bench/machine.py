"""What the numbers were measured on: a ratio only means something next to the machine that produced it.

Every probe degrades to "unknown" rather than failing the run: a missing `lscpu` should not cost the
benchmark, only a line of the description.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from bench.common import GIB, PROJECT_ROOT


def describe(workdir: Path) -> list[tuple[str, str]]:
    """(label, value) pairs for the report's machine table."""
    probes: list[tuple[str, Callable[[], str]]] = [
        ("CPU", _cpu_model),
        ("Cores", lambda: f"{os.cpu_count()} online" + _sha_ni()),
        ("Memory", _memory),
        ("Kernel", lambda: f"{platform.system()} {platform.release()}"),
        ("Work dir filesystem", lambda: _filesystem(workdir)),
        ("Load average at start", lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("Python", platform.python_version),
        ("celery / kombu / redis-py", lambda: " / ".join(_version(p) for p in ("celery", "kombu", "redis"))),
        ("redis-server", lambda: _first_match(["redis-server", "--version"], r"v=(\S+)")),
        ("openssl", lambda: _output(["openssl", "version"])),
        ("coreutils (cp, sync, sha256sum)", lambda: _first_match(["cp", "--version"], r"(\d+\.\d+)")),
        ("xfsprogs", lambda: _first_match(["mkfs.xfs", "-V"], r"version (\S+)")),
        ("Code measured", _git_revision),
    ]
    return [(label, _safe(probe)) for label, probe in probes]


def _safe(probe: Callable[[], str]) -> str:
    try:
        return probe() or "unknown"
    except (OSError, subprocess.SubprocessError, ValueError, metadata.PackageNotFoundError):
        return "unknown"


def _output(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd=PROJECT_ROOT)
    return (done.stdout or done.stderr).strip()


def _first_match(argv: list[str], pattern: str) -> str:
    match = re.search(pattern, _output(argv))
    return match.group(1) if match else "unknown"


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text()
    match = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    model = match.group(1).strip() if match else platform.processor()
    hypervisor = " (virtual machine)" if re.search(r"^flags\s*:.*\bhypervisor\b", info, re.MULTILINE) else ""
    return model + hypervisor


def _sha_ni() -> str:
    """Whether SHA-256 has CPU instructions here: it sets the hashing ceiling by a factor of ~3."""
    flags = Path("/proc/cpuinfo").read_text()
    return ", SHA extensions (sha_ni)" if re.search(r"\bsha_ni\b", flags) else ", no SHA extensions"


def _memory() -> str:
    match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return f"{int(match.group(1)) * 1024 / GIB:.1f} GiB" if match else "unknown"


def _filesystem(path: Path) -> str:
    """Type, device and mount options of the filesystem holding `path`."""
    fields = _output(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(path)]).split()
    return f"{fields[0]} on {fields[1]} ({fields[2]}), {path}" if len(fields) >= 3 else "unknown"


def _version(package: str) -> str:
    return metadata.version(package)


def _git_revision() -> str:
    revision = _output(["git", "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{revision} + uncommitted changes" if dirty else revision

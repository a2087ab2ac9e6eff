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
        ("Memory", lambda: _memory() + _page_reporting_text()),
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


def free_page_reporting() -> bool:
    """Whether a virtio balloon here reports free pages to the host (feature bit 5, VIRTIO_BALLOON_F_REPORTING).

    Then memory the guest frees goes back to the host, and the first touch of it faults it back in: page-cache
    pages a read or a copy allocates cost several times more than on bare metal, by an amount that depends on
    which free pages the allocator hands out, so it shows as noise in anything that fills the page cache.
    """
    for device in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (device / "device").read_text().strip() == "0x0005":
                features = (device / "features").read_text().strip()
                return len(features) > 5 and features[5] == "1"
        except OSError:
            continue
    return False


def _page_reporting_text() -> str:
    return (
        ", virtio-balloon free page reporting on (first touch of freed memory faults to the host)"
        if (free_page_reporting())
        else ""
    )


def _filesystem(path: Path) -> str:
    """Type, device, journal and mount options of the filesystem holding `path`."""
    fields = _output(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(path)]).split()
    if len(fields) < 3:
        return "unknown"
    fstype, source, options = fields[:3]
    journal = {True: " without a journal", False: " with a journal", None: ""}[ext4_without_journal(path)]
    return f"{fstype}{journal} on {source} ({options}), {path}"


def ext4_without_journal(path: Path) -> bool | None:
    """Whether `path` is on an ext4 with no journal (None: not ext4, or cannot tell). Without one, fsync
    writes metadata in place and inode allocation skips recently deleted inodes, which both change what a
    clone costs; the mount options do not say so, /sys/fs/ext4/<dev>/journal_task does."""
    fields = _output(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)]).split()
    if len(fields) < 2 or fields[0] != "ext4":
        return None
    try:
        return (Path("/sys/fs/ext4") / Path(fields[1]).name / "journal_task").read_text().strip() == "<none>"
    except OSError:
        return None


def _version(package: str) -> str:
    return metadata.version(package)


def _git_revision() -> str:
    revision = _output(["git", "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{revision} + uncommitted changes" if dirty else revision

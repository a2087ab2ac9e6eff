"""What the registry hands out: plain frozen values, each with the ONE JSON shape its result has on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: How a clone came to be: a reflink, a (sparse) copy, or already there from an earlier call.
CloneOrigin = Literal["reflink", "copy", "existing"]


@dataclass(frozen=True)
class HashWork:
    """What finding template hashes cost: cache hits, hashes computed, their bytes and seconds.

    `RootfsRegistry.hash_work` returns the running total of one registry; the service layer turns the
    difference across a job into metrics (also for a job that failed after hashing), so the core stays free
    of them.
    """

    hits: int = 0
    misses: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def __add__(self, other: HashWork) -> HashWork:
        return HashWork(
            self.hits + other.hits, self.misses + other.misses, self.bytes + other.bytes, self.seconds + other.seconds
        )

    def __sub__(self, other: HashWork) -> HashWork:
        return HashWork(
            self.hits - other.hits, self.misses - other.misses, self.bytes - other.bytes, self.seconds - other.seconds
        )


@dataclass(frozen=True)
class StackInfo:
    name: str
    template_path: Path
    size_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of a stack in a scan result (the template's path is host-local, so not in it)."""
        return {"name": self.name, "size_bytes": self.size_bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class VmRootfs:
    vm_id: str
    stack: str
    path: Path
    source_sha256: str
    #: How this call found or made the clone: not part of the clone's identity (`==` ignores it).
    method: CloneOrigin = field(default="existing", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "stack": self.stack,
            "path": str(self.path),
            "source_sha256": self.source_sha256,
            "method": self.method,
        }


@dataclass(frozen=True)
class WarmReport:
    """What a warm-up did, so operators can see whether the fleet's caches hold."""

    hashed: tuple[str, ...] = ()
    already_warm: tuple[str, ...] = ()
    bytes_hashed: int = 0
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)
    busy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "hashed": list(self.hashed),
            "already_warm": list(self.already_warm),
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 6),
            "failed": dict(self.failed),
            "busy": self.busy,
        }

"""What the registry hands out: plain frozen values, each with the ONE JSON shape its result has on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "stack": self.stack,
            "path": str(self.path),
            "source_sha256": self.source_sha256,
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

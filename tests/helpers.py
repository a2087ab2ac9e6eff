"""Small helpers shared by the test modules (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MIB = 1024 * 1024


def write_template(template_dir: Path, stack: str, data: bytes) -> Path:
    path = template_dir / stack / "rootfs.ext4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_sparse_template(template_dir: Path, stack: str, *, size: int, data_mib: int, chunks: int = 8) -> Path:
    """A sparse image of `size` bytes holding `data_mib` MiB of non-zero data spread over `chunks` extents."""
    path = template_dir / stack / "rootfs.ext4"
    path.parent.mkdir(parents=True, exist_ok=True)
    per_chunk = data_mib * MIB // chunks
    block = (b"rootfs-data-" * (MIB // 12 + 1))[:MIB]
    with path.open("wb") as f:
        f.truncate(size)
        stride = size // chunks
        for i in range(chunks):
            f.seek(i * stride)
            for _ in range(per_chunk // MIB):
                f.write(block)
        # Allocated as on a real host: delayed allocation would hide the extent-tree block from st_blocks.
        f.flush()
        os.fsync(f.fileno())
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def tree(root: Path) -> set[str]:
    """Every path below root, relative, for before/after comparisons."""
    return {os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs}

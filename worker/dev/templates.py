"""The one writer of sample template images, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

MIB = 1024 * 1024
_PATTERN = b"rootfs-data-"


def write_template(template_dir: Path, stack: str, data: bytes) -> Path:
    """`<template_dir>/<stack>/rootfs.ext4` holding exactly `data`."""
    path = template_dir / stack / "rootfs.ext4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_sparse(path: Path, *, size: int, data: int, chunks: int = 8, salt: bytes = b"") -> Path:
    """A sparse image of `size` bytes with `data` bytes of non-zero data spread over `chunks` extents.

    `salt` makes images of the same shape hash differently. Flushed before returning: ext4 and XFS delay
    allocation, and an unallocated template would both hide its extent blocks from st_blocks and leave
    writeback to land in the middle of a timed clone.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    unit = _PATTERN + salt
    block = (unit * (MIB // len(unit) + 1))[:MIB]
    per_chunk = data // chunks
    with path.open("wb") as f:
        f.truncate(size)
        stride = size // chunks
        for i in range(chunks):
            f.seek(i * stride)
            for _ in range(per_chunk // MIB):
                f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return path


def write_sparse_template(template_dir: Path, stack: str, *, size: int, data_mib: int, chunks: int = 8) -> Path:
    """`write_sparse` at the template's place in `template_dir`."""
    return write_sparse(template_dir / stack / "rootfs.ext4", size=size, data=data_mib * MIB, chunks=chunks)

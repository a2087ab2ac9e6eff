"""Where templates and clones live, and the space a clone must leave free. Read from an environment mapping
when asked, never at import time."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.core.space import DEFAULT_RESERVE, MIN_FREE_VAR, Reserve

DEFAULT_TEMPLATE_DIR = "/var/lib/microvm/rootfs-templates"
DEFAULT_CLONES_DIR = "/var/lib/microvm/rootfs"
TEMPLATE_DIR_VAR = "MICROVM_ROOTFS_TEMPLATE_DIR"
CLONES_DIR_VAR = "MICROVM_ROOTFS_CLONES_DIR"


@dataclass(frozen=True)
class RootfsConfig:
    """The two directories the Rust runtime shares with us (same variables and defaults as the seed), and
    our own disk-space reserve for copies into the clones dir."""

    template_dir: Path = Path(DEFAULT_TEMPLATE_DIR)
    clones_dir: Path = Path(DEFAULT_CLONES_DIR)
    min_free: Reserve = DEFAULT_RESERVE

    def __post_init__(self) -> None:
        object.__setattr__(self, "template_dir", Path(self.template_dir))
        object.__setattr__(self, "clones_dir", Path(self.clones_dir))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RootfsConfig:
        env = os.environ if env is None else env
        return cls(
            template_dir=Path(env.get(TEMPLATE_DIR_VAR) or DEFAULT_TEMPLATE_DIR),
            clones_dir=Path(env.get(CLONES_DIR_VAR) or DEFAULT_CLONES_DIR),
            min_free=Reserve.parse(env[MIN_FREE_VAR]) if env.get(MIN_FREE_VAR, "").strip() else DEFAULT_RESERVE,
        )

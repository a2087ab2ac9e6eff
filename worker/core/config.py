"""Where templates and clones live. Read from an environment mapping when asked, never at import time."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEMPLATE_DIR = "/var/lib/microvm/rootfs-templates"
DEFAULT_CLONES_DIR = "/var/lib/microvm/rootfs"
TEMPLATE_DIR_VAR = "MICROVM_ROOTFS_TEMPLATE_DIR"
CLONES_DIR_VAR = "MICROVM_ROOTFS_CLONES_DIR"


@dataclass(frozen=True)
class RootfsConfig:
    """The two directories the Rust runtime shares with us; same variables and defaults as the seed."""

    template_dir: Path = Path(DEFAULT_TEMPLATE_DIR)
    clones_dir: Path = Path(DEFAULT_CLONES_DIR)

    def __post_init__(self) -> None:
        object.__setattr__(self, "template_dir", Path(self.template_dir))
        object.__setattr__(self, "clones_dir", Path(self.clones_dir))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RootfsConfig:
        env = os.environ if env is None else env
        return cls(
            template_dir=Path(env.get(TEMPLATE_DIR_VAR) or DEFAULT_TEMPLATE_DIR),
            clones_dir=Path(env.get(CLONES_DIR_VAR) or DEFAULT_CLONES_DIR),
        )

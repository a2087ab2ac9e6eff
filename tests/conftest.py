from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers import sha256_of, write_sparse_template, write_template
from worker import RootfsConfig, RootfsRegistry

pytest_plugins = ["tests.workers"]

# Under mutation testing (scripts/mutation.sh sets HYPOTHESIS_PROFILE) every mutant must meet the same examples,
# and the trampolines mutmut wraps around each function make calls slower: no deadline.
settings.register_profile("mutation", derandomize=True, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _mutant_cannot_touch_the_working_copy(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under mutmut the tests run inside its working copy (./mutants): a mutant that turns a path into None or ""
    would act on the current directory (scandir(None) lists "."), so each test starts in an empty one instead.
    It holds only mutmut's config, which the `spawn` children of multiprocessing tests read when they start."""
    if "MUTANT_UNDER_TEST" in os.environ:
        cwd = tmp_path_factory.mktemp("cwd")
        shutil.copy("pyproject.toml", cwd / "pyproject.toml")
        monkeypatch.chdir(cwd)


@dataclass
class Env:
    """A registry over tmp dirs that remembers the sha256 of every template a test writes through it, so
    the teardown can check that no template was modified and nothing was written beside the clones dir."""

    registry: RootfsRegistry
    template_dir: Path
    clones_dir: Path
    root: Path
    expected: dict[Path, str] = field(default_factory=dict)

    def template(self, stack: str, data: bytes) -> Path:
        path = write_template(self.template_dir, stack, data)
        self.expected[path] = sha256_of(path)
        return path

    def sparse_template(self, stack: str, *, size: int, data_mib: int) -> Path:
        path = write_sparse_template(self.template_dir, stack, size=size, data_mib=data_mib)
        self.expected[path] = sha256_of(path)
        return path

    def forget(self, path: Path) -> None:
        """For tests that change a template on purpose."""
        self.expected.pop(path, None)

    def registry_again(self) -> RootfsRegistry:
        """A second registry on the same dirs: what another worker process sees."""
        return RootfsRegistry(RootfsConfig(self.template_dir, self.clones_dir))


#: Top-level names a test may create beside the template and clones dirs (e.g. a file planted outside).
ALLOWED_TOP = {"templates", "clones", "outside"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    template_dir = tmp_path / "templates"
    clones_dir = tmp_path / "clones"
    template_dir.mkdir()
    e = Env(RootfsRegistry(RootfsConfig(template_dir, clones_dir)), template_dir, clones_dir, tmp_path)
    yield e
    for path, digest in e.expected.items():
        assert sha256_of(path) == digest, f"template {path} was modified"
    extra = {p.name for p in tmp_path.iterdir()} - ALLOWED_TOP
    assert not extra, f"written outside the clones dir: {extra}"

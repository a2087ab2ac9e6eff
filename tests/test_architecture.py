"""The walls between the rooms (README "Architecture"), checked rather than written down."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import worker

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "worker" / "core"


def foreign_imports(source: str) -> list[str]:
    """Modules a core source imports beyond the standard library, worker.core and worker.errors."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the package it is in
                continue
            base = node.module or ""
            names = [f"{base}.{alias.name}" if base == "worker" else base for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            allowed = (
                top in sys.stdlib_module_names
                or name == "worker.errors"
                or name == "worker.core"
                or name.startswith("worker.core.")
            )
            if not allowed:
                found.append(name)
    return found


def test_the_allowlist_check_catches_what_it_must_and_passes_what_it_may() -> None:
    """The checker flags Celery, redis, the service and dev rooms, and lets stdlib, core and errors through."""
    assert foreign_imports("import celery\nfrom redis import Redis\nfrom worker.service import runtime") == [
        "celery",
        "redis",
        "worker.service",
    ]
    assert foreign_imports("from worker import dev") == ["worker.dev"]
    assert foreign_imports("import os, hashlib\nfrom worker.core import fsops\nfrom worker.errors import X") == []


@pytest.mark.parametrize("module", sorted(p.name for p in CORE.glob("*.py")))
def test_core_modules_import_only_the_standard_library_and_worker_errors(module: str) -> None:
    """Every module of worker/core imports the standard library, worker.core and worker.errors only."""
    assert foreign_imports((CORE / module).read_text()) == []


def test_import_contracts_hold() -> None:
    """import-linter's contracts (pyproject.toml): pure core, no dev tooling in what ships, client by name."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_importing_the_public_api_loads_no_service_library() -> None:
    """`import worker` (what a user of the core does) loads no celery, kombu, redis or click."""
    probe = "import sys, worker; print(' '.join(m for m in ('celery','kombu','redis','click') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
    loaded = subprocess.run(
        [sys.executable, "-c", probe.replace("import sys, worker", "import sys, worker.celery")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "celery" in loaded.stdout.split(), "the probe must see celery when the app is imported"


def test_public_api_is_pinned() -> None:
    """`from worker import ...` offers exactly these names, each importable (a removal is a breaking change)."""
    assert worker.__all__ == [
        "CloneInUse",
        "FilesystemError",
        "InsufficientSpace",
        "InvalidArgument",
        "InvalidMessage",
        "InvalidStackName",
        "InvalidVmId",
        "RemoteError",
        "RootfsConfig",
        "RootfsError",
        "RootfsRegistry",
        "StackInfo",
        "StackNotFound",
        "StampMismatch",
        "TaskTimeout",
        "TemplateBusy",
        "TemplateChanged",
        "VmBusy",
        "VmIdConflict",
        "VmRootfs",
        "WarmReport",
        "safe_vm_id",
    ]
    for name in worker.__all__:
        assert getattr(worker, name) is not None


def test_the_package_ships_its_type_information() -> None:
    """worker/py.typed exists and is packaged, so a scheduler importing worker.client is type-checked."""
    assert (ROOT / "worker" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["worker"]

"""What an operator deploys must match the code: docker-compose.yml, Dockerfile, README, CI entry."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery
from celery.app.utils import find_app
from click.testing import CliRunner

from worker.cli import main as cli_main
from worker.service.settings import SETTINGS, Settings, markdown_table

ROOT = Path(__file__).resolve().parent.parent
KNOWN = {s.env for s in SETTINGS}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def test_compose_has_redis_worker_and_beat(compose: dict[str, Any]) -> None:
    """The compose file runs Redis, one host-pinned worker and the beat."""
    assert {"redis", "worker", "beat"} <= set(compose["services"])


def test_compose_redis_keeps_jobs_and_never_evicts(compose: dict[str, Any]) -> None:
    """Redis runs with AOF on and maxmemory-policy noeviction, so no queued job or result vanishes."""
    cmd = " ".join(_command(compose["services"]["redis"]))
    assert "--appendonly yes" in cmd
    assert "--maxmemory-policy noeviction" in cmd


@pytest.mark.parametrize("service,role", [("worker", "worker"), ("beat", "beat")])
def test_compose_commands_are_the_real_entry_points(compose: dict[str, Any], service: str, role: str) -> None:
    """`celery -A <app> worker|beat` names an importable Celery app: the one this project defines."""
    cmd = _command(compose["services"][service])
    assert cmd[:2] == ["celery", "-A"] and cmd[3] == role
    app = find_app(cmd[2])
    assert isinstance(app, Celery)
    app.loader.import_default_modules()  # what `celery worker` does at start
    assert {"rootfs.clone_for_vm", "rootfs.release_vm", "rootfs.scan_stacks", "rootfs.warm_hashes"} <= set(app.tasks)


@pytest.mark.parametrize("service", ["worker", "beat"])
def test_compose_environment_uses_only_known_variables(compose: dict[str, Any], service: str) -> None:
    """Every variable set in the compose file is one the settings read (a typo fails here) and is valid."""
    env = {str(k): str(v) for k, v in compose["services"][service]["environment"].items()}
    assert set(env) <= KNOWN, f"unknown variables: {set(env) - KNOWN}"
    Settings.from_env(env)


def test_compose_redis_healthcheck_pings_and_others_wait_for_it(compose: dict[str, Any]) -> None:
    """Redis is checked with `redis-cli ping`; the worker and the beat start only once it is healthy."""
    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("worker", "beat"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}, name


@pytest.mark.parametrize("service,role", [("worker", "worker"), ("beat", "beat")])
def test_compose_healthchecks_run_the_real_probe(
    compose: dict[str, Any], service: str, role: str, tmp_path: Path
) -> None:
    """The worker's and beat's healthchecks are `rootfs-worker health --live` commands that parse and run:
    unhealthy (exit 1, one line) with no heartbeat file, never a usage error."""
    check = compose["services"][service]["healthcheck"]
    test = [str(c) for c in check["test"]]
    assert test[0] == "CMD" and test[1] == "rootfs-worker"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert test[1] in project["scripts"]
    assert "--live" in test and (role == "worker" or test[-2:] == ["--role", "beat"])
    env = {str(k): str(v) for k, v in compose["services"][service]["environment"].items()}
    result = CliRunner().invoke(cli_main, test[2:], env={**env, "ROOTFS_RUN_DIR": str(tmp_path)})
    assert result.exit_code == 1, result.output
    assert result.output.startswith("no heartbeat file") and result.output.count("\n") == 1


def test_compose_publishes_the_metrics_port_and_says_how_to_scrape(compose: dict[str, Any]) -> None:
    """The worker's ROOTFS_METRICS_PORT is published, and the file says how to scrape it."""
    worker = compose["services"]["worker"]
    port = Settings.from_env({str(k): str(v) for k, v in worker["environment"].items()}).metrics_port
    assert port is not None
    assert f"{port}:{port}" in [str(p) for p in worker["ports"]]
    text = (ROOT / "docker-compose.yml").read_text()
    assert "job_name: rootfs-worker" in text and f":{port}/metrics" in text


def test_compose_worker_is_pinned_and_mounts_its_directories(compose: dict[str, Any]) -> None:
    """The worker names its host and mounts the template (read-only) and clone dirs where settings point."""
    worker = compose["services"]["worker"]
    settings = Settings.from_env({str(k): str(v) for k, v in worker["environment"].items()})
    assert worker["environment"].get("ROOTFS_HOST"), "a worker must be pinned to a host"
    mounts = {v.split(":")[1]: v.split(":")[2:] for v in worker["volumes"]}
    assert str(settings.rootfs.template_dir) in mounts and mounts[str(settings.rootfs.template_dir)] == ["ro"]
    assert str(settings.rootfs.clones_dir) in mounts


def test_dockerfile_installs_the_package_with_its_tasks() -> None:
    """The image installs this package (worker and tasks) so `celery -A worker` finds the app."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY worker ", text, re.M) and re.search(r"^COPY tasks ", text, re.M)
    assert "pip install" in text


def test_readme_documents_every_variable_with_its_default() -> None:
    """The README's variable table is the one derived from the settings' definitions, verbatim."""
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme
    rows = re.findall(r"^\| `([A-Z_]+)` \|", readme, re.M)
    assert sorted(rows) == sorted(KNOWN), "a variable documented twice, or one the settings do not read"


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    """.ci/run calls the README's test command, and both README commands exist."""
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "scripts" / "demo.sh").is_file()


def test_console_script_points_at_the_cli() -> None:
    """`rootfs-worker` is installed as a console script for the click CLI."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["rootfs-worker"] == "worker.cli:main"

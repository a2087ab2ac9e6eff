"""docs/alerts.yml: loadable Prometheus rules that name only metrics the worker exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.service.metrics import HostCollector, JobMetrics
from worker.service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "alerts.yml"

#: What the issue asks an operator to be alerted on, and the rule that covers it.
REQUIRED = {
    "RootfsWorkerDown",
    "RootfsCloneSlow",
    "RootfsTransientErrorsRising",
    "RootfsClonesDiskLow",
    "RootfsHashesNotWarm",
}
#: Series Prometheus itself makes for every target.
PROMETHEUS_OWN = {"up"}


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def exported_sample_names(tmp_path: Path) -> set[str]:
    """Every sample name a worker's scrape can hold (histograms with _bucket/_sum/_count), taken from the
    worker's own metric definitions and scrape-time collector, parsed back with the library's parser."""
    registry = CollectorRegistry()
    m = JobMetrics("h", registry)
    m.clone(0.001, method="copy", outcome="ok")
    m.release(0.001, outcome="ok")
    m.error("clone_for_vm", "FilesystemError", transient=True)
    m.retry("clone_for_vm")
    m.cache_hits.labels("h").inc()
    m.cache_misses.labels("h").inc()
    m.hashed_bytes.labels("h").inc()
    m.hashing_seconds.labels("h").inc()
    m.warm_succeeded(1.0)
    env = {"ROOTFS_HOST": "h", "MICROVM_ROOTFS_TEMPLATE_DIR": str(tmp_path), "MICROVM_ROOTFS_CLONES_DIR": str(tmp_path)}
    registry.register(HostCollector(Settings.from_env(env), tmp_path / "health.json", active=lambda: []))
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_alert_rules_are_well_formed_and_cover_the_required_cases() -> None:
    """One group of alerting rules, each with an expression, a duration, a severity and a summary."""
    rules = _rules()
    assert {r["alert"] for r in rules} >= REQUIRED
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["expr"].strip() and re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_every_metric_an_alert_names_is_exported(tmp_path: Path) -> None:
    """Each `rootfs_*` name in an expression (with its _bucket/_count/_sum suffix) is one the worker
    exports; a renamed metric would silently never fire."""
    exported = exported_sample_names(tmp_path)
    named: set[str] = set()
    for rule in _rules():
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # label values are not metric names
        named |= set(re.findall(r"\b(rootfs_[a-z0-9_]+|up)\b", expr))
    assert {"rootfs_clone_duration_seconds_bucket", "rootfs_errors_total", "rootfs_clones_fs_free_bytes"} <= named
    missing = named - exported - PROMETHEUS_OWN
    assert not missing, f"alerts name metrics the worker does not export: {sorted(missing)}"
    assert "rootfs_not_a_metric" not in exported  # the check can fail


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_rules() -> None:
    """Prometheus' own checker loads the file (run where promtool is installed)."""
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

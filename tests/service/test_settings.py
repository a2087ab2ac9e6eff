"""Settings: one definition per variable, typed defaults, clear errors naming the variable, env mapping only."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from worker.core.config import RootfsConfig
from worker.service.settings import SETTINGS, Settings


def test_every_field_is_filled_by_exactly_one_definition() -> None:
    """SETTINGS fills the Settings fields one to one, in order, each from its own variable."""
    assert [s.field for s in SETTINGS] == [f.name for f in fields(Settings)]
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_defaults_are_typed_values_not_strings() -> None:
    """With nothing set, every setting has its documented default, with its type."""
    s = Settings.from_env({"ROOTFS_HOST": "hv-1"})
    assert s.concurrency == 4 and isinstance(s.concurrency, int)
    assert s.retry_base == 1.0 and isinstance(s.retry_base, float)
    assert s.warm_on_start is True
    assert s.template_dir == Path("/var/lib/microvm/rootfs-templates")
    assert s.rootfs == RootfsConfig(Path("/var/lib/microvm/rootfs-templates"), Path("/var/lib/microvm/rootfs"))
    assert s.soft_time_limit == 1800 - 30
    assert s.visibility_timeout == 1800 + 60 + 300


def test_values_are_read_from_the_mapping_given_not_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mapping passed in is the only source: the process environment does not leak into it."""
    monkeypatch.setenv("ROOTFS_CONCURRENCY", "9")
    assert Settings.from_env({"ROOTFS_HOST": "hv-1"}).concurrency == 4
    assert Settings.from_env({"ROOTFS_HOST": "hv-1", "ROOTFS_CONCURRENCY": "7"}).concurrency == 7
    assert Settings.from_env().concurrency == 9


def test_derived_defaults_follow_the_values_they_derive_from() -> None:
    """The soft limit and visibility timeout follow a changed time limit and retry cap."""
    s = Settings.from_env({"ROOTFS_HOST": "hv-1", "ROOTFS_TASK_TIME_LIMIT": "40", "ROOTFS_RETRY_CAP": "5"})
    assert s.soft_time_limit == 36
    assert s.visibility_timeout == 40 + 5 + 300


@pytest.mark.parametrize(
    ("var", "raw", "says"),
    [
        ("ROOTFS_CONCURRENCY", "four", "whole number"),
        ("ROOTFS_CONCURRENCY", "0", "at least 1"),
        ("ROOTFS_RETRY_BASE", "nan", "at least"),
        ("ROOTFS_WARM_ON_START", "maybe", "true/false"),
        ("ROOTFS_HOST", "bad host/name", "letters, digits"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(var: str, raw: str, says: str) -> None:
    """A value that does not parse raises ValueError that names the variable, the value and the rule."""
    with pytest.raises(ValueError, match=var) as info:
        Settings.from_env({"ROOTFS_HOST": "hv-1", var: raw})
    assert repr(raw) in str(info.value) and says in str(info.value)


@pytest.mark.parametrize(("raw", "expected"), [("0", False), ("off", False), ("YES", True), ("1", True)])
def test_flags_accept_the_usual_spellings(raw: str, expected: bool) -> None:
    """1/0, true/false, yes/no, on/off in any case."""
    assert Settings.from_env({"ROOTFS_HOST": "hv-1", "ROOTFS_WARM_ON_START": raw}).warm_on_start is expected


def test_a_visibility_timeout_a_running_job_could_outlive_is_refused() -> None:
    """Redis must never hand a running or retry-waiting job to a second worker: such a timeout is refused."""
    base = {"ROOTFS_HOST": "hv-1", "ROOTFS_TASK_TIME_LIMIT": "100", "ROOTFS_RETRY_CAP": "10"}
    with pytest.raises(ValueError, match="ROOTFS_VISIBILITY_TIMEOUT"):
        Settings.from_env({**base, "ROOTFS_VISIBILITY_TIMEOUT": "110"})
    assert Settings.from_env({**base, "ROOTFS_VISIBILITY_TIMEOUT": "111"}).visibility_timeout == 111

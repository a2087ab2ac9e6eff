"""The CLI's lifecycle helpers that need no worker: reading a keep file, showing a host's inventory."""

from __future__ import annotations

import time

import click
import pytest

from worker.cli import _host_row, _read_keep


def test_keep_file_is_one_id_per_line_or_a_json_list() -> None:
    """Lines (blank ones and surrounding spaces ignored) or a JSON list; anything else is refused."""
    assert _read_keep("vm-1\n\n  vm/2  \nvm:3\n") == ["vm-1", "vm/2", "vm:3"]
    assert _read_keep('["vm-1", "vm 2"]') == ["vm-1", "vm 2"]
    assert _read_keep("") == []
    with pytest.raises(click.BadParameter):
        _read_keep("[not json")


def test_hosts_row_shows_placement_facts_and_question_marks_for_old_workers() -> None:
    """FREE, REFLINK, CLONES and warm/total STACKS come from the heartbeat; an older worker's show '?'."""
    now = time.time()
    row = _host_row(
        {
            "host": "hv-1",
            "free_bytes": 3 << 30,
            "total_bytes": 10 << 30,
            "reflink": True,
            "clones": 12,
            "stacks": {"a": "f" * 64, "b": None},
            "seen": now,
        }
    )
    assert row[:5] == ["hv-1", "3.0 GiB of 10.0 GiB", "yes", "12", "1/2 warm"]
    assert _host_row({"host": "old", "seen": now})[:5] == ["old", "?", "?", "?", "?"]

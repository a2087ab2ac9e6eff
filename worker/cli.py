"""`rootfs-worker`: the operator's shell into the queue (hosts, stacks, warm, clone, release, clones, reconcile).

Tables for people, `--json` for scripts; a failure exits non-zero with the error's type and message.
click is Celery's own CLI framework, already installed with it: argument parsing, help, exit codes and a
progress bar without code of our own.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from worker.errors import RootfsError

if TYPE_CHECKING:  # the client pulls in Celery: imported where a command needs it, so `health` stays cheap
    from worker.client import JobHandle, RootfsClient

EXIT_FAILED = 1
EXIT_TIMEOUT = 3


def _client() -> RootfsClient:
    from worker.celery import app
    from worker.client import RootfsClient

    return RootfsClient(app)


def _default_host() -> str:
    from worker.service.settings import Settings

    try:
        return Settings.from_env().host
    except ValueError:
        return socket.gethostname()


host_option = click.option("--host", default=None, help="Host whose worker runs the job [default: this host].")
timeout_option = click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the result.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Prepare microVM root filesystems through the rootfs-worker queue."""


@main.command()
@json_option
def hosts(as_json: bool) -> None:
    """List hosts whose workers are live."""
    found = _guard(as_json, lambda: _client().hosts())
    if as_json:
        _print_json(found)
        return
    _table(["HOST", "FREE", "REFLINK", "CLONES", "STACKS", "LAST SEEN"], [_host_row(h) for h in found])


def _host_row(h: dict[str, Any]) -> list[str]:
    """One host's placement facts; a worker too old to send them shows '?'."""
    free, total = h.get("free_bytes"), h.get("total_bytes")
    reflink = h.get("reflink")
    stacks = h.get("stacks")
    return [
        str(h["host"]),
        f"{_size(int(free))} of {_size(int(total))}" if isinstance(free, int) and isinstance(total, int) else "?",
        "?" if reflink is None else ("yes" if reflink else "no"),
        str(h.get("clones", "?")),
        f"{sum(1 for v in stacks.values() if v)}/{len(stacks)} warm" if isinstance(stacks, dict) else "?",
        f"{time.time() - float(h.get('seen', 0)):.0f}s ago",
    ]


@main.command()
@host_option
@timeout_option
@json_option
def stacks(host: str | None, timeout: float, as_json: bool) -> None:
    """List a host's template stacks with sizes and hashes."""
    job = _guard(as_json, lambda: _client().stacks(host=host or _default_host()))
    found = _wait(job, timeout=timeout, as_json=as_json)
    if as_json:
        _print_json(found)
        return
    _table(["STACK", "SIZE", "SHA256"], [[s["name"], _size(s["size_bytes"]), s["sha256"]] for s in found])


@main.command()
@host_option
@timeout_option
@json_option
def warm(host: str | None, timeout: float, as_json: bool) -> None:
    """Hash a host's templates now, so that no clone waits for a hash."""
    job = _guard(as_json, lambda: _client().warm(host=host or _default_host()))
    report = _wait(job, timeout=timeout, as_json=as_json)
    if as_json:
        _print_json(report)
        return
    if report.get("busy"):
        click.echo(f"{job.host}: a warm-up is already running there")
        return
    click.echo(
        f"{job.host}: hashed {len(report['hashed'])} ({_size(report['bytes_hashed'])} in {report['seconds']:.2f}s),"
        f" already warm {len(report['already_warm'])}"
    )
    for name, error in report.get("failed", {}).items():
        click.echo(f"  {name}: {error}", err=True)


@main.command()
@click.argument("vm_id")
@click.argument("stack")
@host_option
@timeout_option
@json_option
def clone(vm_id: str, stack: str, host: str | None, timeout: float, as_json: bool) -> None:
    """Give VM_ID its own copy of STACK (idempotent)."""
    job = _guard(as_json, lambda: _client().clone(host=host or _default_host(), vm_id=vm_id, stack=stack))
    result = _wait(job, timeout=timeout, as_json=as_json)
    if as_json:
        _print_json(result)
        return
    click.echo(
        f"{result['vm_id']}: {result['path']} ({result['stack']} {result['source_sha256'][:12]}) on {result['host']}"
    )


@main.command()
@click.argument("vm_id")
@host_option
@timeout_option
@json_option
@click.option("--force", is_flag=True, help="Delete the disk even while a process (a running VM) holds it open.")
def release(vm_id: str, host: str | None, timeout: float, as_json: bool, force: bool) -> None:
    """Delete VM_ID's clone (idempotent); refused while the disk is in use, unless --force."""
    job = _guard(as_json, lambda: _client().release(host=host or _default_host(), vm_id=vm_id, force=force))
    result = _wait(job, timeout=timeout, as_json=as_json)
    if as_json:
        _print_json(result)
        return
    click.echo(f"{result['vm_id']}: {'released' if result['released'] else 'had no clone'} on {result['host']}")


@main.command()
@host_option
@timeout_option
@json_option
def clones(host: str | None, timeout: float, as_json: bool) -> None:
    """List a host's clones: stack, state, sizes, age, whether a process holds the disk."""
    job = _guard(as_json, lambda: _client().clones(host=host or _default_host()))
    found = _wait(job, timeout=timeout, as_json=as_json)
    if as_json:
        _print_json(found)
        return
    now = time.time()
    _table(
        ["VM", "STACK", "STATE", "SIZE", "ALLOCATED", "AGE", "IN USE", "STALE"],
        [
            [
                c["vm_id"],
                c.get("stack") or "?",
                c["state"],
                _size(c["size_bytes"]),
                _size(c["allocated_bytes"]),
                _age(now, c.get("created")),
                ("yes " + ",".join(map(str, c.get("pids") or []))).strip() if c["in_use"] else "no",
                {True: "yes", False: "no", None: "?"}[c.get("stale")],
            ]
            for c in found
        ],
    )


@main.command()
@click.option(
    "--keep-file",
    required=True,
    type=click.File("r"),
    help="The vm ids to keep, one per line (or a JSON list); '-' reads standard input.",
)
@click.option("--older-than", default=600.0, show_default=True, help="Never release a clone younger than this (s).")
@click.option("--yes", "apply", is_flag=True, help="Release for real; without it this is a dry run.")
@host_option
@timeout_option
@json_option
def reconcile(keep_file: Any, older_than: float, apply: bool, host: str | None, timeout: float, as_json: bool) -> None:
    """Release every clone whose vm id is not in the keep file (a dry run unless --yes)."""
    keep = _read_keep(keep_file.read())
    target = host or _default_host()
    job = _guard(as_json, lambda: _client().reconcile(host=target, keep=keep, older_than=older_than, dry_run=not apply))
    report = _wait(job, timeout=timeout, as_json=as_json)
    if as_json:
        _print_json(report)
        return
    verb = "released" if apply else "would release"
    for vm_id in report["released"]:
        click.echo(f"{verb} {vm_id}")
    for vm_id, error in report["failed"].items():
        click.echo(f"failed {vm_id}: {error}", err=True)
    click.echo(
        f"{target}: {verb} {len(report['released'])}, kept {len(report['kept'])}, in use {len(report['in_use'])},"
        f" too young {len(report['too_young'])}, failed {len(report['failed'])}"
        + ("" if apply else " (dry run: add --yes to release)")
    )
    if report["failed"]:
        raise SystemExit(EXIT_FAILED)


def _read_keep(text: str) -> list[str]:
    """A JSON list of vm ids, or one vm id per line (blank lines and surrounding spaces ignored)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except ValueError as exc:
            raise click.BadParameter(f"not a JSON list: {exc}", param_hint="--keep-file") from None
        if not isinstance(value, list):
            raise click.BadParameter("not a JSON list", param_hint="--keep-file")
        return value
    return [line.strip() for line in text.splitlines() if line.strip()]


def _age(now: float, created: Any) -> str:
    if not isinstance(created, int | float):
        return "?"
    seconds = max(0.0, now - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@main.command()
@click.option("--live", "probe", flag_value="live", default=True, help="Is the process alive? [default]")
@click.option("--ready", "probe", flag_value="ready", help="Is it connected and consuming its host's queues?")
@click.option("--role", type=click.Choice(["worker", "beat"]), default="worker", show_default=True)
@click.option("--max-age", type=float, default=None, help="Seconds a heartbeat stays fresh [ROOTFS_LIVENESS_MAX_AGE].")
@json_option
def health(probe: str, role: str, max_age: float | None, as_json: bool) -> None:
    """Probe this host's worker (or beat) from its heartbeat file: exit 0 if live/ready, else 1.

    Reads one small file: no Celery import, no broker round trip, so a supervisor can run it every few
    seconds. Liveness survives a Redis outage (a restart would not bring Redis back); readiness does not.
    """
    from worker.service import health as probes
    from worker.service.settings import Settings

    try:
        s = Settings.from_env()
    except ValueError as exc:
        verdict = probes.Verdict(False, f"bad settings: {exc}")
    else:
        path = probes.health_file(s.run_dir, "beat" if role == "beat" else "worker")
        check = probes.check_ready if probe == "ready" else probes.check_live
        verdict = check(path, max_age=s.liveness_max_age if max_age is None else max_age)
    if as_json:
        click.echo(json.dumps(verdict.to_dict(probe), sort_keys=True))
    else:
        click.echo(verdict.reason)
    raise SystemExit(0 if verdict.ok else EXIT_FAILED)


def _wait(job: JobHandle, *, timeout: float, as_json: bool) -> Any:
    """The job's result, with a progress bar on a terminal while a template is being hashed."""
    bar: Any = None
    seen = 0

    def on_progress(meta: dict[str, Any]) -> None:
        nonlocal bar, seen
        if as_json or not sys.stderr.isatty():
            return
        total, done = int(meta.get("total", 0)), int(meta.get("done", 0))
        if bar is None:
            bar = click.progressbar(length=max(total, 1), label=f"hashing {meta.get('stack', '')}", file=sys.stderr)
            bar.__enter__()
        bar.update(max(0, done - seen))
        seen = done

    try:
        return _guard(as_json, lambda: job.result(timeout=timeout, on_progress=on_progress))
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _guard(as_json: bool, call: Callable[[], Any]) -> Any:
    """Run `call`; on our error, report it (JSON on stdout with --json) and exit non-zero."""
    import redis
    from kombu.exceptions import OperationalError

    try:
        return call()
    except RootfsError as exc:
        if as_json:
            _print_json({"error": exc.to_dict()})
        else:
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(EXIT_TIMEOUT if type(exc).__name__ == "TaskTimeout" else EXIT_FAILED) from None
    except (OSError, redis.RedisError, OperationalError) as exc:  # the broker is unreachable, for instance
        if as_json:
            _print_json({"error": {"type": type(exc).__name__, "message": str(exc), "transient": True}})
        else:
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"

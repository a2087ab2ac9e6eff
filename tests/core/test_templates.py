"""Which template files count as stacks, and how one is held while it is hashed and copied."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.helpers import wait_until, write_template
from worker.core import templates
from worker.core.templates import open_template, stack_names
from worker.errors import FilesystemError, TemplateBusy, TemplateChanged


@pytest.fixture(params=["proc", "realpath"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each escape test twice: the kernel resolving (an O_PATH fd named by /proc), and without /proc."""
    if request.param == "realpath":
        monkeypatch.setattr(templates, "_real_path", lambda fd: None)
    return str(request.param)


def test_only_directories_with_sendable_names_are_stacks(env: Env) -> None:
    """Directories are stacks; a loose file, or a directory named in non-UTF-8 (no caller could send it), is not."""
    env.template("base", b"x")
    (env.template_dir / "README").write_text("not a stack")
    bad = os.fsencode(env.template_dir) + b"/caf\xe9"
    os.mkdir(bad)
    with open(bad + b"/rootfs.ext4", "wb") as f:
        f.write(b"x")
    assert stack_names(env.template_dir) == ["base"]
    assert [s.name for s in env.registry.stacks()] == ["base"]


def test_unreadable_template_dir_is_a_filesystem_error(tmp_path: Path) -> None:
    """A template dir that is not a directory is FilesystemError("read template dir") naming it; missing is empty."""
    (tmp_path / "templates").write_text("a file")
    with pytest.raises(FilesystemError) as info:
        stack_names(tmp_path / "templates")
    assert (info.value.op, info.value.path, info.value.errno) == (
        "read template dir",
        str(tmp_path / "templates"),
        errno.ENOTDIR,
    )
    assert stack_names(tmp_path / "missing") == []


def test_symlink_loop_as_template_is_no_stack(env: Env, resolution: str) -> None:
    """A template that is a symlink loop is simply not a stack (not an error), beside a good one."""
    env.template("good", b"x")
    (env.template_dir / "loop").mkdir()
    (env.template_dir / "loop" / "rootfs.ext4").symlink_to(env.template_dir / "loop" / "rootfs.ext4")
    with open_template(env.template_dir, "loop") as template:
        assert template is None
    with open_template(env.template_dir, "good") as template:
        assert template is not None and template.name == "good"
        assert template.path == env.template_dir / "good" / "rootfs.ext4"


def test_template_leading_to_the_template_dir_itself_is_not_followed(env: Env, resolution: str) -> None:
    """A template path resolving to the template dir's own name (or a sibling sharing its prefix) is refused."""
    sibling = env.root / "templates-other"
    sibling.mkdir()
    (sibling / "rootfs.ext4").write_bytes(b"outside")
    (env.template_dir / "sneaky").mkdir()
    (env.template_dir / "sneaky" / "rootfs.ext4").symlink_to(sibling / "rootfs.ext4")
    with open_template(env.template_dir, "sneaky") as template:
        assert template is None
    (sibling / "rootfs.ext4").unlink()
    sibling.rmdir()


def test_a_held_template_notices_changes(env: Env) -> None:
    """check_unchanged passes while the template is as opened and raises TemplateChanged once its stat moved
    (a chmod moves its ctime; a writer would also meet the read lease)."""
    path = env.template("base", b"12345")
    with open_template(env.template_dir, "base") as template:
        assert template is not None
        template.check_unchanged()
        path.chmod(0o600)
        with pytest.raises(TemplateChanged) as info:
            template.check_unchanged()
    assert info.value.path == str(path)
    assert info.value.detail == "size 5 -> 5, stat changed"


def test_a_template_that_cannot_be_opened_is_a_filesystem_error(
    env: Env, monkeypatch: pytest.MonkeyPatch, resolution: str
) -> None:
    """A template that exists but cannot be opened for reading (EIO here) is FilesystemError("open template"),
    not "no stack", whether opened through its O_PATH descriptor or (without /proc) by its resolved path; once
    the fault has passed it is opened."""
    path = env.template("base", b"x")
    real_open = os.open
    failing = {"on": True}
    target = "/proc/self/fd/" if resolution == "proc" else str(path)

    def failing_open(file: object, flags: int, *args: object, **kw: object) -> int:
        if failing["on"] and not flags & os.O_PATH and str(file).startswith(target):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(file, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(FilesystemError) as info, open_template(env.template_dir, "base"):
        pass
    assert (info.value.op, info.value.path, info.value.errno) == ("open template", str(path), errno.EIO)
    assert info.value.transient
    failing["on"] = False
    with open_template(env.template_dir, "base") as template:
        assert template is not None and os.pread(template.fd, 1, 0) == b"x"


@pytest.mark.parametrize("dir_name", ["stacks ", "stacksX", "stacks/"])
def test_any_template_dir_name_finds_its_stacks(tmp_path: Path, dir_name: str, resolution: str) -> None:
    """A template dir whose name ends in a space or any letter (or is given with a trailing slash) finds its stacks."""
    template_dir = tmp_path / dir_name.rstrip("/")
    write_template(template_dir, "base", b"x")
    given = Path(str(tmp_path / dir_name))
    with open_template(given, "base") as template:
        assert template is not None
    assert stack_names(given) == ["base"]


def test_a_template_leading_outside_is_logged(env: Env, resolution: str, caplog: pytest.LogCaptureFixture) -> None:
    """A template symlinked out of the template dir is ignored with a warning naming both ends."""
    outside = env.root / "outside" / "disk.img"
    outside.parent.mkdir()
    outside.write_bytes(b"host")
    (env.template_dir / "evil").mkdir()
    link = env.template_dir / "evil" / "rootfs.ext4"
    link.symlink_to(outside)
    with open_template(env.template_dir, "evil") as template:
        assert template is None
    assert caplog.messages == [f"template {link} resolves outside {env.template_dir} ({outside}); ignored"]


def test_a_template_that_cannot_be_resolved_is_a_filesystem_error(
    env: Env, monkeypatch: pytest.MonkeyPatch, resolution: str
) -> None:
    """Resolving a template failing for a real reason (EIO: the kernel's O_PATH lookup, or realpath without
    /proc) is FilesystemError("stat template") naming it."""
    path = env.template("base", b"x")
    real_open = os.open

    def failing_open(file: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_PATH and str(file) == str(path):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(file, flags, *args, **kw)  # type: ignore[arg-type]

    def broken(*args: object, **kw: object) -> str:
        raise OSError(errno.EIO, "Input/output error")

    if resolution == "proc":
        monkeypatch.setattr(os, "open", failing_open)
    else:
        monkeypatch.setattr(os.path, "realpath", broken)
    with pytest.raises(FilesystemError) as info, open_template(env.template_dir, "base"):
        pass
    assert (info.value.op, info.value.path, info.value.errno) == ("stat template", str(path), errno.EIO)


def test_a_template_reached_through_an_alias_is_opened_and_checked_by_what_the_kernel_resolved(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack alias (a symlink to another stack) opens the real template; no path is resolved twice (realpath
    is not used while /proc answers), so a swap between check and open cannot change what is read."""
    env.template("base", b"real bytes")
    (env.template_dir / "alias").symlink_to(env.template_dir / "base")
    monkeypatch.setattr(os.path, "realpath", lambda *a, **k: pytest.fail("realpath used while /proc answers"))
    with open_template(env.template_dir, "alias") as template:
        assert template is not None and template.name == "alias"
        assert os.pread(template.fd, 64, 0) == b"real bytes"


def test_a_held_template_notices_a_writer_through_its_lease(env: Env) -> None:
    """A template is held under a read lease: guard and check_unchanged pass until a process opens it for
    writing (which moves no stat field), then raise TemplateBusy naming it; the writer gets in once it is closed."""
    path = env.template("base", b"12345")
    opened = threading.Event()

    def write() -> None:
        os.close(os.open(path, os.O_WRONLY))
        opened.set()

    writer = threading.Thread(target=write, daemon=True)
    with open_template(env.template_dir, "base") as template:
        assert template is not None and template.leased
        template.guard()
        template.check_unchanged()
        writer.start()  # blocks in open() until the lease is gone
        wait_until(lambda: fcntl.fcntl(template.fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK, what="the lease to break")
        for check in (template.guard, template.check_unchanged):
            with pytest.raises(TemplateBusy) as info:
                check()
            assert info.value.path == str(path)
            assert info.value.detail == "a process opened it for writing while it was read"
        assert not opened.is_set()
    writer.join(timeout=10)
    assert opened.is_set()


def test_a_held_template_reports_its_stat_and_takes_its_key_anew(env: Env) -> None:
    """stat() is the template's stat now; after a ctime move refresh_key makes the template unchanged again."""
    path = env.template("base", b"12345")
    with open_template(env.template_dir, "base") as template:
        assert template is not None
        assert template.stat().st_ino == path.stat().st_ino
        assert template.stat().st_size == 5
        path.chmod(0o600)
        with pytest.raises(TemplateChanged):
            template.check_unchanged()
        template.refresh_key()
        template.check_unchanged()
        assert template.stat().st_mode == path.stat().st_mode


def test_a_template_whose_stat_fails_is_a_filesystem_error_naming_it(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """When even fstat of the held template fails (EIO), stat, refresh_key and check_unchanged raise
    FilesystemError("stat template") naming the template."""
    path = env.template("base", b"12345")

    def failing_fstat(fd: int) -> os.stat_result:
        raise OSError(errno.EIO, "Input/output error")

    with open_template(env.template_dir, "base") as template:
        assert template is not None
        template.refresh_key()
        template.check_unchanged()
        with monkeypatch.context() as patched:
            patched.setattr(os, "fstat", failing_fstat)
            for call in (template.stat, template.refresh_key, template.check_unchanged):
                with pytest.raises(FilesystemError) as info:
                    call()
                assert (info.value.op, info.value.path, info.value.errno) == ("stat template", str(path), errno.EIO)


def test_a_template_open_for_writing_cannot_be_opened(env: Env) -> None:
    """While some process holds the template open for writing, opening it is a transient TemplateBusy naming it;
    once the writer closed it, it opens (leased)."""
    path = env.template("base", b"12345")
    writer = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(TemplateBusy) as info, open_template(env.template_dir, "base"):
            pass
    finally:
        os.close(writer)
    assert (info.value.path, info.value.detail) == (str(path), "a process has it open for writing")
    assert info.value.transient
    with open_template(env.template_dir, "base") as template:
        assert template is not None and template.leased


def test_a_stat_failing_while_the_template_is_opened_names_it(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fstat that fails (EIO) while the template is being opened is FilesystemError("stat template") naming it,
    whichever of its stat calls meets the error."""
    path = env.template("base", b"12345")
    real_fstat = os.fstat
    for succeeding in (0, 1):
        calls: list[int] = []

        def failing_fstat(fd: int, succeeding: int = succeeding, calls: list[int] = calls) -> os.stat_result:
            calls.append(fd)
            if len(calls) > succeeding:
                raise OSError(errno.EIO, "Input/output error")
            return real_fstat(fd)

        with monkeypatch.context() as patched:
            patched.setattr(os, "fstat", failing_fstat)
            with pytest.raises(FilesystemError) as info, open_template(env.template_dir, "base"):
                pass
        assert (info.value.op, info.value.path, info.value.errno) == ("stat template", str(path), errno.EIO)
        assert len(calls) == succeeding + 1


def test_a_fifo_as_template_never_hangs_either_way(env: Env, resolution: str) -> None:
    """A FIFO where a template belongs is no stack, opened without blocking whether the kernel or realpath
    resolved it (a blocking open of a FIFO waits forever for a writer)."""
    (env.template_dir / "pipe").mkdir(parents=True)
    os.mkfifo(env.template_dir / "pipe" / "rootfs.ext4")
    with open_template(env.template_dir, "pipe") as template:
        assert template is None


def test_a_template_dir_without_a_real_path_falls_back_to_realpath(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """When /proc names the template but not the template dir, the template is still found, by realpath."""
    env.template("base", b"bytes")
    monkeypatch.setattr(templates, "_real_dir", lambda directory: None)
    with open_template(env.template_dir, "base") as template:
        assert template is not None and os.pread(template.fd, 5, 0) == b"bytes"


def test_only_a_live_absolute_path_is_a_real_path(tmp_path: Path) -> None:
    """/proc's name for a descriptor counts only when it is a path to a file that still has one: not a pipe's
    name, not a file deleted since it was opened."""
    path = tmp_path / "file"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    read_end, write_end = os.pipe()
    try:
        assert templates._real_path(fd) == str(path)
        assert templates._real_path(read_end) is None
        path.unlink()
        assert templates._real_path(fd) is None
        assert templates._real_dir(tmp_path) == str(tmp_path)
        assert templates._real_dir(tmp_path / "missing") is None
    finally:
        for n in (fd, read_end, write_end):
            os.close(n)

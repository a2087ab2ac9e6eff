"""Property tests over hostile stack names and vm ids: clear errors, nothing outside the clones dir."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import sha256_of, tree, write_template
from worker import InvalidStackName, InvalidVmId, RootfsConfig, RootfsError, RootfsRegistry, safe_vm_id
from worker.core.names import MAX_VM_ID_CHARS, check_stack_name, check_vm_id

#: Text biased toward what breaks paths: separators, dots, NUL, non-ASCII, lone surrogates.
hostile_text = st.one_of(
    st.sampled_from([".", "..", "../x", "./", "a/..", "/", "\0"]),
    st.text(
        alphabet=st.sampled_from([*"/.\0\\-_aZ9 \né~*", "\udc80"]) | st.characters(),
        max_size=300,
    ),
)


@given(hostile_text)
@example("..")
@example("../../etc/passwd")
@example("a" * 256)
def test_stack_name_is_one_plain_component_or_refused(name: str) -> None:
    """A stack name is accepted only when it is one path component that joins to a child of the dir."""
    try:
        checked = check_stack_name(name)
    except InvalidStackName as exc:
        assert not exc.transient and str(exc).startswith("invalid stack")
        return
    assert checked == name
    root = Path("/templates")
    joined = root / name
    assert joined.parent == root and joined.name == name
    assert len(name.encode()) <= 255


@given(hostile_text)
@example("vm/1")
@example("...")
def test_safe_vm_id_is_a_safe_single_component(vm_id: str) -> None:
    """The safe id keeps the length in characters and uses only [A-Za-z0-9_-]: never a separator or dot."""
    safe = safe_vm_id(vm_id)
    assert len(safe) == len(vm_id)
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in safe)
    try:
        assert check_vm_id(vm_id) == safe
    except InvalidVmId:
        assert safe == "" or len(safe) > MAX_VM_ID_CHARS


@given(st.one_of(st.integers(), st.none(), st.lists(st.text()), st.binary(), st.dictionaries(st.text(), st.text())))
def test_non_string_names_are_refused_clearly(value: object) -> None:
    """Wrong types (a malformed message) give a permanent invalid-argument error, not a crash."""
    for check in (check_stack_name, check_vm_id):
        try:
            check(value)
        except (InvalidStackName, InvalidVmId) as exc:
            assert "must be a string" in str(exc)
        else:
            raise AssertionError("accepted a non-string")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vm_id=hostile_text, stack=hostile_text)
@example(vm_id="../../x", stack="../templates/base")
@example(vm_id="vm-1", stack="base")
def test_hostile_requests_never_write_outside_clones_nor_touch_templates(
    tmp_path: Path, vm_id: str, stack: str
) -> None:
    """Whatever the names, a clone lands inside the clones dir or fails with our error; templates stay."""
    root = tmp_path / f"case-{os.urandom(6).hex()}"
    template_dir, clones_dir = root / "templates", root / "clones"
    template = write_template(template_dir, "base", b"template-bytes")
    write_template(root, "outside", b"not-a-template")
    before_sha, before_tree = sha256_of(template), tree(root)
    reg = RootfsRegistry(RootfsConfig(template_dir, clones_dir))
    try:
        result = reg.clone_for_vm(vm_id, stack)
    except RootfsError as exc:
        assert not exc.transient
    else:
        assert result.path.parent.parent == clones_dir
        assert result.path.read_bytes() == b"template-bytes"
        reg.release(vm_id)
    after = {p for p in tree(root) if not p.startswith("clones")}
    assert after == before_tree
    assert sha256_of(template) == before_sha

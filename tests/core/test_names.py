"""Property tests over hostile stack names and vm ids: clear errors, nothing outside the clones dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import sha256_of, tree, write_template
from worker import (
    InvalidStackName,
    InvalidVmId,
    RootfsConfig,
    RootfsError,
    RootfsRegistry,
    StackNotFound,
    safe_vm_id,
)
from worker.core.names import MAX_VM_ID_CHARS, check_stack_name, check_vm_id, is_valid_stack_name

#: Text biased toward what breaks paths: separators, dots, NUL, non-ASCII, lone surrogates.
hostile_text = st.one_of(
    st.sampled_from([".", "..", "../x", "./", "a/..", "/", "\0"]),
    st.text(
        alphabet=st.sampled_from([*"/.\0\\-_aZ9 \né~*", "\udc80"]) | st.characters(),
        max_size=300,
    ),
)


def plain_component(name: str) -> bool:
    """The specification, written independently of the code: one path component a filesystem can store."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    try:
        return len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:
        return False


@given(hostile_text)
@example("..")
@example("../../etc/passwd")
@example("a" * 256)
@example("a" * 255)
@example("node-20")
def test_stack_name_is_one_plain_component_or_refused(name: str) -> None:
    """A stack name is accepted exactly when it is one path component that joins to a child of the dir."""
    try:
        checked = check_stack_name(name)
    except InvalidStackName as exc:
        assert not plain_component(name), f"refused a plain component: {exc}"
        assert not exc.transient and str(exc).startswith("invalid stack")
        assert not is_valid_stack_name(name)
        return
    assert plain_component(name), "accepted a name that is not one plain component"
    assert is_valid_stack_name(name)
    assert checked == name
    root = Path("/templates")
    joined = root / name
    assert joined.parent == root and joined.name == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "is empty"),
        (".", "is a relative directory reference"),
        ("..", "is a relative directory reference"),
        ("a/b", "contains '/'"),
        ("a\0b", "contains a NUL byte"),
        ("a\udc80", "is not valid UTF-8"),
        ("a" * 256, "is longer than 255 bytes"),
        ("é" * 128, "is longer than 255 bytes"),
    ],
)
def test_invalid_stack_name_says_why(name: str, reason: str) -> None:
    """Each refusal names the field, the value and the reason, as a permanent error a client can read."""
    with pytest.raises(InvalidStackName) as info:
        check_stack_name(name)
    shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
    assert (info.value.field, info.value.value, info.value.reason) == ("stack", shown, reason)
    assert str(info.value) == f"invalid stack {info.value.value}: {reason}"


@pytest.mark.parametrize("name", ["a" * 255, "é" * 127 + "a", "...", "a.b", " ", "-"])
def test_stack_names_up_to_the_limit_are_accepted(name: str) -> None:
    """255 bytes (counted in UTF-8, not characters) is still a valid name, and so are dotted names."""
    assert check_stack_name(name) == name
    assert is_valid_stack_name(name)


def test_vm_id_length_limit_is_200_safe_characters() -> None:
    """A vm id of 200 characters is accepted, 201 refused with the limit in the reason; non-ASCII counts once."""
    assert check_vm_id("v" * 200) == "v" * 200
    assert check_vm_id("é" * 200) == "_" * 200
    for too_long in ("v" * 201, "é" * 201):
        with pytest.raises(InvalidVmId) as info:
            check_vm_id(too_long)
        assert info.value.reason == "longer than 200 characters"
        assert info.value.field == "vm_id"
    assert MAX_VM_ID_CHARS == 200


@pytest.mark.parametrize(("vm_id", "reason"), [("", "sanitises to an empty string"), (7, "must be a string, not int")])
def test_invalid_vm_id_says_why(vm_id: object, reason: str) -> None:
    """An unusable vm id is refused naming the field, a bounded rendering of the value, and the reason."""
    with pytest.raises(InvalidVmId) as info:
        check_vm_id(vm_id)
    assert (info.value.field, info.value.value, info.value.reason) == ("vm_id", repr(vm_id), reason)
    assert str(info.value) == f"invalid vm_id {vm_id!r}: {reason}"


def test_hostile_values_are_rendered_bounded_in_errors() -> None:
    """A huge or multi-line value appears in the error as its repr cut to 80 characters ending in '...'."""
    with pytest.raises(InvalidVmId) as info:
        check_vm_id("x" * 5000)
    assert info.value.value == repr("x" * 5000)[:77] + "..."
    assert len(info.value.value) == 80
    with pytest.raises(InvalidStackName) as stack_info:
        check_stack_name("a\nb/c")
    assert stack_info.value.value == repr("a\nb/c")
    with pytest.raises(InvalidStackName) as exact:
        check_stack_name("/" + "x" * 77)  # repr is exactly 80 characters: shown whole
    assert exact.value.value == repr("/" + "x" * 77)


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
            assert exc.reason == f"must be a string, not {type(value).__name__}"
        else:
            raise AssertionError("accepted a non-string")


def expected_outcome(vm_id: str, stack: str) -> type[RootfsError] | None:
    """What a clone request must give, from the specification: the error type, or None for a clone."""
    safe = safe_vm_id(vm_id)
    if not safe or len(safe) > MAX_VM_ID_CHARS:
        return InvalidVmId
    if not plain_component(stack):
        return InvalidStackName
    if stack != "base":
        return StackNotFound
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vm_id=hostile_text, stack=st.one_of(st.just("base"), hostile_text))
@example(vm_id="../../x", stack="../templates/base")
@example(vm_id="vm-1", stack="base")
@example(vm_id="../..", stack="base")
def test_hostile_requests_never_write_outside_clones_nor_touch_templates(
    tmp_path: Path, vm_id: str, stack: str
) -> None:
    """A valid request gets its clone inside the clones dir, any other our permanent error; templates stay."""
    root = tmp_path / f"case-{os.urandom(6).hex()}"
    template_dir, clones_dir = root / "templates", root / "clones"
    template = write_template(template_dir, "base", b"template-bytes")
    write_template(root, "outside", b"not-a-template")
    before_sha, before_tree = sha256_of(template), tree(root)
    reg = RootfsRegistry(RootfsConfig(template_dir, clones_dir))
    expected = expected_outcome(vm_id, stack)
    try:
        result = reg.clone_for_vm(vm_id, stack)
    except RootfsError as exc:
        assert type(exc) is expected, f"{vm_id!r}/{stack!r}: expected {expected}, got {exc!r}"
        assert not exc.transient
    else:
        assert expected is None, f"{vm_id!r}/{stack!r}: cloned, expected {expected}"
        assert result.path.parent.parent == clones_dir
        assert result.path.read_bytes() == b"template-bytes"
        assert reg.release(vm_id) is True
    after = {p for p in tree(root) if not p.startswith("clones")}
    assert after == before_tree
    assert sha256_of(template) == before_sha


@pytest.mark.parametrize("value", [7, None, b"base", ["base"]])
def test_a_stack_name_that_is_not_a_string_says_so(value: object) -> None:
    """A stack name of the wrong type is refused naming the field, a bounded rendering of the value, and its type."""
    with pytest.raises(InvalidStackName) as info:
        check_stack_name(value)
    reason = f"must be a string, not {type(value).__name__}"
    assert (info.value.field, info.value.value, info.value.reason) == ("stack", repr(value), reason)

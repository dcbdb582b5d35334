"""References are normalised as containerd normalises them, and hostile forms are refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_seccomp.reference import Reference, ReferenceError, parse

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("alpine", Reference("docker.io", "library/alpine", "latest")),
        ("alpine:3", Reference("docker.io", "library/alpine", "3")),
        ("crio/seccomp:v2", Reference("docker.io", "crio/seccomp", "v2")),
        ("index.docker.io/x/y", Reference("docker.io", "x/y", "latest")),
        ("docker.io/alpine", Reference("docker.io", "library/alpine", "latest")),
        ("quay.io/crio/seccomp:v2", Reference("quay.io", "crio/seccomp", "v2")),
        ("localhost/p", Reference("localhost", "p", "latest")),
        ("127.0.0.1:5000/a/b:t", Reference("127.0.0.1:5000", "a/b", "t")),
        (f"ghcr.io/a/b@{D}", Reference("ghcr.io", "a/b", None, D)),
        (f"ghcr.io/a/b:v1@{D}", Reference("ghcr.io", "a/b", "v1", D)),
        ("reg.example:443/a__b/c-d.e:T_1.0-x", Reference("reg.example:443", "a__b/c-d.e",
                                                         "T_1.0-x")),
    ],
)
def test_normalisation(value: str, want: Reference) -> None:
    ref = parse(value)
    assert ref == want
    assert parse(str(ref)) == ref


def test_digest_wins_for_fetching() -> None:
    assert parse(f"ghcr.io/a/b:v1@{D}").selector == D
    assert parse("ghcr.io/a/b:v1").selector == "v1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty reference"),
        ("a" * 5000, "5000 characters long"),
        ("file:///etc/passwd", "is a URL"),
        ("https://ghcr.io/a/b:v1", "is a URL"),
        ("http:/ghcr.io/a", "is a URL"),
        ("ghcr.io/a/../b", "has a '..' path component"),
        ("ghcr.io/../../etc", "has a '..' path component"),
        ("ghcr.io//a", "empty path component"),
        ("ghcr.io/a/", "empty path component"),
        ("ghcr.io/Acme/x", "component 'Acme' (repositories are lower case)"),
        ("ghcr.io/a/Upper", "(repositories are lower case)"),
        ("ghcr.io/a/b:", "invalid tag ''"),
        ("ghcr.io/a/b:-x", "invalid tag '-x'"),
        ("ghcr.io/a/b:" + "t" * 129, "invalid tag"),
        ("ghcr.io/a/b@sha256:abc", "invalid digest 'sha256:abc'"),
        ("ghcr.io/a/b@md5:" + "a" * 32, "invalid digest"),
        ("ghcr.io/a/b@sha256:" + "A" * 64, "invalid digest"),
        ("ghcr.io:99999/a", "invalid registry port '99999'"),
        ("ghcr.io:x/a", "invalid registry port 'x'"),
        ("ghcr.io/a b", "has character ' ' at position 9"),
        ("ghcr.io/a\x00b", "has character '\\x00'"),
        ("ghcr.io/caf\u00e9", "has character"),
        ("-bad.host/a", "invalid registry '-bad.host'"),
    ],
)
def test_refused(value: str, message: str) -> None:
    with pytest.raises(ReferenceError) as info:
        parse(value)
    assert message in str(info.value)


@given(st.text(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_fuzz_never_crashes_and_round_trips(value: str) -> None:
    try:
        ref = parse(value)
    except ReferenceError:
        return
    assert parse(str(ref)) == ref
    assert ".." not in ref.repository.split("/")


_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8})?", fullmatch=True)


_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(st.lists(_component, min_size=1, max_size=4), _tag)
@settings(max_examples=500, deadline=None)
def test_fuzz_valid_names_parse(components: list[str], tag: str) -> None:
    value = "reg.example/" + "/".join(components) + ":" + tag
    assert parse(value) == Reference("reg.example", "/".join(components), tag)

"""References are normalised as containerd normalises them, and hostile forms are refused."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nri_seccomp.decide.reference import MAX_LENGTH, Reference, ReferenceError, parse

from .examples import examples

D = "sha256:" + "a" * 64
D512 = "sha512:" + "b" * 128


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("alpine", Reference("docker.io", "library/alpine", "latest")),
        ("alpine:3", Reference("docker.io", "library/alpine", "3")),
        ("crio/seccomp:v2", Reference("docker.io", "crio/seccomp", "v2")),
        ("index.docker.io/x/y", Reference("docker.io", "x/y", "latest")),
        ("index.docker.io/alpine", Reference("docker.io", "library/alpine", "latest")),
        ("docker.io/alpine", Reference("docker.io", "library/alpine", "latest")),
        ("docker.io/library/alpine", Reference("docker.io", "library/alpine", "latest")),
        ("quay.io/crio/seccomp:v2", Reference("quay.io", "crio/seccomp", "v2")),
        ("localhost/p", Reference("localhost", "p", "latest")),
        ("localhost:5000/p", Reference("localhost:5000", "p", "latest")),
        ("127.0.0.1:5000/a/b:t", Reference("127.0.0.1:5000", "a/b", "t")),
        ("[::1]:5000/a:t", Reference("[::1]:5000", "a", "t")),
        ("[fe80::1]/a", Reference("[fe80::1]", "a", "latest")),
        # upper case makes the first component a host, as in docker
        ("Registry.Example/a", Reference("Registry.Example", "a", "latest")),
        # a single component with a dot is a repository on docker.io, as in docker
        ("example.com", Reference("docker.io", "library/example.com", "latest")),
        (f"ghcr.io/a/b@{D}", Reference("ghcr.io", "a/b", None, D)),
        (f"ghcr.io/a/b:v1@{D}", Reference("ghcr.io", "a/b", "v1", D)),
        (f"ghcr.io/a/b@{D512}", Reference("ghcr.io", "a/b", None, D512)),
        (f"alpine@{D}", Reference("docker.io", "library/alpine", None, D)),
        ("reg.example:443/a__b/c-d.e:T_1.0-x",
         Reference("reg.example:443", "a__b/c-d.e", "T_1.0-x")),
        ("r.io/a--b/c:" + "t" * 128, Reference("r.io", "a--b/c", "t" * 128)),
    ],
)
def test_normalisation(value: str, want: Reference) -> None:
    ref = parse(value)
    assert ref == want
    assert parse(str(ref)) == ref


def test_str_is_the_normalised_form() -> None:
    assert str(parse("alpine")) == "docker.io/library/alpine:latest"
    assert str(parse(f"ghcr.io/a/b:v1@{D}")) == f"ghcr.io/a/b:v1@{D}"
    assert str(parse(f"ghcr.io/a/b@{D}")) == f"ghcr.io/a/b@{D}"
    assert parse("index.docker.io/x/y:1").name == "docker.io/x/y"


def test_digest_wins_for_fetching() -> None:
    assert parse(f"ghcr.io/a/b:v1@{D}").selector == D
    assert parse("ghcr.io/a/b:v1").selector == "v1"
    assert parse("ghcr.io/a/b").selector == "latest"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "reference '' is empty"),
        ("a" * 5000, "is 5000 characters long (at most 4096)"),
        ("a" * (MAX_LENGTH + 1), "is 4097 characters long"),
        ("file:///etc/passwd", "is a URL"),
        ("https://ghcr.io/a/b:v1", "is a URL"),
        ("http://127.0.0.1:5000/a", "is a URL"),
        ("docker://ghcr.io/a", "is a URL"),
        ("http:/ghcr.io/a", "is a URL"),
        ("oci-archive:/tmp/x", "is a URL"),
        ("ghcr.io/a/../b", "has a '..' path component"),
        ("ghcr.io/../../etc", "has a '..' path component"),
        ("ghcr.io/./a", "has a '.' path component"),
        ("ghcr.io//a", "empty path component"),
        ("ghcr.io/a/", "empty path component"),
        ("/a", "empty path component"),
        ("ghcr.io/Acme/x", "component 'Acme' (repositories are lower case)"),
        ("ghcr.io/a/Upper", "(repositories are lower case)"),
        ("ghcr.io/a_-b", "invalid repository component 'a_-b'"),
        ("ghcr.io/-a", "invalid repository component '-a'"),
        ("ghcr.io/a/b:", "invalid tag ''"),
        ("ghcr.io/a/b:-x", "invalid tag '-x'"),
        ("ghcr.io/a/b:.x", "invalid tag '.x'"),
        ("ghcr.io/a/b:" + "t" * 129, "invalid tag"),
        ("ghcr.io/a/b@sha256:abc", "invalid digest 'sha256:abc'"),
        ("ghcr.io/a/b@md5:" + "a" * 32, "invalid digest"),
        ("ghcr.io/a/b@sha256:" + "A" * 64, "invalid digest"),
        ("ghcr.io/a/b@sha512:" + "a" * 64, "invalid digest"),
        ("ghcr.io/a/b@", "invalid digest ''"),
        (f"ghcr.io/a/b@{D}@{D}", "invalid digest"),
        ("ghcr.io:99999/a", "invalid registry port '99999'"),
        ("ghcr.io:0/a", "invalid registry port '0'"),
        ("ghcr.io:x/a", "invalid registry port 'x'"),
        ("ghcr.io:/a", "is a URL"),
        ("[::1]x/a", "invalid registry '[::1]x'"),
        ("[zz::1]/a", "invalid registry"),
        ("ghcr.io/a b", "has a control or space character ' ' at position 9"),
        ("ghcr.io/a\x00b", "has a control or space character '\\x00' at position 9"),
        ("ghcr.io/a:b\n", "control or space character '\\n'"),
        ("\x1b[31mred", "control or space character '\\x1b' at position 0"),
        ("ghcr.io/caf\u00e9", "has a non-ASCII character 'é' at position 11"),
        ("-bad.host/a", "invalid registry '-bad.host'"),
        ("r.io/" + "a" * 260, "has a name longer than 255 characters"),
        (":tag", "has no repository"),
    ],
)
def test_refused(value: str, message: str) -> None:
    with pytest.raises(ReferenceError) as info:
        parse(value)
    assert message in str(info.value)
    # a hostile value never turns into a huge message or log line
    assert len(str(info.value)) < 400


# ---- properties ----------------------------------------------------------------

_component = st.from_regex(r"[a-z0-9]{1,8}(?:(?:[._]|__|-+)[a-z0-9]{1,8})?", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_host = st.sampled_from(["reg.example", "localhost", "127.0.0.1:5000", "[::1]:443",
                         "Upper.Case", "index.docker.io", "docker.io", "ghcr.io"])
_digest = st.sampled_from([D, D512, "sha256:" + "0123456789abcdef" * 4])

#: strings made of the characters references use, so most parse or fail deep inside
_near_miss = st.text(alphabet="ab0-_.:/@[]Ashz\x00 %é", max_size=60) | st.builds(
    lambda h, cs, t, d, sep: h + "/" + "/".join(cs) + sep + t + d,
    _host,
    st.lists(_component | st.sampled_from(["..", "", "A", "."]), min_size=1, max_size=4),
    _tag | st.just(""),
    st.just("") | _digest.map(lambda d: "@" + d) | st.just("@sha256:x"),
    st.sampled_from([":", "", "::"]),
)


@given(st.text(max_size=300) | _near_miss)
@settings(max_examples=examples(1000), deadline=None)
@example("a" * 5000)
@example("[")
@example("a:1/b")
def test_fuzz_only_reference_error_and_round_trip(value: str) -> None:
    try:
        ref = parse(value)
    except ReferenceError:
        return
    # anything else raised fails the test: parse raises nothing but ReferenceError
    assert parse(str(ref)) == ref
    assert str(parse(str(ref))) == str(ref)
    assert ".." not in ref.repository.split("/")
    assert ref.repository == ref.repository.lower()
    assert ref.tag is not None or ref.digest is not None
    assert ref.registry != "index.docker.io"
    assert all(c.isascii() and c.isprintable() and not c.isspace() for c in str(ref))


@given(_host, st.lists(_component, min_size=1, max_size=4), _tag, st.none() | _digest)
@settings(max_examples=examples(300), deadline=None)
def test_fuzz_valid_names_parse(host: str, components: list[str], tag: str,
                                digest: str | None) -> None:
    repo = "/".join(components)
    value = f"{host}/{repo}:{tag}" + (f"@{digest}" if digest else "")
    ref = parse(value)
    registry = "docker.io" if host == "index.docker.io" else host
    if registry == "docker.io" and "/" not in repo:
        repo = f"library/{repo}"
    assert ref == Reference(registry, repo, tag, digest)
    assert parse(str(ref)) == ref

"""CRI-O's annotation precedence, opt-outs, log lines and value screening (resolver)."""

from __future__ import annotations

import pytest

from nri_seccomp.decide.resolver import (
    KEY_V1,
    KEY_V2,
    MAX_VALUE,
    AnnotationError,
    Match,
    pod_match,
    resolve,
)

V1, V2 = KEY_V1, KEY_V2
NAME = "app"

# (id, pod annotations, image annotations, expected (reference, key, source) or None)
Row = tuple[str, dict[str, str], dict[str, str], tuple[str, str, str] | None]

EACH_STEP: list[Row] = [
    ("step1 pod-container v1", {f"{V1}/app": "r"}, {}, ("r", f"{V1}/app", "pod-container")),
    ("step1 pod-container v2", {f"{V2}/app": "r"}, {}, ("r", f"{V2}/app", "pod-container")),
    ("step2 pod POD v1", {f"{V1}/POD": "r"}, {}, ("r", f"{V1}/POD", "pod")),
    ("step2 pod POD v2", {f"{V2}/POD": "r"}, {}, ("r", f"{V2}/POD", "pod")),
    ("step3 image bare v1", {}, {V1: "r"}, ("r", V1, "image")),
    ("step3 image bare v2", {}, {V2: "r"}, ("r", V2, "image")),
    ("step4 image container v1", {}, {f"{V1}/app": "r"}, ("r", f"{V1}/app", "image-container")),
    ("step4 image container v2", {}, {f"{V2}/app": "r"}, ("r", f"{V2}/app", "image-container")),
    ("step5 image POD v1", {}, {f"{V1}/POD": "r"}, ("r", f"{V1}/POD", "image-pod")),
    ("step5 image POD v2", {}, {f"{V2}/POD": "r"}, ("r", f"{V2}/POD", "image-pod")),
]

V2_OVER_V1: list[Row] = [
    ("step1 v2 over v1", {f"{V1}/app": "one", f"{V2}/app": "two"}, {},
     ("two", f"{V2}/app", "pod-container")),
    ("step2 v2 over v1", {f"{V1}/POD": "one", f"{V2}/POD": "two"}, {},
     ("two", f"{V2}/POD", "pod")),
    ("step3 v2 over v1", {}, {V1: "one", V2: "two"}, ("two", V2, "image")),
    ("step4 v2 over v1", {}, {f"{V1}/app": "one", f"{V2}/app": "two"},
     ("two", f"{V2}/app", "image-container")),
    ("step5 v2 over v1", {}, {f"{V1}/POD": "one", f"{V2}/POD": "two"},
     ("two", f"{V2}/POD", "image-pod")),
]

# every step beats all later ones; an earlier step's v1 key beats a later step's v2 key
EVERYTHING_POD = {f"{V1}/app": "s1", f"{V1}/POD": "s2"}
EVERYTHING_IMAGE = {V1: "s3", f"{V1}/app": "s4", f"{V1}/POD": "s5"}
ORDER: list[Row] = [
    ("step1 over all", EVERYTHING_POD, EVERYTHING_IMAGE, ("s1", f"{V1}/app", "pod-container")),
    ("step2 over steps 3-5", {f"{V1}/POD": "s2"}, EVERYTHING_IMAGE,
     ("s2", f"{V1}/POD", "pod")),
    ("step3 over steps 4-5", {}, EVERYTHING_IMAGE, ("s3", V1, "image")),
    ("step4 over step 5", {}, {f"{V1}/app": "s4", f"{V1}/POD": "s5"},
     ("s4", f"{V1}/app", "image-container")),
    ("step1 v1 over step2 v2", {f"{V1}/app": "s1", f"{V2}/POD": "s2"}, {},
     ("s1", f"{V1}/app", "pod-container")),
    ("step2 v1 over step3 v2", {f"{V1}/POD": "s2"}, {V2: "s3"}, ("s2", f"{V1}/POD", "pod")),
    ("step3 v1 over step4 v2", {}, {V1: "s3", f"{V2}/app": "s4"}, ("s3", V1, "image")),
    ("step4 v1 over step5 v2", {}, {f"{V1}/app": "s4", f"{V2}/POD": "s5"},
     ("s4", f"{V1}/app", "image-container")),
]

OPT_OUT: list[Row] = [
    ("pod POD with this container exempted", {f"{V1}/POD": "rp", f"{V1}/app": ""}, {},
     ("", f"{V1}/app", "pod-container")),
    ("pod POD v2 with container exempted by v1", {f"{V2}/POD": "rp", f"{V1}/app": ""}, {},
     ("", f"{V1}/app", "pod-container")),
    ("empty v2 beats non-empty v1 at the same step", {f"{V2}/app": "", f"{V1}/app": "r"}, {},
     ("", f"{V2}/app", "pod-container")),
    ("empty pod POD stops before image keys", {f"{V2}/POD": ""}, {V1: "ri"},
     ("", f"{V2}/POD", "pod")),
    ("empty image bare stops before image container", {}, {V1: "", f"{V1}/app": "r"},
     ("", V1, "image")),
    ("empty image container stops before image POD", {}, {f"{V2}/app": "", f"{V1}/POD": "r"},
     ("", f"{V2}/app", "image-container")),
    ("empty image POD", {}, {f"{V1}/POD": ""}, ("", f"{V1}/POD", "image-pod")),
    ("non-empty v2 beats empty v1", {f"{V2}/app": "r", f"{V1}/app": ""}, {},
     ("r", f"{V2}/app", "pod-container")),
]

NO_MATCH: list[Row] = [
    ("no annotations", {}, {}, None),
    ("bogus container name on pod", {f"{V1}/other": "r", f"{V2}/other": "r"}, {}, None),
    ("bogus container name on image", {}, {f"{V1}/other": "r", f"{V2}/other": "r"}, None),
    ("bare v1 key on pod ignored", {V1: "r"}, {}, None),
    ("bare v2 key on pod ignored", {V2: "r"}, {}, None),
    ("empty bare key on pod ignored too", {V1: ""}, {}, None),
    ("container name is case-sensitive", {f"{V1}/App": "r"}, {}, None),
    ("key with a further suffix", {f"{V1}/app/x": "r"}, {}, None),
    ("key with a prefix", {f"x.{V1}/app": "r"}, {}, None),
    ("lower-case pod suffix is a container name", {f"{V1}/pod": "r"}, {}, None),
    ("pod keys in the image's place do not cross over", {}, {"annotation": "r"}, None),
]

IGNORED_BARE_POD_KEY: list[Row] = [
    ("bare pod key does not stop image lookup", {V2: "rp"}, {f"{V1}/POD": "ri"},
     ("ri", f"{V1}/POD", "image-pod")),
    ("bare pod key does not shadow pod POD", {V2: "bare", f"{V1}/POD": "rp"}, {},
     ("rp", f"{V1}/POD", "pod")),
]

ALL = EACH_STEP + V2_OVER_V1 + ORDER + OPT_OUT + NO_MATCH + IGNORED_BARE_POD_KEY


@pytest.mark.parametrize(("pod", "image", "want"), [r[1:] for r in ALL], ids=[r[0] for r in ALL])
def test_precedence(pod: dict[str, str], image: dict[str, str],
                    want: tuple[str, str, str] | None) -> None:
    match = resolve(pod, NAME, image)
    got = None if match is None else (match.reference, match.key, match.source)
    assert got == want
    if match is not None:
        assert match.opt_out == (match.reference == "")


def test_exempted_container_and_its_sibling() -> None:
    pod = {f"{V1}/POD": "reg.example/profiles/strict:1", f"{V1}/debug": ""}
    sibling = resolve(pod, "app", {})
    exempt = resolve(pod, "debug", {})
    assert sibling == Match("reg.example/profiles/strict:1", f"{V1}/POD", "pod",
                            f"Found pod specific seccomp profile annotation: {V1}/POD="
                            "reg.example/profiles/strict:1")
    assert exempt is not None and exempt.opt_out and exempt.key == f"{V1}/debug"


def test_protobuf_maps_are_mappings() -> None:
    from nri_seccomp.nri.pb import nri_pb2

    pod = nri_pb2.PodSandbox(annotations={f"{V2}/app": "reg.example/p:1"})
    match = resolve(pod.annotations, NAME, {})
    assert match is not None and match.reference == "reg.example/p:1"


REF = "reg.example/profiles/p@sha256:" + "a" * 64
LOG_LINES = [
    ("pod-container", {f"{V1}/app": REF}, {},
     f"Found container specific seccomp profile annotation: {V1}/app={REF}"),
    ("pod-container v2", {f"{V2}/app": REF}, {},
     f"Found container specific seccomp profile annotation: {V2}/app={REF}"),
    ("pod", {f"{V1}/POD": REF}, {},
     f"Found pod specific seccomp profile annotation: {V1}/POD={REF}"),
    ("image", {}, {V1: REF}, f"Found image specific seccomp profile annotation: {V1}={REF}"),
    ("image-container", {}, {f"{V1}/app": REF},
     f"Found image specific seccomp profile annotation for container app: {V1}/app={REF}"),
    ("image-pod", {}, {f"{V2}/POD": REF},
     f"Found image specific seccomp profile annotation for pod: {V2}/POD={REF}"),
]


@pytest.mark.parametrize(("pod", "image", "line"), [r[1:] for r in LOG_LINES],
                         ids=[r[0] for r in LOG_LINES])
def test_log_lines_use_crio_wording(pod: dict[str, str], image: dict[str, str],
                                    line: str) -> None:
    match = resolve(pod, NAME, image)
    assert match is not None and match.log_line == line


@pytest.mark.parametrize("key", [f"{V1}/app", f"{V2}/app", f"{V1}/POD", f"{V2}/POD"])
def test_pod_match_is_what_resolve_finds_for_the_container_it_decides(key: str) -> None:
    """What a pod's creation prepares is filed under the very match (and log line) that
    the container's request finds."""
    assert pod_match(key, "r.example/p:1") == resolve({key: "r.example/p:1"}, NAME)


@pytest.mark.parametrize(("key", "value"), [
    (V1, "r.example/p:1"), (V2, "r.example/p:1"), (f"{V1}/", "r.example/p:1"),
    ("other.example/POD", "r.example/p:1"), (f"x{V1}/POD", "r.example/p:1"),
    (f"{V1}/POD", ""), (f"{V2}/app", ""),
])
def test_pod_match_ignores_keys_that_are_not_ours_and_opt_outs(key: str, value: str) -> None:
    assert pod_match(key, value) is None


def test_pod_match_screens_the_value() -> None:
    with pytest.raises(AnnotationError):
        pod_match(f"{V1}/POD", "r.example/p:1\nforged line")


@pytest.mark.parametrize(
    ("pod", "image", "key", "found"),
    [
        ({f"{V1}/app": ""}, {}, f"{V1}/app", "Found empty container specific"),
        ({f"{V2}/POD": ""}, {}, f"{V2}/POD", "Found empty pod specific"),
        ({}, {V1: ""}, V1, "Found empty image specific"),
        ({}, {f"{V1}/POD": ""}, f"{V1}/POD", "Found empty image specific"),
    ],
    ids=["pod-container", "pod", "image", "image-pod"],
)
def test_opt_out_log_line(pod: dict[str, str], image: dict[str, str], key: str,
                          found: str) -> None:
    match = resolve(pod, NAME, image)
    assert match is not None and match.opt_out
    assert match.log_line.startswith(found)
    assert f"{key}= " in match.log_line
    assert "opt-out" in match.log_line and "container app" in match.log_line
    # a grep for CRI-O's own lines (which name a profile that is applied) does not catch it
    assert not match.log_line.startswith(
        ("Found container specific", "Found pod specific", "Found image specific"))


HOSTILE = [
    ("100KB", "x" * 100_000, "is 100000 characters long (at most 4096)"),
    ("one over the limit", "r" * (MAX_VALUE + 1), "is 4097 characters long"),
    ("NUL", "reg/repo:tag\x00", "control or space character '\\x00' at position 12"),
    ("newline", "reg/repo:tag\nX-Injected: 1", "control or space character '\\n' at position 12"),
    ("carriage return", "reg/repo:tag\r", "'\\r' at position 12"),
    ("tab", "\treg/repo:tag", "'\\t' at position 0"),
    ("space", "reg/repo tag", "control or space character ' ' at position 8"),
    ("escape", "\x1b[31mred", "control or space character '\\x1b' at position 0"),
    ("DEL", "reg/repo\x7f", "'\\x7f' at position 8"),
    ("unicode line separator", "reg/\u2028repo", "'\\u2028' at position 4"),
    ("no-break space", "reg/\xa0repo", "'\\xa0' at position 4"),
    ("zero-width space", "reg/\u200brepo", "'\\u200b' at position 4"),
]


@pytest.mark.parametrize(("value", "message"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize(
    ("where", "key"),
    [("pod", f"{V1}/POD"), ("pod", f"{V2}/app"), ("image", V2), ("image", f"{V1}/POD")],
    ids=["pod-POD", "pod-container", "image-bare", "image-POD"],
)
def test_hostile_values_refused(where: str, key: str, value: str, message: str) -> None:
    pod, image = ({key: value}, {}) if where == "pod" else ({}, {key: value})
    with pytest.raises(AnnotationError) as info:
        resolve(pod, NAME, image)
    text = str(info.value)
    assert message in text
    assert text.startswith(f"annotation {key} ")
    assert info.value.key == key
    # the value is quoted, truncated, and cannot break the log line it lands in
    assert len(text) < 300
    assert "\n" not in text and "\x00" not in text
    assert isinstance(info.value, ValueError)


def test_value_at_the_limit_is_accepted() -> None:
    value = "r" * MAX_VALUE
    match = resolve({f"{V1}/POD": value}, NAME, {})
    assert match is not None and match.reference == value


def test_losing_values_are_not_screened() -> None:
    # CRI-O never reads a key that loses; neither do we, so it cannot fail the container
    match = resolve({f"{V1}/app": "reg.example/p:1"}, NAME, {V1: "bad\nvalue"})
    assert match is not None and match.reference == "reg.example/p:1"


def test_references_are_not_parsed_here() -> None:
    # a printable value that is no valid reference passes: the reference module refuses it
    match = resolve({f"{V1}/POD": "NOT//a::reference"}, NAME, {})
    assert match is not None and match.reference == "NOT//a::reference"

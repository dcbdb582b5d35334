"""The runtime capability table: version parsing, NRI_version precedence, overrides."""

from __future__ import annotations

import dataclasses

import pytest

from nri_seccomp import config
from nri_seccomp.decide import runtimes
from nri_seccomp.decide.runtimes import CAPABILITY_NAMES, RuntimeCaps, Version, capabilities

PARSE = [
    ("v2.2.4", Version(2, 2, 4)),
    ("2.3.0", Version(2, 3, 0)),
    ("v1.7.27", Version(1, 7, 27)),
    ("  v2.2.4\n", Version(2, 2, 4)),
    ("v2.2.0-rc.1", Version(2, 2, 0, "rc.1")),
    ("v2.3.0-beta.0", Version(2, 3, 0, "beta.0")),
    # git describe: N commits after the tag, not a pre-release
    ("v2.2.4-12-gdeadbee", Version(2, 2, 4)),
    ("v2.2.4-12-gdeadbee.m", Version(2, 2, 4)),
    ("v2.2.4-12-gdeadbee-dirty", Version(2, 2, 4)),
    ("v2.2.4.m", Version(2, 2, 4)),
    ("v2.3.0-rc.0-5-gabc1234", Version(2, 3, 0, "rc.0")),
    ("2.2.0+unknown", Version(2, 2, 0)),
    ("2.3.0-beta.1+unknown", Version(2, 3, 0, "beta.1")),
    # a Go pseudo-version of NRI: a pre-release of the next patch
    ("v0.12.3-0.20260801120000-abcdef123456", Version(0, 12, 3, "0.20260801120000-abcdef123456")),
    ("0.0.0-unknown", Version(0, 0, 0, "unknown")),
    ("", None),
    ("garbage", None),
    ("2.2", None),
    ("2.2.4abc", None),
    ("v2.2.4 extra", None),
    ("deadbee", None),  # git describe --always on an untagged tree
    ("(devel)", None),
]


@pytest.mark.parametrize(("text", "want"), PARSE, ids=[p[0].strip() or "empty" for p in PARSE])
def test_parse_version(text: str, want: Version | None) -> None:
    assert runtimes.parse_version(text) == want


@pytest.mark.parametrize(
    ("lower", "higher"),
    [("v2.2.0-rc.1", "v2.2.0"), ("v2.1.9", "v2.2.0-rc.1"), ("v2.2.4", "v2.2.4-12-gdeadbee.m"),
     ("v0.12.2", "v0.12.3-0.20260801120000-abcdef123456"),
     ("v0.12.3-0.20260801120000-abcdef123456", "v0.12.3")],
    ids=["rc-before-release", "rc-after-previous", "described-not-before-tag",
         "pseudo-after-previous", "pseudo-before-release"],
)
def test_version_order(lower: str, higher: str) -> None:
    a, b = runtimes.parse_version(lower), runtimes.parse_version(higher)
    assert a is not None and b is not None and a.key <= b.key


# applies, passes_profile, errno_ret_safe, keeps_default_errno, passes_image
NONE = (False, False, False, False, False)
CAPS = [
    # containerd releases, with the NRI_version each really sends ("" before NRI v0.12.0)
    ("1.7.27", "containerd", "v1.7.27", "", NONE),
    ("2.0.5", "containerd", "v2.0.5", "", NONE),
    ("2.1.4", "containerd", "v2.1.4", "", NONE),
    ("2.2.0", "containerd", "v2.2.0", "", (True, False, False, False, False)),
    ("2.2.0 unlinked build", "containerd", "2.2.0+unknown", "", (True, False, False, False, False)),
    ("2.2.1", "containerd", "v2.2.1", "", (True, True, False, False, False)),
    ("2.2.4", "containerd", "v2.2.4", "", (True, True, False, False, False)),
    ("2.2.4 git-described", "containerd", "v2.2.4-12-gdeadbee", "",
     (True, True, False, False, False)),
    ("2.2.7", "containerd", "v2.2.7", "", (True, True, False, False, False)),
    ("2.3.0", "containerd", "v2.3.0", "v0.12.0", (True, True, True, False, False)),
    ("2.3.4", "containerd", "v2.3.4", "v0.12.0", (True, True, True, False, False)),
    ("main with NRI 0.12.2", "containerd", "v2.3.0-57-g0123abc", "v0.12.2",
     (True, True, True, False, True)),
    # pre-releases count as the release before: v2.2.0-rc.1 already had NRI v0.10.0,
    # but v2.3.0-rc.0 still had NRI v0.11.0, whose errno_ret panic is worse than a refusal
    ("2.2.0-rc.1", "containerd", "v2.2.0-rc.1", "", NONE),
    ("2.3.0-rc.0 (NRI 0.11)", "containerd", "v2.3.0-rc.0", "", (True, True, False, False, False)),
    ("2.3.0-rc.1 (NRI 0.12)", "containerd", "v2.3.0-rc.1", "v0.12.0",
     (True, True, True, False, False)),
    # NRI_version takes precedence over what the containerd version implies
    ("NRI 0.12.2 on 2.2.4", "containerd", "v2.2.4", "v0.12.2", (True, True, True, False, True)),
    ("NRI 0.12.1", "containerd", "v2.3.0", "v0.12.1", (True, True, True, False, False)),
    ("NRI 0.11 reported on 2.3", "containerd", "v2.3.0", "v0.11.0",
     (True, True, False, False, False)),
    # a future NRI does not carry default_errno by itself: proven per release, by override
    ("NRI 0.13.0", "containerd", "v2.5.0", "v0.13.0", (True, True, True, False, True)),
    # containerd 2.4.0 ships NRI v0.12.3 (per the issue; v0.12.2 at least, from main):
    # errno carried, Container.image passed, default errno still dropped by NRI
    ("2.4.0 (NRI 0.12.3)", "containerd", "v2.4.0", "v0.12.3", (True, True, True, False, True)),
    ("2.4.0 (NRI 0.12.2)", "containerd", "v2.4.0", "v0.12.2", (True, True, True, False, True)),
    ("2.4.0-beta.0 (NRI 0.12.1)", "containerd", "v2.4.0-beta.0", "v0.12.1",
     (True, True, True, False, False)),
    ("2.4.0 without NRI_version", "containerd", "v2.4.0", "", (True, True, False, False, False)),
    ("NRI 0.12.3", "containerd", "v2.5.0", "0.12.3", (True, True, True, False, True)),
    ("NRI 1.0.0", "containerd", "v3.0.0", "v1.0.0", (True, True, True, False, True)),
    ("NRI after 0.12.2 unreleased", "containerd", "v2.5.0",
     "v0.12.3-0.20260801120000-abcdef123456", (True, True, True, False, True)),
    ("NRI git-described after 0.12.2", "containerd", "v2.5.0", "v0.12.2-3-gabcdef0",
     (True, True, True, False, True)),
    # NRI_version is sent by every NRI from v0.12.0 on: its absence means an older NRI
    ("2.3.0 without NRI_version", "containerd", "v2.3.0", "", (True, True, False, False, False)),
    # sent but unreadable: proves v0.12.0 or later and nothing more
    ("NRI unknown", "containerd", "2.3.0+unknown", "0.0.0-unknown",
     (True, True, True, False, False)),
    ("NRI garbage", "containerd", "v2.3.0", "(devel)", (True, True, True, False, False)),
    # the runtime version still decides what containerd itself does
    ("NRI 0.12.2 on 1.7", "containerd", "v1.7.27", "v0.12.2", (False, False, True, False, True)),
    ("cri-o", "cri-o", "1.30.0", "", NONE),
    ("cri-o with NRI_version", "cri-o", "1.35.0", "v0.12.0", NONE),
    ("no runtime", "", "", "", NONE),
    ("capitalised name", "Containerd", "v2.3.0", "v0.12.0", NONE),
    ("unparsable version", "containerd", "garbage", "v0.12.2", NONE),
    ("empty version", "containerd", "", "", NONE),
]


def _flags(caps: RuntimeCaps) -> tuple[bool, bool, bool, bool, bool]:
    return (caps.applies_seccomp_adjustment, caps.passes_seccomp_profile, caps.errno_ret_safe,
            caps.keeps_default_errno, caps.passes_image)


@pytest.mark.parametrize(("name", "version", "nri", "want"), [c[1:] for c in CAPS],
                         ids=[c[0] for c in CAPS])
def test_capabilities(name: str, version: str, nri: str,
                      want: tuple[bool, bool, bool, bool, bool]) -> None:
    caps = capabilities(name, version, nri)
    assert _flags(caps) == want
    assert version in caps.description


@pytest.mark.parametrize(
    ("name", "version", "nri", "fragment"),
    [
        ("containerd", "v2.2.4", "", "containerd v2.2.4 (NRI v0.11.0, inferred"),
        ("containerd", "v2.3.0", "v0.12.0", "containerd v2.3.0 (NRI v0.12.0)"),
        ("containerd", "v2.3.0", "", "no NRI_version was sent"),
        ("containerd", "v2.3.0", "0.0.0-unknown", "'0.0.0-unknown' not understood"),
        ("cri-o", "1.30.0", "", "cri-o 1.30.0 (not containerd"),
        ("", "", "", "unnamed runtime (no version) (not containerd"),
        ("containerd", "garbage", "", "containerd garbage (version not understood"),
    ],
    ids=["inferred", "reported", "missing-nri", "unknown-nri", "cri-o", "nothing", "garbage"],
)
def test_description_says_why(name: str, version: str, nri: str, fragment: str) -> None:
    assert fragment in capabilities(name, version, nri).description


@pytest.mark.parametrize("field", CAPABILITY_NAMES)
@pytest.mark.parametrize("runtime", [("containerd", "v2.2.4"), ("cri-o", "1.30.0")],
                         ids=["containerd-2.2.4", "cri-o"])
def test_overrides_force_each_field(runtime: tuple[str, str], field: str) -> None:
    base = capabilities(*runtime)
    for flag in (True, False):
        caps = capabilities(*runtime, overrides={field: flag})
        assert getattr(caps, field) is flag
        others = {f: getattr(caps, f) for f in CAPABILITY_NAMES if f != field}
        assert others == {f: getattr(base, f) for f in CAPABILITY_NAMES if f != field}
        assert caps.description == f"{base.description} with overrides {field}={str(flag).lower()}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"errno_safe": True}, "unknown runtime capability 'errno_safe'"),
        ({"description": True}, "unknown runtime capability 'description'"),
        ({"errno_ret_safe": "yes"}, "runtime capability errno_ret_safe: expected true or false"),
        ({"passes_image": 1}, "runtime capability passes_image: expected true or false"),
    ],
    ids=["typo", "description", "string", "int"],
)
def test_bad_overrides(overrides: dict[str, bool], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        capabilities("containerd", "v2.2.4", overrides=overrides)
    if "unknown" in message:
        assert "errno_ret_safe" in str(info.value)  # lists what is allowed


def test_empty_overrides_change_nothing() -> None:
    assert capabilities("containerd", "v2.2.4", overrides={}) == capabilities(
        "containerd", "v2.2.4")


def test_caps_are_hashable_and_frozen() -> None:
    caps = capabilities("containerd", "v2.3.0", "v0.12.0")
    assert {caps: 1}[capabilities("containerd", "v2.3.0", "v0.12.0")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.errno_ret_safe = False  # type: ignore[misc]


def test_configuration_accepts_the_same_override_names() -> None:
    for name in CAPABILITY_NAMES:
        assert config.load(f"runtime_overrides: {{{name}: true}}").runtime_overrides == {
            name: True}
